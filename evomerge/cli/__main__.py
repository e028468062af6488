"""``python -m evomerge.cli``: the same as the ``evomerge`` command."""

import sys

from evomerge.cli import main

if __name__ == "__main__":
    sys.exit(main())
