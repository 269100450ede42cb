"""``python -m segadapt``: the ``segadapt`` command."""

import sys

from segadapt.cli import main

sys.exit(main())
