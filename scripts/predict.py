"""Segment CT scans with a run's fold adapters: ``python scripts/predict.py --run RUN_DIR ... --input PATH``.

The same as ``segadapt predict --run ...``; see :mod:`segadapt.inference` (``--help`` lists the options).
"""

from segadapt.inference import main

if __name__ == "__main__":
    main()
