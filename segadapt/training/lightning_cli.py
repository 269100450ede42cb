"""``segadapt fit|validate|test``: Lightning's CLI over :class:`SegAdaptModule` and :class:`SegDataModule`.

The options and their help come from the two classes' ``__init__`` signatures and docstrings (jsonargparse);
``segadapt fit --print_config`` prints a complete YAML, ``configs/cli/fit.yaml`` is an example. The module
builds its own optimiser (AdamW, warm-up, cosine: ``model.lr`` ...), so LightningCLI's ``--optimizer`` /
``--lr_scheduler`` options are not offered.

``fit`` trains through :func:`segadapt.training.fit.fit_run`, as ``scripts/train.py`` does: the run folder is
``trainer.default_root_dir`` (config.yaml, fingerprint.json, metrics.json, the adapter or weights, last.ckpt,
logs/metrics.csv; see :mod:`segadapt.runs`), which ``segadapt predict --run``, ``export``, ``diagnose``
and ``report`` open with :func:`segadapt.runs.open_run` (the network: :func:`segadapt.training.load.load_run`). ``validate`` and ``test`` say which network
they scored (the checkpoint's step; the step model selection chose, when that is another one).
"""

from __future__ import annotations

import inspect
import json
from argparse import ArgumentError
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from segadapt.data import PreprocessConfig

from .callbacks import LoadedCheckpoint, progress_callbacks
from .datamodule import SegDataModule
from .module import SegAdaptModule, tuning_name
from segadapt.runs import CHECKPOINT_FILE, METRICS_FILE

from .config import RunConfig, configure_threads
from .fit import fit_run
from .jobs import format_result, report_summary

DESCRIPTION = {
    "fit": "Train one fold: SegAdaptModule (model.*) on SegDataModule (data.*) with a Lightning Trainer (trainer.*); "
           "writes the run folder trainer.default_root_dir (as scripts/train.py writes its run_dir).",
    "validate": "Score a model on the fold's validation cases (--ckpt_path: a checkpoint, e.g. last).",
    "test": "Score a model on the dataset's test split: dataset.json 'test' entries with labels, or "
            "imagesTs/ + labelsTs/ beside it; refused when the dataset has none.",
}
# Trainer options that are objects, or that the run folder fixes (its loggers write logs/ inside it)
_NOT_RECORDED = ("callbacks", "logger", "default_root_dir")


class _Trained(pl.Callback):
    """The trainer and module :func:`fit_run` trained, for the CLI object's ``.trainer`` and ``.model``."""

    trainer: Optional[pl.Trainer] = None
    module: Optional[pl.LightningModule] = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.trainer, self.module = trainer, pl_module


class SegAdaptCLI(LightningCLI):
    """LightningCLI whose ``fit`` writes a segadapt run folder into ``trainer.default_root_dir``, whose
    ``validate`` / ``test`` find ``--ckpt_path last`` there, and which parses exactly the argument list it is given.
    """

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in DESCRIPTION}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """scripts/train.py's own settings (every subcommand takes them, so that one config file serves all three)."""
        parser.add_argument("--threads", type=Optional[int], default=None,
                            help="torch threads; null: 1, whatever the machine, as scripts/train.py (results depend "
                                 "on the thread count)")
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="fit: a fresh run may replace the finished run in trainer.default_root_dir")
        parser.add_argument("--checkpoint_every", type=Optional[int], default=50,
                            help="fit: training steps between last.ckpt saves (and one at the end)")
        parser.add_argument("--eval_base", type=bool, default=True,
                            help="fit: also score the untuned network on the fold's validation cases (metrics.json "
                                 "base_val)")

    def parse_arguments(self, parser: LightningArgumentParser, args: Sequence[str]) -> None:
        """Parse `args` (``segadapt`` hands over its own argument list, sys.argv minus the program, so Lightning's
        warning about `args` given together with sys.argv does not apply). A bad option or value is a user
        error: one line (the parsers do not exit, ``exit_on_error=False``), not the 80-line usage."""
        try:
            self.config = parser.parse_args(list(args))
        except ArgumentError as error:
            command = next((a for a in args if a in DESCRIPTION), "")
            raise ValueError(f"segadapt {command}: {' '.join(str(error).split())} (see segadapt {command} --help)") from None

    def _settings(self) -> dict[str, Any]:
        return self.config[self.subcommand]

    def _before_scoring(self) -> None:
        """Threads as for training; ``last.ckpt`` looked up in the run folder (Lightning's default folder is the
        logger's ``version_N``, a new one in every process), and refused when absent: Lightning would score the
        untrained network with a warning."""
        configure_threads(self._settings()["threads"])
        root = self.trainer.default_root_dir
        for callback in self.trainer.checkpoint_callbacks:
            if callback.dirpath is None:
                callback.dirpath = root
        if self._settings().get("ckpt_path") == "last" and not (Path(root) / CHECKPOINT_FILE).is_file():
            raise FileNotFoundError(f"segadapt {self.subcommand} --ckpt_path last: no {CHECKPOINT_FILE} in "
                                    f"trainer.default_root_dir {root}")

    before_validate = before_test = _before_scoring

    def _say_what_was_scored(self) -> None:
        loaded = next((c for c in self.trainer.callbacks if isinstance(c, LoadedCheckpoint)), None)
        if loaded is not None and self.trainer.is_global_zero:
            print(f"segadapt {self.subcommand}: {scored_network(self.trainer.ckpt_path, loaded.step)}")

    after_validate = after_test = _say_what_was_scored

    def fit(self, model: SegAdaptModule, datamodule: SegDataModule, ckpt_path: Optional[str] = None,
            **_: Any) -> None:
        """Train through :func:`fit_run` into the run folder ``trainer.default_root_dir`` (the model, data and
        trainer this CLI built from the config are its arguments; the ones that trained become ``.trainer`` and
        ``.model``). Resuming (``--ckpt_path last``) needs the run's own settings, as with scripts/train.py."""
        settings = self._settings()
        configure_threads(settings["threads"])
        trained = _Trained()
        save_config = [c for c in self.trainer.callbacks if isinstance(c, SaveConfigCallback)]
        run = fit_config(settings)
        result = fit_run(run, ckpt_path=ckpt_path, callbacks=[*self.user_callbacks, *save_config, trained])
        report_summary(format_result(result, settings["trainer"]["default_root_dir"]))
        if trained.trainer is not None:  # None: adapter 'none' (the base is scored, nothing trains)
            self.trainer, self.model = trained.trainer, trained.module

    def instantiate_trainer(self, **kwargs):
        """The trainer, with :class:`StepProgressBar` unless the config disables the bar or names its own."""
        trainer_args = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        self.user_callbacks = list(trainer_args.get("callbacks") or [])  # before Lightning adds its own to the list
        extra = progress_callbacks(trainer_args)
        if extra:
            kwargs["callbacks"] = [*(trainer_args.get("callbacks") or []), *extra]
        return super().instantiate_trainer(**kwargs)


def scored_network(ckpt_path: Optional[str], step: Optional[int]) -> str:
    """Which network a validate / test scored. A run folder's ``last.ckpt`` holds the last step's network; with
    model selection the run's saved network (``adapter.safetensors`` / ``model.safetensors``: what predict and
    export use, and metrics.json ``val``, which scripts/train.py prints) may be an earlier step's."""
    if ckpt_path is None or step is None:
        return "scored the network as the config builds it (no --ckpt_path: no trained weights loaded)"
    text = f"scored {ckpt_path}: the network at step {step}"
    metrics = Path(ckpt_path).parent / METRICS_FILE
    if metrics.is_file():
        run = json.loads(metrics.read_text(encoding="utf-8"))
        selected = (run.get("selection") or {}).get("selected_step")
        if selected is not None and selected != step and run.get("global_step") == step:
            text += (f", the last one; model selection chose step {selected} for the run's saved network (what "
                     f"predict and export use): metrics.json 'val' (Dice {run['val']['dice']:.3f} on the fold's "
                     f"validation cases) is that network, 'val_last' (Dice {run['val_last']['dice']:.3f}) this one")
    return text

def fit_config(settings: Any) -> RunConfig:
    """The planned run (run folder, identity, module / data module / trainer arguments, seed, options) of a
    parsed ``segadapt fit`` config; paths made absolute and the preprocessing written out in full, as
    scripts/train.py records them. The trainer arguments are those the config sets (others keep Lightning's
    defaults); a logger or another object-valued option is refused (the run folder has its own logs)."""
    trainer = settings["trainer"].as_dict()
    run_dir = trainer["default_root_dir"]
    if run_dir is None:
        raise ValueError("segadapt fit: give the run folder to write, --trainer.default_root_dir DIR "
                         "(e.g. runs/cli/<dataset>/<method>/fold0)")
    if trainer["logger"] not in (None, True):
        raise ValueError("segadapt fit: trainer.logger is not taken; the run folder has its own logs "
                         "(logs/metrics.csv, TensorBoard events)")
    defaults = {k: p.default for k, p in inspect.signature(pl.Trainer.__init__).parameters.items()}
    trainer_kwargs = {k: v for k, v in trainer.items() if k not in _NOT_RECORDED and v != defaults.get(k)}
    for key, value in trainer_kwargs.items():
        if isinstance(value, dict):
            raise ValueError(f"segadapt fit: trainer.{key} must be a plain value (it is recorded in the run "
                             f"folder's config.yaml), got an object: {value}")
    seed = settings["seed_everything"]
    if isinstance(seed, bool):
        raise ValueError("segadapt fit: seed_everything must be a number (the run folder records its seed)")
    module, data = settings["model"].as_dict(), settings["data"].as_dict()
    if module.get("base_checkpoint"):
        module["base_checkpoint"] = str(Path(module["base_checkpoint"]).resolve())
    data["dataset_json"] = str(Path(data["dataset_json"]).resolve())
    if data.get("splits_path"):
        data["splits_path"] = str(Path(data["splits_path"]).resolve())
    data["preprocess"] = PreprocessConfig.from_dict(dict(data.get("preprocess") or {})).to_dict()
    return RunConfig(
        run_dir=run_dir,
        identity={"experiment": "cli", "method": tuning_name(module["adapter"]), "fold": data["fold"],
                  "dataset": Path(data["dataset_json"]).parent.name},
        module=module, datamodule=data, trainer=trainer_kwargs, seed=int(seed),
        overwrite=settings["overwrite"], checkpoint_every=settings["checkpoint_every"], eval_base=settings["eval_base"])


def lightning_cli(argv: Sequence[str]) -> SegAdaptCLI:
    """Run ``segadapt fit|validate|test ...`` (`argv` starts with the subcommand); returns the CLI object."""
    return SegAdaptCLI(
        SegAdaptModule,
        SegDataModule,
        args=list(argv),
        seed_everything_default=0,
        trainer_defaults={"callbacks": [ModelCheckpoint(save_last=True, save_top_k=0), LoadedCheckpoint()]},
        # not config.yaml: with trainer.logger false the log folder is the run folder, whose config.yaml is segadapt's
        save_config_kwargs={"overwrite": True, "config_filename": "lightning_config.yaml"},
        parser_kwargs={"prog": "segadapt", "exit_on_error": False,
                       **{name: {"description": text, "exit_on_error": False} for name, text in DESCRIPTION.items()}},
        auto_configure_optimizers=False,
    )
