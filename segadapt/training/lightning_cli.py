"""``segadapt fit|validate|test``: Lightning's CLI over :class:`SegAdaptModule` and :class:`SegDataModule`.

The options and their help come from the two classes' ``__init__`` signatures and docstrings (jsonargparse);
``segadapt fit --print_config`` prints a complete YAML, ``configs/cli/fit.yaml`` is an example. The module
builds its own optimiser (AdamW, warm-up, cosine: ``model.lr`` ...), so LightningCLI's ``--optimizer`` /
``--lr_scheduler`` options are not offered.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from .callbacks import ExportWeights, TrainStats, progress_callbacks
from .datamodule import SegDataModule
from .module import SegAdaptModule

DESCRIPTION = {
    "fit": "Train one fold: SegAdaptModule (model.*) on SegDataModule (data.*) with a Lightning Trainer (trainer.*).",
    "validate": "Score a model on the fold's validation cases (--ckpt_path: a checkpoint, e.g. last).",
    "test": "Score a model on the dataset's test split: dataset.json 'test' entries with labels, or "
            "imagesTs/ + labelsTs/ beside it; refused when the dataset has none.",
}


class SegAdaptCLI(LightningCLI):
    """LightningCLI that keeps ``last.ckpt`` in ``<default_root_dir>/checkpoints``, and parses exactly the
    argument list it is given.

    Lightning's default folder is the logger's ``version_N``, a new one in every process, so a later
    ``--ckpt_path last`` would find nothing and silently start again from step 0.
    """

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in DESCRIPTION}

    def parse_arguments(self, parser: LightningArgumentParser, args: Sequence[str]) -> None:
        # `segadapt` hands over its own argument list (sys.argv minus the program): Lightning's warning about
        # `args` given together with sys.argv is about a different use and does not apply
        self.config = parser.parse_args(list(args))

    def _fixed_checkpoint_folder(self) -> None:
        for callback in self.trainer.checkpoint_callbacks:
            if callback.dirpath is None:
                callback.dirpath = os.path.join(self.trainer.default_root_dir, "checkpoints")

    before_fit = before_validate = before_test = _fixed_checkpoint_folder

    def instantiate_trainer(self, **kwargs):
        """The trainer, with :class:`StepProgressBar` unless the config disables the bar or names its own."""
        trainer_args = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        extra = progress_callbacks(trainer_args)
        if extra:
            kwargs["callbacks"] = [*(trainer_args.get("callbacks") or []), *extra]
        return super().instantiate_trainer(**kwargs)


def lightning_cli(argv: Sequence[str]) -> SegAdaptCLI:
    """Run ``segadapt fit|validate|test ...`` (`argv` starts with the subcommand); returns the CLI object."""
    return SegAdaptCLI(
        SegAdaptModule,
        SegDataModule,
        args=list(argv),
        seed_everything_default=0,
        trainer_defaults={"callbacks": [ModelCheckpoint(save_last=True, save_top_k=0), TrainStats(), ExportWeights()]},
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "segadapt", **{name: {"description": text} for name, text in DESCRIPTION.items()}},
        auto_configure_optimizers=False,
    )
