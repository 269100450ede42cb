"""Segment CT scans with a run's fold adapters: ``python scripts/predict.py --run RUN_DIR ... --input PATH``.

The same as ``segadapt predict --run ...``; see :mod:`segadapt.inference.cli` (``--help`` lists the options).
"""

import sys

from segadapt.cli import main

if __name__ == "__main__":
    main(["predict", *sys.argv[1:]])
