"""The ``segadapt`` command.

* ``segadapt fit|validate|test --config run.yaml`` -- Lightning's CLI over
  :class:`~segadapt.training.SegAdaptModule` and :class:`~segadapt.training.SegDataModule`; the YAML has
  ``model:`` (module arguments), ``data:`` (data-module arguments) and ``trainer:`` sections
  (``segadapt fit --print_config`` prints a complete one). Training writes
  ``<default_root_dir>/checkpoints/last.ckpt`` (resume with ``--ckpt_path last``) and, at the end, the
  trained adapter or weights into the trainer's log folder.
* ``segadapt report EXPERIMENT_DIR [--out DIR]`` -- the cross-validation report of a folder of runs.
* ``segadapt diagnose RUN_DIR [RUN_DIR ...] [--out DIR]`` -- per layer ||dW|| / ||W0||, effective rank of dW and
  intruder dimensions of adapter and full fine-tuning runs (:mod:`segadapt.diagnose`).
* ``segadapt predict --run RUN_DIR [RUN_DIR ...] --input SCAN_OR_FOLDER [--output DIR]`` -- inference on CT
  scans with a fold ensemble of adapters (:mod:`segadapt.inference`), masks on each scan's own grid.

Fold-by-fold experiments with automatic data and base preparation use ``scripts/train.py`` (Hydra).
"""

from __future__ import annotations

import argparse
import codecs
import os
import sys
from collections.abc import Sequence
from typing import Optional

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from segadapt.inference import main as predict_main
from segadapt.training import ExportWeights, SegAdaptModule, SegDataModule, TrainStats, write_report


def tolerate_ascii_console() -> None:
    """On a console that cannot encode Unicode (e.g. ``LC_ALL=C``), print escapes instead of failing.

    Lightning's default progress bar and model summary (rich) write symbols such as U+2022; with an ASCII
    stdout those raise UnicodeEncodeError at the end of a fit. A UTF-8 console is left as it is.
    """
    for stream in (sys.stdout, sys.stderr):
        encoding = getattr(stream, "encoding", None) or "ascii"
        if codecs.lookup(encoding).name != "utf-8" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def report_main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="segadapt report", description="Cross-validation report of a folder of runs "
                                     "(<experiment>/<method>/fold<k>/metrics.json): report.md, report.csv, PNG plots.")
    parser.add_argument("experiment_dir", help="e.g. runs/phantom_sah")
    parser.add_argument("--out", help="output folder (default: the experiment folder)")
    args = parser.parse_args(argv)
    for kind, path in write_report(args.experiment_dir, args.out).items():
        print(f"{kind:>15}: {path}")


class SegAdaptCLI(LightningCLI):
    """LightningCLI that keeps ``last.ckpt`` in ``<default_root_dir>/checkpoints``.

    Lightning's default folder is the logger's ``version_N``, a new one in every process, so a later
    ``--ckpt_path last`` would find nothing and silently start again from step 0.
    """

    def _fixed_checkpoint_folder(self) -> None:
        for callback in self.trainer.checkpoint_callbacks:
            if callback.dirpath is None:
                callback.dirpath = os.path.join(self.trainer.default_root_dir, "checkpoints")

    before_fit = before_validate = before_test = _fixed_checkpoint_folder


def main(argv: Optional[Sequence[str]] = None) -> Optional[LightningCLI]:
    """The ``segadapt`` command; returns the LightningCLI object for fit/validate/test."""
    argv = list(sys.argv[1:] if argv is None else argv)
    tolerate_ascii_console()
    if argv[:1] == ["report"]:
        report_main(argv[1:])
        return None
    if argv[:1] == ["predict"]:
        predict_main(argv[1:])
        return None
    if argv[:1] == ["diagnose"]:
        from segadapt.diagnose import main as diagnose_main

        diagnose_main(argv[1:])
        return None
    return SegAdaptCLI(
        SegAdaptModule,
        SegDataModule,
        args=argv,
        seed_everything_default=0,
        trainer_defaults={"callbacks": [ModelCheckpoint(save_last=True, save_top_k=0), TrainStats(), ExportWeights()]},
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": __doc__},
    )


if __name__ == "__main__":
    main()
