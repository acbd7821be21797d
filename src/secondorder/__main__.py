"""``python -m secondorder``: the command line."""

import sys

from secondorder.cli import main

sys.exit(main())
