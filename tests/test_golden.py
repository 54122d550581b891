"""Golden outputs: the sha256 of the pixels of CPU restorations, per task, for a stack, a plane
restored by super-tiles, isotropic restoration and every output format (read back).

They hold the behaviour still while the code is reorganised: a refactor that changes a
single output pixel fails here. A deliberate change of behaviour re-records them with
``python tests/test_golden.py --record`` and says why in its commit.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import tifffile

HERE = Path(__file__).parent
GOLDEN = HERE / "golden.json"
TILE = 32
COMMON = ["--sigma0", "0.1", "--steps", "4", "--seed", "3", "--quiet"]


def _cases(work: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (input file, extra options, output name)."""
    return {
        "denoise": ("plane.tif", ["-o", "denoise.tif"]),
        "sr": ("small.tif", ["-o", "sr.tif", "--task", "sr", "--scale", "2"]),
        "deblur": ("plane.tif", ["-o", "deblur.tif", "--task", "deblur", "--blur-sigma", "1.2"]),
        "inpaint": ("holes.tif", ["-o", "inpaint.tif", "--task", "inpaint", "--mask", "auto", "--min-hole", "50"]),
        "stack, 2 samples": ("stack.tif", ["-o", "stack.tif", "--samples", "2"]),
        "super-tiles": ("wide.tif", ["-o", "super.tif", "--max-region", "128"]),
        "isotropic": ("stack.tif", ["-o", "iso.tif", "--task", "isotropic", "--z-factor", "2"]),
        **{f"format {suffix}": ("plane.tif", ["-o", f"plane{suffix}"]) for suffix in (".ome.tif", ".png", ".mrc", ".zarr")},
        "float32 input": ("float.tif", ["-o", "float.tif"]),
    }


def _inputs(work: Path, em: np.ndarray) -> None:
    tifffile.imwrite(work / "plane.tif", em[200:300, 300:430])
    tifffile.imwrite(work / "small.tif", em[500:540, 700:748])
    tifffile.imwrite(work / "wide.tif", em[900:1040, 200:460])
    holes = em[600:680, 100:180].copy()
    holes[20:40, 30:50] = 0
    tifffile.imwrite(work / "holes.tif", holes)
    tifffile.imwrite(work / "stack.tif", np.stack([em[100 * i : 100 * i + 40, 800:848] for i in range(3)]),
                     photometric="minisblack")
    tifffile.imwrite(work / "float.tif", em[300:360, 300:364].astype(np.float32) * 0.37 + 11.5)


def outputs(work: Path, em: np.ndarray, model: Path) -> dict[str, str]:
    """sha256 of each case's output pixels, read back from the file written."""
    from click.testing import CliRunner

    from df5t_deploy.cli import main
    from df5t_deploy.formats import read_image

    _inputs(work, em)
    digests = {}
    for name, (source, options) in _cases(work).items():
        out_name = options[options.index("-o") + 1]
        (work / "out").mkdir(exist_ok=True)
        args = ["restore", str(work / source), "--model", str(model), *COMMON,
                *[str(work / "out" / out_name) if o == out_name else o for o in options]]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, f"{name}: {result.output}"
        pixels, _ = read_image(work / "out" / out_name)
        digests[name] = f"{pixels.dtype} {pixels.shape} " + hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()
    return digests


def _model(folder: Path) -> Path:
    sys.path.insert(0, str(HERE))
    from onnx_models import tile_mean_model

    return tile_mean_model(folder / "mean.onnx", TILE, gain=0.5)


def _em(shared: Path) -> np.ndarray:
    return tifffile.imread(shared / "data" / "em" / "micrograph_vemstitch-mussel_tile3_2_2_1768x2048.tif")


def test_outputs_are_the_recorded_ones(tmp_path, shared_dir):
    recorded = json.loads(GOLDEN.read_text())
    assert outputs(tmp_path, _em(shared_dir), _model(tmp_path)) == recorded


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        raise SystemExit("usage: python tests/test_golden.py --record   (re-records tests/golden.json)")
    from conftest import shared_root

    with tempfile.TemporaryDirectory() as folder:
        root = shared_root()
        if root is None:
            raise SystemExit("the shared/ folder is needed: put it beside the checkout or set DF5T_SHARED")
        digests = outputs(Path(folder), _em(root), _model(Path(folder)))
    GOLDEN.write_text(json.dumps(digests, indent=2) + "\n")
    print(f"recorded {len(digests)} outputs in {GOLDEN}")
