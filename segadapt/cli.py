"""The ``segadapt`` command.

* ``segadapt fit|validate|test --config run.yaml`` -- Lightning's CLI over
  :class:`~segadapt.training.SegAdaptModule` and :class:`~segadapt.training.SegDataModule`; the YAML has
  ``model:`` (module arguments), ``data:`` (data-module arguments) and ``trainer:`` sections
  (``segadapt fit --print_config`` prints a complete one). Training writes
  ``<default_root_dir>/checkpoints/last.ckpt`` (resume with ``--ckpt_path last``) and, at the end, the
  trained adapter or weights into the trainer's log folder.
* ``segadapt report EXPERIMENT_DIR [--out DIR]`` -- the cross-validation report of a folder of runs.
* ``segadapt plan DATASET_JSON [--out plan.json] [--memory-gb 8]`` -- dataset fingerprint and nnU-Net-style
  plan (:mod:`segadapt.data.plan`), written as JSON and printed.
* ``segadapt diagnose RUN_DIR [RUN_DIR ...] [--out DIR]`` -- per layer ||dW|| / ||W0||, effective rank of dW and
  intruder dimensions of adapter and full fine-tuning runs (:mod:`segadapt.diagnose`).
* ``segadapt predict --run RUN_DIR [RUN_DIR ...] --input SCAN_OR_FOLDER [--output DIR]`` -- inference on CT
  scans with a fold ensemble of adapters (:mod:`segadapt.inference`), masks on each scan's own grid.

Fold-by-fold experiments with automatic data and base preparation use ``scripts/train.py`` (Hydra);
:func:`check_hydra_request` and :func:`run_hydra_task` give those scripts the same one-line errors
(:mod:`segadapt.errors`) as the subcommands here.
"""

from __future__ import annotations

import argparse
import codecs
import itertools
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from omegaconf import DictConfig, OmegaConf

from segadapt.data.plan import main as plan_main
from segadapt.errors import exits_on_user_error, user_errors
from segadapt.inference import main as predict_main
from segadapt.training import ExportWeights, SegAdaptModule, SegDataModule, TrainStats, write_report
from segadapt.training.run import check_config_types


def tolerate_ascii_console() -> None:
    """On a console that cannot encode Unicode (e.g. ``LC_ALL=C``), print escapes instead of failing.

    Lightning's default progress bar and model summary (rich) write symbols such as U+2022; with an ASCII
    stdout those raise UnicodeEncodeError at the end of a fit. A UTF-8 console is left as it is.
    """
    for stream in (sys.stdout, sys.stderr):
        encoding = getattr(stream, "encoding", None) or "ascii"
        if codecs.lookup(encoding).name != "utf-8" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


@exits_on_user_error
def report_main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="segadapt report", description="Cross-validation report of a folder of runs "
                                     "(<experiment>/<model>/<method>/fold<k>/metrics.json): report.md, report.csv, PNG plots.")
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


def run(argv: Optional[Sequence[str]] = None) -> Optional[LightningCLI]:
    """The ``segadapt`` command; returns the LightningCLI object for fit/validate/test (None otherwise)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    tolerate_ascii_console()
    if argv[:1] == ["report"]:
        report_main(argv[1:])
        return None
    if argv[:1] == ["plan"]:
        plan_main(argv[1:])
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


@exits_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point: :func:`run`; a user error is one line on stderr and exit code 2."""
    run(argv)


# ---- Hydra scripts (scripts/train.py, scripts/pretrain.py) -----------------------------------------------
_HYDRA_FLAGS = ("-m", "--multirun")


def hydra_jobs(config_dir: str | os.PathLike, config_name: str, argv: Sequence[str]) -> Iterator[tuple[dict, dict]]:
    """(resolved config, reference config) of every job that ``script.py argv`` runs (each point of a ``-m``
    sweep), composed as @hydra.main will compose them. The reference has only the config-group choices
    of the job (``model=unet3d``...): the types of its values are the expected ones.

    Yields nothing for command lines it does not model (other flags, glob sweeps): Hydra handles those."""
    if any(a.startswith("-") and a not in _HYDRA_FLAGS for a in argv):
        return
    multirun = any(a in _HYDRA_FLAGS for a in argv)
    parsed = OverridesParser.create().parse_overrides([a for a in argv if a not in _HYDRA_FLAGS])
    groups = {p.name for p in Path(config_dir).iterdir() if p.is_dir()}
    choices = []
    for override in parsed:
        key = override.get_key_element()
        if override.is_sweep_override() and multirun:
            try:
                values = list(override.sweep_string_iterator())
            except Exception:  # e.g. glob(*): the group listing is Hydra's business
                return
            choices.append([f"{key}={v}" for v in values])
        else:
            choices.append([override.input_line])
    is_group = [o.key_or_group.split("@")[0] in groups for o in parsed]
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        for job in itertools.product(*choices):
            cfg = compose(config_name, overrides=list(job))
            reference = compose(config_name, overrides=[o for o, g in zip(job, is_group) if g])
            yield (OmegaConf.to_container(cfg, resolve=True), OmegaConf.to_container(reference, resolve=True))


def check_hydra_request(config_dir: str | os.PathLike, config_name: str, check: Callable[[dict], None],
                        argv: Optional[Sequence[str]] = None) -> None:
    """Before @hydra.main writes anything (its .hydra/ record in the run folder): compose every job of the
    command line, check the value types against the config files' (:func:`check_config_types`), then
    `check` each job (e.g. :func:`segadapt.training.run.check_request`). A user error exits with one line."""
    with user_errors():
        for cfg, reference in hydra_jobs(config_dir, config_name, sys.argv[1:] if argv is None else argv):
            check_config_types(cfg, reference)
            check(cfg)


def run_hydra_task(cfg: DictConfig, task: Callable[[dict], Any]) -> Any:
    """Run `task` on the resolved config of a Hydra job with one-line user errors. A job that fails leaves no
    run folder behind that holds nothing but Hydra's own record of it."""
    tolerate_ascii_console()
    try:
        with user_errors():
            return task(OmegaConf.to_container(cfg, resolve=True))
    except SystemExit:
        _remove_hydra_record()
        raise


def _remove_hydra_record() -> None:
    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    folder = Path(hydra_cfg.runtime.output_dir)
    own = {hydra_cfg.output_subdir, f"{hydra_cfg.job.name}.log"}
    if folder.is_dir() and {p.name for p in folder.iterdir()} <= own:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
