"""The wheel carries everything the runtime needs: built, installed apart from the checkout,
it reports its kernels as built and restores the bundled sample."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from extras import require

from df5t_deploy.models import DEFAULT_MODEL

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path, Path, dict[str, str]]:
    """The wheel, and the interpreter, site folder and environment of a fresh virtual
    environment where it is installed."""
    folder = tmp_path_factory.mktemp("wheel")
    source = folder / "source"  # the checkout's files alone: no build/ left by an earlier build
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.splitlines()
    for name in files:
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(folder), str(source)], check=True, cwd=folder)
    wheel = next(folder.glob("df5t_deploy-*.whl"))
    # A fresh environment with the wheel installed, and this one's dependencies on its path
    # through a .pth line (whose folder's own .pth files, the checkout's editable hook among
    # them, are not read): the only df5t_deploy it can import is the wheel's.
    venv = folder / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, cwd=folder)
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # cuda-bindings looks for libnvrtc among the site folders, which now are the new ones
    nvrtc = sorted(Path(sysconfig.get_paths()["purelib"]).glob("nvidia/*/lib/libnvrtc.so*"))
    library_path = ":".join([str(nvrtc[0].parent)] if nvrtc else []) + ":" + os.environ.get("LD_LIBRARY_PATH", "")
    env = {**os.environ, "DF5T_CACHE": str(folder / "cache"), "LD_LIBRARY_PATH": library_path.strip(":")}
    env.pop("PYTHONPATH", None)
    return wheel, python, site, env


def _run(python: Path, env: dict[str, str], cwd: Path, *code: str) -> str:
    result = subprocess.run([str(python), "-c", "\n".join(code)], env=env, cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_wheel_holds_the_kernels_the_models_and_the_sample(installed):
    wheel = installed[0]
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("df5t_deploy/cuda/kernels.cu", "df5t_deploy/cuda/launch.py", f"df5t_deploy/models/{DEFAULT_MODEL}.onnx",
                     "df5t_deploy/samples/mussel_nuclei_256.tif", "df5t_deploy/export/network.py",
                     "df5t_deploy/engines/cache.py"):
        assert required in names, f"{required} is missing from {wheel.name}"


def test_the_installed_wheel_compiles_its_kernels_and_restores(installed, tmp_path):
    require("cuda.bindings.nvrtc", "test")
    _, python, site, env = installed
    where = _run(python, env, tmp_path, "import df5t_deploy; print(df5t_deploy.__file__)")
    assert Path(where.strip()).is_relative_to(site), f"the checkout was imported, not the wheel: {where}"
    doctor = _run(python, env, tmp_path, "from df5t_deploy.cli import main", "main(['doctor', '--json'])")
    assert set(json.loads(doctor)["kernels"].values()) == {"ok"}
    out = tmp_path / "restored.tif"
    _run(python, env, tmp_path, "from df5t_deploy.cli import main", "from df5t_deploy.samples import sample_path",
         f"main(['restore', str(sample_path()), '-o', {str(out)!r}, '--sigma0', '0.1', '--steps', '2', '--quiet'])")
    import tifffile

    assert tifffile.imread(out).shape == (256, 256)
