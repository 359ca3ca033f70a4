"""``python -m tensorsurgery``: the command line."""
import sys

from tensorsurgery.cli import main

sys.exit(main())
