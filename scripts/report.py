"""Cross-validation report of an experiment folder: ``python scripts/report.py runs/phantom_sah [--out DIR]``.

Writes report.md, report.csv, dice_by_method.png and dice_vs_volume.png (see segadapt.training.report);
the same as ``segadapt report runs/phantom_sah``.
"""

from __future__ import annotations

from segadapt.cli import report_main

if __name__ == "__main__":
    report_main()
