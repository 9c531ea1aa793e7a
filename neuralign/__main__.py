"""``python -m neuralign``: the same command line as ``neuralign``."""

import sys

from neuralign.cli import main

if __name__ == "__main__":
    sys.exit(main())
