"""Cross-validation report of an experiment folder: ``python scripts/report.py runs/phantom_sah [--out DIR]``.

Writes report.md, report.csv, report_folds.csv and the plots dice_by_method / dice_vs_volume as PNG, SVG and
PDF (see segadapt.training.report);
the same as ``segadapt report runs/phantom_sah``.
"""

from __future__ import annotations

from segadapt.cli import report_main

if __name__ == "__main__":
    report_main()
