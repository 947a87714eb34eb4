"""``python -m mailbridge`` runs the command line."""

import sys

from mailbridge.cli import main

sys.exit(main())
