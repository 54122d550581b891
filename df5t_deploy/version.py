"""The package version, in a module of its own so that any part can read it without importing
the package's front door; and how to install one of its extras."""

__version__ = "0.1.0"


def install_extra(extra: str) -> str:
    """The command that adds ``extra``: df5t-deploy has no package-index release yet, so it
    installs from a checkout of its repository."""
    return f"pip install -e '.[{extra}]' in a checkout of df5t-deploy (no package-index release yet)"
