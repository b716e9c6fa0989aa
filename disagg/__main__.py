"""``python -m disagg``: the same command line as the ``disagg`` script."""

import sys

from disagg.cli import main

if __name__ == "__main__":
    sys.exit(main())
