"""``python -m df5t_deploy.samples [NAME]`` prints the path of a bundled sample."""

import sys

from . import DEFAULT_SAMPLE, sample_path

print(sample_path(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_SAMPLE))
