"""The wheel carries everything the runtime needs: built, installed apart from the checkout,
it reports its kernels as built and restores the bundled sample."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The wheel, and an environment whose only df5t_deploy is the wheel's (installed with
    --target, ahead of the editable checkout on sys.path), run from outside the checkout."""
    folder = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(folder), str(REPO)], check=True, cwd=folder)
    wheel = next(folder.glob("df5t_deploy-*.whl"))
    target = folder / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, cwd=folder)
    env = {**os.environ, "PYTHONPATH": str(target), "DF5T_CACHE": str(folder / "cache")}
    return wheel, env


def _run(env: dict[str, str], cwd: Path, *code: str) -> str:
    result = subprocess.run([sys.executable, "-c", "\n".join(code)], env=env, cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_wheel_holds_the_kernels_the_models_and_the_sample(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("df5t_deploy/cuda/kernels.cu", "df5t_deploy/cuda/launch.py", "df5t_deploy/models/df5t-tiny-em.onnx",
                     "df5t_deploy/samples/mussel_nuclei_256.tif", "df5t_deploy/export/network.py",
                     "df5t_deploy/engines/cache.py"):
        assert required in names, f"{required} is missing from {wheel.name}"


def test_the_installed_wheel_compiles_its_kernels_and_restores(installed, tmp_path):
    pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-bindings (NVRTC) not installed: pip install '.[test]'")
    _, env = installed
    site = Path(env["PYTHONPATH"])
    where = _run(env, tmp_path, "import df5t_deploy; print(df5t_deploy.__file__)")
    assert Path(where.strip()).is_relative_to(site), f"the checkout was imported, not the wheel: {where}"
    doctor = _run(env, tmp_path, "from df5t_deploy.cli import main", "main(['doctor', '--json'])")
    assert set(json.loads(doctor)["kernels"].values()) == {"ok"}
    out = tmp_path / "restored.tif"
    _run(env, tmp_path, "from df5t_deploy.cli import main", "from df5t_deploy.samples import sample_path",
         f"main(['restore', str(sample_path()), '-o', {str(out)!r}, '--sigma0', '0.1', '--steps', '2', '--quiet'])")
    import tifffile

    assert tifffile.imread(out).shape == (256, 256)
