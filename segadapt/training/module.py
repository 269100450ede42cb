"""The LightningModule: a segmentation network, tuned by an adapter or a baseline, validated on whole volumes.

How the network is tuned (``adapter``):

=============  ===========================================================================
``{...}``      :class:`~segadapt.adapters.AdapterConfig` fields: the base is loaded from
               ``base_checkpoint`` and frozen; the adapter is injected into ``targets`` (default:
               the layers of the model preset ``preset``, e.g. ``all_conv``); only it trains.
``"none"``     the pretrained base as is, nothing trains (validate / test only).
``"full"``     standard fine-tuning: the pretrained base, every parameter trains.
``"decoder"``  standard fine-tuning of the layers of ``preset`` only (e.g. ``decoder``).
``"norms"``    only the affine parameters of the normalisation layers train (and a new head).
``"scratch"``  random initialisation (``base_checkpoint`` ignored), every parameter trains.
=============  ===========================================================================

Training: MONAI ``DiceCELoss`` on slices or patches (+ ``reg_weight`` x the adapters' regulariser, e.g.
TLoRA's identity term), AdamW over the trainable parameters only, linear warm-up then cosine decay per
step. Validation/test: whole volumes -- the multi-view UNet's fused ``predict_volume``, any other network
through MONAI sliding-window inference (a 2D network slice by slice), with ``tta`` the mean over the flips
along ``mirror_axes`` (nnU-Net's test-time mirroring) -- mapped back onto each case's file
grid (``Invertd`` through the data module's pipeline) and scored against the label file as read: per-case
Dice, HD95 (mm), predicted and true lesion volume (mL) (:mod:`segadapt.training.metrics`), logged as ``val/<name>``
(``test/<name>``); the per-case rows of the last epoch are kept in :attr:`SegAdaptModule.case_rows`, and
outside fitting the voxel counts that choose the postprocessing in :attr:`SegAdaptModule.component_counts`
(:mod:`segadapt.training.postprocessing`).
"""

from __future__ import annotations

import itertools
import math
import re
from typing import Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only
import torch
import torch.distributed as dist
from monai.data import MetaTensor, decollate_batch
from monai.inferers import SliceInferer, sliding_window_inference
from monai.losses import DiceCELoss

from segadapt.adapters import AdapterConfig, eva_init, eva_pending, inject, norm_layers, regularization_loss
from segadapt.data import AXIS_VIEWS, SLICE_AXES, DatasetDescription, invert_transform, load_dataset_json, make_loader
from segadapt.data.transforms import FLIP_AXES
from segadapt.models import build_model, logits_to_probabilities, model_spec, preset_targets
from segadapt.models.presets import default_train_modules, head_modules
from segadapt.models.pretrained import load_base

from .metrics import bin_labels, case_metrics, summarize
from .postprocessing import component_counts

BASELINES = ("none", "full", "decoder", "norms", "scratch")
DEFAULT_BINS_ML = (0.0, 5.0, 15.0, 30.0, math.inf)


def _plain(x: torch.Tensor) -> torch.Tensor:
    """A MONAI MetaTensor as a plain tensor: metadata tracking on every op slows training many times over."""
    return x.as_tensor() if isinstance(x, MetaTensor) else x


def tuning_name(adapter: Union[str, dict]) -> str:
    """The baseline name, or the adapter method (``cp_lora``, ...)."""
    if isinstance(adapter, str):
        if adapter not in BASELINES:
            raise ValueError(f"unknown baseline {adapter!r}: give one of {BASELINES} or a dict of AdapterConfig fields")
        return adapter
    return str(dict(adapter).get("method", AdapterConfig.method))


def check_classes(out_channels: object, description: DatasetDescription) -> None:
    """Refuse a network head that cannot hold the dataset's declared classes (labels, background included): one
    output channel (sigmoid) learns exactly one foreground class, C channels (softmax) at most C classes.

    Labels reach the loss as class indices (:func:`segadapt.data.loading.label_classes`), so ``{0: background,
    2: lesion}`` is a binary dataset. The head is not silently rebuilt for more classes: ``out_channels`` also
    decides the loss (sigmoid or softmax), the threshold and what predictions mean, so the user chooses it.
    ``out_channels`` that is not an integer (e.g. ``auto`` before the plan fills it) is not checked."""
    if isinstance(out_channels, bool) or not isinstance(out_channels, int):
        return
    classes = len(description.labels)
    if (out_channels == 1 and classes > 2) or classes > out_channels > 1:
        head = "a one-channel (sigmoid) head learns one foreground class" if out_channels == 1 else \
            f"a {out_channels}-class head cannot hold them"
        raise ValueError(f"{description.path} declares {classes} classes {description.labels} but "
                         f"model.kwargs.out_channels={out_channels}: {head}; set model.kwargs.out_channels={classes} "
                         "(a new head where the base has another class count) or merge the foreground labels "
                         "into one (segadapt.data.remap_label_file)")


def _heads(net: torch.nn.Module) -> list[str]:
    try:
        return head_modules(net)
    except TypeError:  # a model family without known heads loads strictly
        return []


def _with(pattern: Union[None, str, list], names: list[str], subtree: bool = False) -> Union[str, list]:
    """A targets-style pattern (regex or suffix list) that also selects the modules ``names`` (with
    ``subtree``: and every module inside them)."""
    if not subtree and not isinstance(pattern, str):
        return [*(pattern or []), *[n for n in names if n not in (pattern or [])]]
    if isinstance(pattern, str):
        parts = [f"(?:{pattern})"]
    else:  # a suffix list as a regex (segadapt.adapters.config.name_matches)
        parts = [rf"(?:.*\.)?{re.escape(suffix)}" for suffix in pattern or []]
    tail = r"(?:\..*)?" if subtree else ""
    return "|".join([*parts, *(re.escape(n) + tail for n in names)])


class SegAdaptModule(pl.LightningModule):
    """Network + tuning + loss + whole-volume metrics, from plain values (Hydra, YAML and LightningCLI).

    Args:
        model: a name of :data:`segadapt.models.MODELS` (``multiview_unet``, ``unet3d``, ``dynunet``, ``vit_seg``, ...).
        model_kwargs: the builder's keyword arguments (``in_channels`` must match the data).
        base_checkpoint: pretrained weights of the whole network (loaded strictly); needed unless
            ``adapter='scratch'``.
        adapter: a baseline name or a dict of AdapterConfig fields (see the module docstring).
        preset: model preset (``segadapt.models.preset_targets``) of the layers an adapter without
            ``targets`` adapts, or that ``adapter='decoder'`` fine-tunes.
        lr: AdamW learning rate (the peak, after the warm-up).
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up from lr/100, then cosine decay to 0 at the last step.
        loss: ``monai.losses.DiceCELoss`` keyword arguments (sigmoid/softmax are set from the output channels).
        reg_weight: weight of ``segadapt.adapters.regularization_loss`` in the loss.
        volume_bins_ml: edges of the lesion-volume bins (mL) for Dice per bin (default 0, 5, 15, 30, inf).
        threshold: foreground probability threshold (one output channel); argmax otherwise.
        slice_batch_size: slices per UNet call in the multi-view volume prediction.
        roi_size: window of MONAI sliding-window inference for networks other than the multi-view UNet
            (e.g. ``[96, 96, 96]``; a 2D ``roi_size`` on 3D volumes: slice by slice, axially).
        sw_batch_size: windows per network call in sliding-window inference.
        overlap: overlap of neighbouring windows in sliding-window inference (0 .. 1, Gaussian-weighted).
        tta: test-time mirroring: the whole-volume probabilities are the mean over the flips along
            ``mirror_axes`` (False: the plain prediction; a run from before it existed stores none).
        mirror_axes: the spatial axes to mirror along; None: those segadapt's training augmentation flips
            (``segadapt.data.transforms.FLIP_AXES``; a run records ``flip_axes`` of its preprocessing).
    """

    def __init__(
        self,
        model: str = "multiview_unet",
        model_kwargs: Optional[dict] = None,
        base_checkpoint: Optional[str] = None,
        adapter: Union[str, dict] = "none",
        preset: Optional[str] = "all_conv",
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        warmup_steps: int = 0,
        loss: Optional[dict] = None,
        reg_weight: float = 0.0,
        volume_bins_ml: Optional[list[float]] = None,
        threshold: float = 0.5,
        slice_batch_size: int = 32,
        roi_size: Optional[list[int]] = None,
        sw_batch_size: int = 4,
        overlap: float = 0.25,
        tta: bool = False,
        mirror_axes: Optional[list[int]] = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.bins = list(DEFAULT_BINS_ML if volume_bins_ml is None else volume_bins_ml)
        try:
            bin_labels(self.bins)  # bad edges refused now, not once training is over
        except ValueError as error:
            raise ValueError(f"volume_bins_ml: {error}") from None
        self.tuning = tuning_name(adapter)
        self.net = build_model(model, **dict(model_kwargs or {}))
        self.multi_view = model_spec(model).multi_view  # slices with their views; volumes by net.predict_volume
        self.new_heads: list[str] = []
        if self.tuning != "scratch":
            if base_checkpoint is None:
                raise ValueError(f"adapter {self.tuning!r} tunes a pretrained network: give base_checkpoint "
                                 "(or adapter='scratch' for random initialisation)")
            # a target with another class count gets a new head (heads: the modules whose shapes follow it)
            self.new_heads, detail = load_base(self.net, base_checkpoint, _heads(self.net))
            if self.new_heads:
                rank_zero_only(print)(f"new head: {', '.join(self.new_heads)} built afresh for this target's classes "
                                      f"(the base has another class count: {detail}); trained in full")
        self._set_trainable(adapter, preset)
        out_channels = int(dict(model_kwargs or {}).get("out_channels", 1))
        binary = out_channels == 1
        self.loss_fn = DiceCELoss(sigmoid=binary, softmax=not binary, to_onehot_y=not binary, **dict(loss or {}))
        self.case_rows: list[dict] = []
        self._rows: list[dict] = []
        # case id -> per-class voxel counts without / with the largest component (segadapt.training.postprocessing),
        # of the last validation or test run outside fitting
        self.component_counts: dict[str, list[dict]] = {}

    def _set_trainable(self, adapter: Union[str, dict], preset: Optional[str]) -> None:
        if self.tuning in ("full", "scratch"):
            return
        if isinstance(adapter, str):  # 'none', 'decoder' or 'norms'
            self.net.requires_grad_(False)
            if self.tuning == "none" and self.new_heads:
                raise ValueError(f"adapter='none' evaluates the base as is, but {', '.join(self.new_heads)} would be "
                                 "untrained (the base has another class count): train an adapter or a baseline")
            if self.tuning == "decoder":
                if preset is None:
                    raise ValueError("adapter='decoder' fine-tunes the layers of a model preset: give preset (e.g. 'decoder')")
                for name in [*preset_targets(self.net, preset), *self.new_heads]:
                    self.net.get_submodule(name).requires_grad_(True)
            if self.tuning == "norms":
                if not norm_layers(self.net):
                    raise ValueError(f"adapter='norms': {type(self.net).__name__} has no normalisation layer with "
                                     "affine parameters to train (e.g. InstanceNorm without affine)")
                for name in [*norm_layers(self.net), *self.new_heads]:
                    self.net.get_submodule(name).requires_grad_(True)
            return
        fields = dict(adapter)
        if not fields.get("targets"):
            if preset is None:
                raise ValueError("the adapter has no targets and no preset names the layers to adapt")
            fields["targets"] = preset_targets(self.net, preset)
        if "train_modules" not in fields:  # the model family's default (absent, not null / [])
            fields["train_modules"] = default_train_modules(self.net)
        if self.new_heads:  # a new head trains in full, whatever the config says, and is not adapted
            fields["train_modules"] = _with(fields.get("train_modules"), self.new_heads)
            fields["exclude"] = _with(fields.get("exclude"), self.new_heads, subtree=True)
        inject(self.net, AdapterConfig.from_dict(fields))

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.net.parameters() if p.requires_grad)

    # ---- training -------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """``init="eva"`` adapters get their down factors from the first 4 training batches here, before
        the optimiser and DDP (which broadcasts rank 0's weights) see the parameters. A data module's dataset
        whose classes the head cannot hold is refused (:func:`check_classes`)."""
        dataset_json = getattr(getattr(getattr(self, "trainer", None), "datamodule", None), "hparams", {}).get("dataset_json")
        if dataset_json is not None:
            check_classes(self.hparams.model_kwargs.get("out_channels", 1) if self.hparams.model_kwargs else 1,
                          load_dataset_json(dataset_json))
        if stage == "fit" and eva_pending(self.net):
            batches = itertools.islice(self.trainer.datamodule.train_dataloader(), 4)
            eva_init(self.net, lambda: [self(_plain(b["image"]), b.get("view")) for b in batches])

    def forward(self, image: torch.Tensor, view: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits of training samples: slices (with their ``view``) for the multi-view UNet, else patches."""
        if self.multi_view:
            views = None if view is None else [AXIS_VIEWS[int(v)] for v in view]  # RandSliced's 'view': the normal axis
            return self.net(image, views)
        return self.net(image)

    def _loss(self, logits: torch.Tensor | list[torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        if isinstance(logits, (list, tuple)):  # nnU-Net deep supervision: full resolution first
            return self._deep_supervision_loss(logits, label)
        if logits.ndim == label.ndim + 1:  # DynUNet deep supervision: (B, heads, C, ...), weights 1/2^i
            weights = [0.5**i for i in range(logits.shape[1])]
            return sum(w * self.loss_fn(logits[:, i], label) for i, w in enumerate(weights)) / sum(weights)
        return self.loss_fn(logits, label)

    def _deep_supervision_loss(self, outputs: list[torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        """nnU-Net's ``DeepSupervisionWrapper``: the label downsampled (nearest) to each output's size, weights
        1/2^i normalised to sum 1, the lowest resolution's weight 0 (``nnUNetTrainer._build_loss``)."""
        weights = [0.5**i for i in range(len(outputs))]
        if len(weights) > 1:
            weights[-1] = 0.0
        total = sum(weights)
        loss = 0.0
        for output, weight in zip(outputs, weights):
            if weight:
                target = label if output.shape[2:] == label.shape[2:] else \
                    torch.nn.functional.interpolate(label.float(), size=output.shape[2:], mode="nearest-exact")
                loss = loss + weight / total * self.loss_fn(output, target)
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        image, label = _plain(batch["image"]), _plain(batch["label"])
        loss = self._loss(self(image, batch.get("view")), label)
        if self.hparams.reg_weight:
            loss = loss + self.hparams.reg_weight * regularization_loss(self.net).to(loss)
        self.log("train/loss", loss, prog_bar=True, batch_size=image.shape[0])
        return loss

    def configure_optimizers(self) -> dict:
        params = [p for p in self.net.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"adapter {self.tuning!r} leaves no trainable parameter: use validate/test, not fit")
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            return {"optimizer": optimizer}
        warmup = min(self.hparams.warmup_steps, max(int(total) - 1, 0))
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(int(total) - warmup, 1))
        if warmup:
            ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=warmup)
            scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])
        else:
            scheduler = cosine
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- whole-volume evaluation ----------------------------------------------------------------
    @torch.no_grad()
    def predict_probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """Probabilities ``(B, out_channels, *spatial)`` of whole volumes (or whole 2D images).

        With ``tta`` (nnU-Net's test-time mirroring), the mean over the 2^k subsets F of the k ``mirror_axes``

            p(x) = 1/2^k sum_F flip_F(p_plain(flip_F(x))),

        else ``p_plain`` (:meth:`plain_probabilities`). The multi-view UNet mirrors the volume before slicing,
        as its training flips it. Written here because MONAI has no deterministic mirroring for whole-volume
        inference (``monai.data.TestTimeAugmentation`` draws random transforms, one case dict at a time).
        """
        mirror = FLIP_AXES if self.hparams.mirror_axes is None else self.hparams.mirror_axes
        axes = [2 + int(a) for a in mirror] if self.hparams.tta else []
        total = None
        for flips in itertools.chain.from_iterable(itertools.combinations(axes, n) for n in range(len(axes) + 1)):
            probabilities = self.plain_probabilities(image.flip(flips) if flips else image)
            probabilities = probabilities.flip(flips) if flips else probabilities
            total = probabilities if total is None else total.add_(probabilities)
        return total / 2 ** len(axes)

    @torch.no_grad()
    def plain_probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """Probabilities of whole volumes without mirroring.

        Multi-view UNet: its fused volume prediction. Otherwise MONAI sliding-window inference with
        ``roi_size``; a 2D ``roi_size`` on a 3D volume runs a 2D network slice by slice along the axial
        axis (``monai.inferers.SliceInferer``).
        """
        if self.multi_view:
            return self.net.predict_volume(image, slice_batch_size=self.hparams.slice_batch_size).float()
        roi = self.hparams.roi_size
        if roi is None:
            raise ValueError(f"roi_size is needed for sliding-window inference with {type(self.net).__name__}")
        window = dict(roi_size=roi, sw_batch_size=self.hparams.sw_batch_size, overlap=self.hparams.overlap, mode="gaussian")
        if len(roi) == image.ndim - 3:
            logits = SliceInferer(spatial_dim=SLICE_AXES["axial"], **window)(image, self.net)
        else:
            logits = sliding_window_inference(image, predictor=self.net, **window)
        return logits_to_probabilities(logits.float())

    def foreground(self, probabilities: torch.Tensor) -> torch.Tensor:
        """Lesion mask ``(B, *spatial)``: p > threshold (one channel) or argmax > 0."""
        return self.label_map(probabilities) > 0

    def label_map(self, probabilities: torch.Tensor) -> torch.Tensor:
        """Class map ``(B, *spatial)``: p > threshold (one channel: 0/1) or the argmax class."""
        if probabilities.shape[1] == 1:
            return (probabilities[:, 0] > self.hparams.threshold).long()
        return probabilities.argmax(dim=1)

    def _components(self, labels: torch.Tensor, truth: torch.Tensor) -> dict:
        """``{"components": counts}`` for choosing the postprocessing (:func:`component_counts`) in a validation
        or test outside fitting (the one that scores the fold), else ``{}``."""
        if self.trainer.state.fn == "fit":
            return {}
        return {"components": component_counts(labels, truth, max(int(self.net_out_channels), 2) - 1)}

    @property
    def net_out_channels(self) -> int:
        return int(dict(self.hparams.model_kwargs or {}).get("out_channels", 1))

    def _evaluate(self, batch: dict) -> None:
        """Per-case metrics on the file grid of each case: the probabilities go back through the data
        module's validation pipeline (orientation, resampling and crop undone) and are scored against the
        label file. Without a data module pipeline (bare dataloaders): on the preprocessed grid."""
        image, label = batch["image"], batch["label"]
        probabilities = self.predict_probabilities(_plain(image)).float().cpu()
        pipeline = getattr(getattr(self.trainer, "datamodule", None), "val_pipeline", None)
        unit = getattr(getattr(self.trainer, "datamodule", None), "size_unit", None)  # sizes named by unit (px, mm^2)
        if pipeline is None:
            affines = image.affine if image.affine.ndim == 3 else image.affine[None]
            labels = self.label_map(probabilities)
            for b in range(image.shape[0]):
                truth = _plain(label[b, 0]).cpu()
                self._rows.append({"case_id": str(batch["case_id"][b]),
                                   **case_metrics(labels[b] > 0, truth, affines[b], unit),
                                   **self._components(labels[b], truth)})
            return
        to_file_grid = invert_transform(pipeline, keys="pred")
        for item, p in zip(decollate_batch(batch), probabilities):
            item["pred"] = MetaTensor(p)
            restored = to_file_grid(item)["pred"]
            truth = self._read_label(item["label"].meta["filename_or_obj"])
            labels = self.label_map(restored.as_tensor()[None])[0]
            self._rows.append({"case_id": str(item["case_id"]), **case_metrics(labels > 0, truth[0], restored.affine, unit),
                               **self._components(labels, truth[0])})

    @staticmethod
    def _read_label(path: str) -> torch.Tensor:
        return _plain(make_loader("label")({"label": path})["label"])

    def _log_epoch(self, stage: str) -> None:
        rows = self._rows
        if self.trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            gathered: list[list[dict]] = [[] for _ in range(self.trainer.world_size)]
            dist.all_gather_object(gathered, rows)
            rows = list({r["case_id"]: r for part in gathered for r in part}.values())  # drop sampler padding
        self.case_rows, self._rows = sorted(rows, key=lambda r: r["case_id"]), []
        self.component_counts = {r["case_id"]: r.pop("components") for r in self.case_rows if "components" in r}
        if rows:
            summary = summarize(self.case_rows, self.bins)
            # every rank holds the same gathered summary; sync_dist averages equal values (and says so to Lightning)
            self.log_dict({f"{stage}/{k}": v for k, v in summary.items() if k != "dice"}, sync_dist=True)
            self.log(f"{stage}/dice", summary["dice"], prog_bar=True, sync_dist=True)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch)

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")
