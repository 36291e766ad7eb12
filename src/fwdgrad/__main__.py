"""``python -m fwdgrad`` runs the command line, see :mod:`fwdgrad.cli`."""

import sys

from fwdgrad.cli import main

sys.exit(main())
