"""Real EM samples shipped with the package, for the first command a new user runs.

``mussel_nuclei_256.tif``: a 256 x 256 crop (rows 1360-1615, columns 880-1135) of tile
3_2_2 of sample 3 of the vEMstitch mussel serial-section EM data (HeracleBT/vEMstitch at
commit cff396e91b389aacfd7950384986db18ae3faa9b, ``related_data/real_data/sample_3/3_2_2.bmp``),
CC0 1.0. Its tile is held out from the bundled model's training, so the demo restores data
the model never saw. Pixel values unchanged (uint8); pixel size not stated by the source.
"""

from __future__ import annotations

from pathlib import Path

SAMPLES = {"mussel-nuclei": "mussel_nuclei_256.tif"}
DEFAULT_SAMPLE = "mussel-nuclei"


def sample_path(name: str = DEFAULT_SAMPLE) -> Path:
    if name not in SAMPLES:
        raise ValueError(f"unknown sample {name!r}; available: {', '.join(SAMPLES)}")
    return Path(__file__).with_name(SAMPLES[name])
