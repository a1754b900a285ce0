"""``python -m adasap``: the command line, also as ``torchrun ... -m adasap run ...``."""

import sys

from adasap.cli import main

if __name__ == "__main__":
    sys.exit(main())
