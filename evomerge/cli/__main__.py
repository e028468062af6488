"""``python -m evomerge.cli``: the same as the ``evomerge`` command."""

import sys

from evomerge.cli import main

sys.exit(main())
