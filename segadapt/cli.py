"""The ``segadapt`` command: one entry point, one subcommand per task (``segadapt --help`` lists them).

* ``segadapt fit|validate|test --config configs/cli/fit.yaml`` -- Lightning's CLI over
  :class:`~segadapt.training.SegAdaptModule` and :class:`~segadapt.training.SegDataModule`; the YAML has
  ``model:`` (module arguments), ``data:`` (data-module arguments) and ``trainer:`` sections
  (``segadapt fit --print_config`` prints a complete one). ``fit`` writes the run folder
  ``trainer.default_root_dir`` as ``scripts/train.py`` writes its run_dir (:mod:`segadapt.runs`; resume a
  killed fit with ``--ckpt_path last``), which predict, export, report and diagnose open. ``test`` scores the
  dataset's test split (``dataset.json`` ``test`` entries with labels, or ``imagesTs``/``labelsTs``) and refuses
  without one.
* ``segadapt predict --run RUN_DIR [RUN_DIR ...] --input SCAN_OR_FOLDER [--output DIR]`` -- inference with a
  fold ensemble of adapters (:mod:`segadapt.inference`), masks on each scan's own grid.
* ``segadapt report EXPERIMENT_DIR [--out DIR]`` -- the cross-validation report of a folder of runs.
* ``segadapt export RUN_DIR --merged FILE | --peft DIR | --bundle DIR | --nnunet DIR`` -- a run's network
  in other formats (:func:`segadapt.export.cli.main`).
* ``segadapt plan DATASET_JSON [--out plan.json]`` -- dataset fingerprint and nnU-Net-style plan.
* ``segadapt diagnose RUN_DIR [RUN_DIR ...] [--out DIR]`` -- spectral diagnostics of what a tuning changed.
* ``segadapt auto [KEY=VALUE ...] --trials N`` -- the adaptation chosen per fold by a nested Optuna search
  (:mod:`segadapt.training.auto`).

Every subcommand exits 0 on success and 2 with one ``error:`` line on a user error (:mod:`segadapt.errors`).
The argparse subcommands also take ``--config FILE.yaml`` (``option: value`` lines, e.g.
``configs/cli/predict.yaml``); options given on the command line after it win. Each subcommand imports its
heavy modules (torch, Lightning, MONAI) only when it runs, so ``segadapt --help`` and the argparse subcommands'
``--help`` (their parsers are in :mod:`segadapt.parsers`) answer at once.

Fold-by-fold experiments with automatic data and base preparation use ``scripts/train.py`` (Hydra);
:func:`check_hydra_request` and :func:`run_hydra_task` give those scripts the same one-line errors
(:mod:`segadapt.errors`) as the subcommands here.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import os
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

from segadapt import __version__
from segadapt.console import setup_console
from segadapt.errors import OneLineParser, exits_on_user_error, user_errors
from segadapt.parsers import PARSERS, report_parser

LIGHTNING_COMMANDS = ("fit", "validate", "test")

# subcommand -> (one line of `segadapt --help`, "module:function" that runs it on the rest of the command line)
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("train on one fold (LightningCLI: --config configs/cli/fit.yaml)", ""),
    "validate": ("score a checkpoint on the fold's validation cases", ""),
    "test": ("score a checkpoint on the dataset's labelled test split", ""),
    "predict": ("segment scans with a run's fold adapters (masks, volumes)", "segadapt.inference.cli:main"),
    "report": ("cross-validation report of an experiment folder", "segadapt.cli:report_main"),
    "export": ("a run's network as merged weights, PEFT, MONAI bundle, nnU-Net", "segadapt.export.cli:main"),
    "plan": ("dataset fingerprint and nnU-Net-style plan (JSON)", "segadapt.plan.cli:main"),
    "diagnose": ("per-layer norm, effective rank, intruder dimensions of dW", "segadapt.inference.diagnose:main"),
    "auto": ("choose the adaptation by a nested Optuna search (auto.json)", "segadapt.training.auto:main"),
}


def build_parser() -> argparse.ArgumentParser:
    """``segadapt [--version] COMMAND ...``: the subcommands and their one-line descriptions."""
    parser = OneLineParser(
        prog="segadapt", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Parameter-efficient adaptation of segmentation networks: train, score, predict, report, export.",
        epilog="`segadapt COMMAND --help` lists the options of a command. The subcommands other than fit/validate/test\n"
               "also read `--config FILE.yaml` (option: value per line; e.g. configs/cli/predict.yaml).\n"
               "Exit codes: 0 success, 2 a user error (one `error:` line; SEGADAPT_DEBUG=1 adds the traceback).")
    parser.add_argument("--version", action="version", version=f"segadapt {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands", required=True)
    for name, (summary, _) in COMMANDS.items():
        commands.add_parser(name, help=summary, add_help=False)
    return parser


def config_argv(argv: Sequence[str]) -> list[str]:
    """`argv` with ``--config FILE`` replaced by the file's options: ``key: value`` -> ``--key value`` (``_`` in
    keys as ``-``; a list gives several values; true gives the bare flag, false and null nothing). The file's
    options come first, so the command line's win."""
    argv = list(argv)
    if "--config" not in argv:
        return argv
    at = argv.index("--config")
    if at + 1 >= len(argv):
        raise ValueError("--config needs a YAML file")
    import yaml

    path = Path(argv[at + 1])
    try:
        options = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not readable YAML: {' '.join(str(error).split())}") from None
    if not isinstance(options, dict):
        raise ValueError(f"{path}: expected 'option: value' lines, got {type(options).__name__}")
    expanded: list[str] = []
    for key, value in options.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            expanded.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, list):
            expanded += [flag, *map(str, value)]
        else:
            expanded += [flag, str(value)]
    return expanded + argv[:at] + argv[at + 2:]


def _runner(command: str) -> Callable[[list[str]], Any]:
    module, function = COMMANDS[command][1].split(":")
    return getattr(importlib.import_module(module), function)


@exits_on_user_error
def report_main(argv: Optional[Sequence[str]] = None) -> None:
    args = report_parser().parse_args(argv)
    from segadapt.training.report import write_report

    with warnings.catch_warnings(record=True) as caught:  # the report's own warnings, one line each
        paths = write_report(args.experiment_dir, args.out)
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    for kind, path in paths.items():
        print(f"{kind:>18}: {path}")


def run(argv: Optional[Sequence[str]] = None) -> Any:
    """The ``segadapt`` command without its exit code: returns the LightningCLI object for fit / validate /
    test (its ``.trainer``, ``.model``), the subcommand's own result otherwise. User errors raise."""
    argv = list(sys.argv[1:] if argv is None else argv)
    setup_console()
    command = build_parser().parse_args(argv[:1]).command  # --help / --version exit here, before any heavy import
    if command in PARSERS and {"-h", "--help"} & set(argv[1:]):
        PARSERS[command]().parse_args(argv[1:])  # the command's own help; exits before the command's imports
    if command in LIGHTNING_COMMANDS:
        from segadapt.training.lightning_cli import lightning_cli

        return lightning_cli(argv)
    return _runner(command)(config_argv(argv[1:]))


@exits_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point: :func:`run`; 0 on success, a user error is one line on stderr and exit code 2."""
    run(argv)
    return 0


# ---- Hydra scripts (scripts/train.py, scripts/pretrain.py) -----------------------------------------------
_HYDRA_FLAGS = ("-m", "--multirun")


def hydra_jobs(config_dir: str | os.PathLike, config_name: str, argv: Sequence[str]) -> Iterator[dict]:
    """The resolved config of every job that ``script.py argv`` runs (each point of a ``-m`` sweep), composed as
    @hydra.main will compose them.

    Yields nothing for command lines it does not model (other flags, glob sweeps): Hydra handles those."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    if any(a.startswith("-") and a not in _HYDRA_FLAGS for a in argv):
        return
    multirun = any(a in _HYDRA_FLAGS for a in argv)
    parsed = OverridesParser.create().parse_overrides([a for a in argv if a not in _HYDRA_FLAGS])
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
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        for job in itertools.product(*choices):
            yield OmegaConf.to_container(compose(config_name, overrides=list(job)), resolve=True)


def check_hydra_request(config_dir: str | os.PathLike, config_name: str, check: Callable[[Any], None],
                        argv: Optional[Sequence[str]] = None) -> None:
    """Before @hydra.main writes anything (its .hydra/ record in the run folder, which is why this composes the
    jobs itself): compose every job of the command line, type it (:meth:`TrainConfig.from_cfg
    <segadapt.training.config.TrainConfig.from_cfg>`), then `check` the typed request (e.g.
    :func:`segadapt.training.jobs.check_request`). A user error exits with one line."""
    from segadapt.training.config import TrainConfig

    with user_errors():
        for cfg in hydra_jobs(config_dir, config_name, sys.argv[1:] if argv is None else argv):
            check(TrainConfig.from_cfg(cfg))


def run_hydra_task(cfg: Any, task: Callable[[dict], Any]) -> Any:
    """Run `task` on the resolved config (an OmegaConf ``DictConfig``) of a Hydra job with one-line user
    errors. A job that fails leaves no run folder behind that holds nothing but Hydra's own record of it."""
    from omegaconf import OmegaConf

    setup_console()
    try:
        with user_errors():
            return task(OmegaConf.to_container(cfg, resolve=True))
    except SystemExit:
        _remove_hydra_record()
        raise


def _remove_hydra_record() -> None:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    folder = Path(hydra_cfg.runtime.output_dir)
    own = {hydra_cfg.output_subdir, f"{hydra_cfg.job.name}.log"}
    if folder.is_dir() and {p.name for p in folder.iterdir()} <= own:
        shutil.rmtree(folder)


if __name__ == "__main__":
    sys.exit(main())
