"""``python -m gradnoise`` runs the command line."""

import sys

from gradnoise.cli import main

sys.exit(main())
