"""df5t-deploy: restore electron-microscopy images and volumes with DF5T.

``from df5t_deploy import Restorer`` is the embedding API (see ``df5t_deploy.api``), and
``RestoreSettings`` its settings; both are imported on first use so that ``import
df5t_deploy`` stays light.
"""

from .version import __version__

__all__ = ["QueueFull", "RestoreSettings", "Restorer", "__version__"]


def __getattr__(name: str):
    if name == "Restorer":
        from .api import Restorer

        return Restorer
    if name == "QueueFull":
        from .frames import QueueFull

        return QueueFull
    if name == "RestoreSettings":
        from .settings import RestoreSettings

        return RestoreSettings
    raise AttributeError(f"module 'df5t_deploy' has no attribute {name!r}")
