"""The fold ensemble: the K adapters of a run on one shared base -> probabilities and a mask on the input's grid.

One frozen base network holds the K fold adapters side by side (``segadapt.adapters.load_adapter`` under
the names ``m0 .. m{K-1}``). A scan is preprocessed once with the preprocessing saved in the run
(``segadapt.data.inference_transforms``); each adapter in turn is folded into the weights
(:func:`segadapt.adapters.fold.folded`, a temporary merge that puts the base weights back bit for bit) and
predicts whole-volume probabilities (multi-view fusion or MONAI sliding window, exactly as in validation:
``SegAdaptModule.predict_probabilities``); the K probability volumes are averaged,

    p(x) = 1/K sum_k p_k(x),

and ``segadapt.data.invert_transform`` maps the mean back onto the input's grid (orientation, spacing
and crop undone): the mask has the input's shape and affine. Memory: one base + K adapters (+ one
adapter's folded weights while it runs). ``scripts/benchmark_ensemble.py`` measures it against K
separate models.

Each model's probabilities are test-time mirrored when its run was trained so (``tta`` in the run config).
The mask keeps only the largest connected component of the classes the runs chose on their validation
cases (``postprocessing`` in metrics.json, decided once on the folds' pooled cases: :func:`segadapt.training.postprocessing.recorded_postprocessing`).

The network is built here from the run config (``SegAdaptModule`` with no adapter, on the run's or ``--base``'s
checkpoint), not with ``segadapt.training.load.load_run``: the ensemble loads K adapters under their own names
(or K whole-network weight files) onto one base, from run folders or loose adapter files, with ``--force``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose
from monai.utils import TraceKeys

from segadapt.adapters import load_adapter
from segadapt.adapters.fold import folded
from segadapt.data import PreprocessConfig, inference_transforms, invert_transform, load_dataset_json
from segadapt.models.pretrained import read_state_dict
from segadapt.runs import ADAPTER_FILE, CONFIG_FILE, WEIGHTS_FILE, read_run_config
from segadapt.training import SegAdaptModule
from segadapt.training.metrics import voxel_volume_ml
from segadapt.training.postprocessing import chosen_classes, keep_largest_component, recorded_postprocessing
from segadapt.runs import FINGERPRINT_FILE, expand_ensembles, open_run, read_metrics

from .domain import TrainingDomain
from .inputs import check_threshold, dicom_modality, input_name, is_pixel_file, resolve_device

log = logging.getLogger(__name__)


def _root_cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None:
        error = error.__cause__
    return error


@dataclass
class Prediction:
    """One scan's prediction on the input's own grid.

    Attributes:
        source: the input file or DICOM folder.
        probabilities: (C, *shape) float32, the ensemble mean (C = 1: foreground probability).
        mask: (*shape) uint8 label map: p > threshold (C = 1) or the argmax class.
        affine: (4, 4) voxel -> RAS mm of the input (equal to the input's).
        volume_ml: lesion (mask > 0) volume in mL (3D inputs; for 2D see :attr:`area_mm2`).
        warnings: how the input differs from the training data (:meth:`TrainingDomain.check`), one line each.
        resampled_to: the spacing (mm) the input was resampled to for the network, or None (its own grid).
    """

    source: Path
    probabilities: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    volume_ml: float
    warnings: list[str] = field(default_factory=list)
    resampled_to: Optional[list[float]] = None

    @property
    def spatial_dims(self) -> int:
        return self.mask.ndim

    @property
    def area_mm2(self) -> float:
        """Lesion area in mm^2 of a 2D input: pixels x |det A| (A the 2x2 pixel-to-mm part of the affine)."""
        if self.spatial_dims != 2:
            raise ValueError(f"{self.source}: area_mm2 is for 2D inputs; this one is {self.spatial_dims}D (volume_ml)")
        return float(self.voxels) * abs(float(np.linalg.det(np.asarray(self.affine, dtype=np.float64)[:2, :2])))

    @property
    def area_px(self) -> int:
        """Lesion area in pixels of a 2D image file (PNG, JPEG, BMP, TIFF: no pixel spacing), else ValueError."""
        if self.spatial_dims != 2 or not is_pixel_file(self.source):
            raise ValueError(f"{self.source}: area_px is for 2D image files; use area_mm2 or volume_ml")
        return self.voxels

    @property
    def voxels(self) -> int:
        return int(np.count_nonzero(self.mask))


class Predictor:
    """A base network with K adapters (K >= 0), the preprocessing of its run, and the fold-ensemble mean.

    Args:
        config: a run's ``config.yaml`` (:func:`segadapt.training.read_run_config`): ``module`` gives the
            network, its base checkpoint and inference settings, ``datamodule.preprocess`` the preprocessing.
        adapters: adapter files (``adapter.safetensors``) made on that base; each is loaded under its own
            name and their probabilities are averaged. None: the base alone.
        base: base checkpoint to use instead of ``config['module']['base_checkpoint']``.
        device: ``'cpu'``, ``'cuda'``, ... (default: CUDA when available).
        threshold: foreground probability threshold in (0, 1) (default: the run's).
        strict: refuse an adapter made on a base with other weights (False: load it with a warning).
        domain: the training data (a run's ``fingerprint.json``) inputs are checked against and resampled to;
            None: no checks, inputs used on their own grid unless the preprocessing resamples.
        networks: whole-network weight files (``model.safetensors`` of full / decoder / scratch fold runs) of
            the config's network, loaded into it in turn; their probabilities are averaged (no adapters then).
        postprocessing: per foreground class, whether the mask keeps only its largest connected component
            (the runs' choice: :func:`recorded_postprocessing`); empty: none.

    Raises:
        FileNotFoundError: the base checkpoint or an adapter file is missing.
        ValueError: an adapter file was made for another base (the message names the first differing
            module, or says the weights differ), a threshold outside (0, 1), a device that is not there.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        adapters: Sequence[str | os.PathLike] = (),
        base: Optional[str | os.PathLike] = None,
        device: Optional[str] = None,
        threshold: Optional[float] = None,
        strict: bool = True,
        domain: Optional[TrainingDomain] = None,
        networks: Sequence[str | os.PathLike] = (),
        postprocessing: Sequence[bool] = (),
    ) -> None:
        self.device = resolve_device(device)
        self.postprocessing = [bool(p) for p in postprocessing]
        self.domain = domain
        if threshold is not None:
            check_threshold(threshold)
        module_args = dict(config["module"])
        base = base if base is not None else module_args.get("base_checkpoint")
        if base is None or not Path(base).is_file():
            raise FileNotFoundError(f"base checkpoint not found: {base} (set by the run config's "
                                    "module.base_checkpoint; give another with --base)")
        self.config = config
        self.base = Path(base)
        self.preprocess = PreprocessConfig.from_dict(dict(config["datamodule"]["preprocess"]))
        self.module = SegAdaptModule(**{**module_args, "adapter": "none", "base_checkpoint": str(base)})
        in_channels = int(module_args.get("model_kwargs", {}).get("in_channels", self.preprocess.in_channels))
        self.channels = max(in_channels // self.preprocess.in_channels, 1)  # image channels before windowing
        self.adapters = [Path(a) for a in adapters]
        if networks and self.adapters:
            raise ValueError("a fold ensemble is either adapters on one base or whole networks, not both")
        self.networks = [read_state_dict(n) for n in networks]  # checked against the network here, not mid-scan
        for state in self.networks:
            self.module.net.load_state_dict(state)
        self.members = [f"m{i}" for i in range(len(self.adapters))]
        for name, path in zip(self.members, self.adapters):
            load_adapter(self.module.net, path, name=name, active=False, strict=strict)
        self.threshold = check_threshold(self.module.hparams.threshold if threshold is None else threshold)
        classes = max(int(module_args.get("model_kwargs", {}).get("out_channels", 1)), 2) - 1
        if self.postprocessing and len(self.postprocessing) != classes:
            raise ValueError(f"the runs' postprocessing (metrics.json) is for {len(self.postprocessing)} class(es); "
                             f"the network has {classes} foreground class(es)")
        self.module.to(self.device).eval()

    @classmethod
    def from_runs(cls, runs: Sequence[str | os.PathLike], base: Optional[str | os.PathLike] = None,
                  device: Optional[str] = None, threshold: Optional[float] = None, strict: bool = True) -> Predictor:
        """The fold ensemble of run folders (each ``config.yaml`` + ``adapter.safetensors``) on their shared base.

        An ensemble folder (``ensemble.json``, chosen by ``segadapt auto``) stands for its member runs; the
        postprocessing is the one recorded in the given folders' ``metrics.json``.
        Runs without an adapter file: a full / decoder / scratch run's ``model.safetensors`` is the network
        (several such runs: each fold's own network, probabilities averaged); a single ``none`` run is its base.

        Raises:
            FileNotFoundError: a run folder without ``config.yaml``, or an unfinished run.
            ValueError: the runs differ in network, base checkpoint or preprocessing.
        """
        given = [Path(r) for r in runs]
        if not given:
            raise ValueError("give at least one run folder")
        runs = expand_ensembles(given)  # an ensemble folder (segadapt auto): its members, each one member here
        configs = [open_run(r) for r in runs]
        for run, config in zip(runs[1:], configs[1:]):
            pairs = [(f"module.{k}", config["module"].get(k), configs[0]["module"].get(k))
                     for k in ("model", "model_kwargs", "base_checkpoint")]
            pairs.append(("datamodule.preprocess", config["datamodule"]["preprocess"], configs[0]["datamodule"]["preprocess"]))
            for key, value, first in pairs:
                if value != first:
                    raise ValueError(f"runs {runs[0]} and {run} differ in {key} ({first!r} vs {value!r}); "
                                     "a fold ensemble shares one base network and one preprocessing")
        adapters = [run / ADAPTER_FILE for run in runs]
        missing = [run for run, a in zip(runs, adapters) if not a.is_file()]
        domain = run_domain(runs[0])
        weights = [run / WEIGHTS_FILE for run in runs]
        if len(runs) == 1 and missing:
            if weights[0].is_file() or configs[0]["run"].get("tuning") == "none":
                return cls(configs[0], (), weights[0] if weights[0].is_file() else base, device, threshold, strict, domain,
                           postprocessing=recorded_postprocessing(given))
        if len(missing) == len(runs) and all(w.is_file() for w in weights):  # full / decoder / scratch fold runs
            return cls(configs[0], (), weights[0], device, threshold, strict, domain, networks=weights,
                       postprocessing=recorded_postprocessing(given))
        if missing:
            raise FileNotFoundError(f"run folder {missing[0]} has no {ADAPTER_FILE} (unfinished run, or a fold "
                                    "ensemble that mixes adapter runs with full/decoder/scratch runs)")
        return cls(configs[0], adapters, base, device, threshold, strict, domain,
                   postprocessing=recorded_postprocessing(given))

    @classmethod
    def from_adapter_files(cls, adapters: Sequence[str | os.PathLike], run_config: Optional[str | os.PathLike] = None,
                           base: Optional[str | os.PathLike] = None, device: Optional[str] = None,
                           threshold: Optional[float] = None, strict: bool = True) -> Predictor:
        """Adapter files on one base; network and preprocessing from `run_config` (a ``config.yaml`` or its
        run folder; default: the folder of the first adapter file)."""
        if not adapters:
            raise ValueError("give at least one adapter file")
        source = Path(run_config) if run_config is not None else Path(adapters[0]).parent
        run_dir = source.parent if source.name == CONFIG_FILE else source
        for adapter in map(Path, adapters):  # a run folder's own adapter file: only once the run finished
            if adapter.name == ADAPTER_FILE and (adapter.parent / CONFIG_FILE).is_file():
                read_metrics(adapter.parent)
        return cls(read_run_config(run_dir), adapters, base, device, threshold, strict, run_domain(run_dir),
                   postprocessing=recorded_postprocessing([Path(a).parent for a in adapters]))

    @property
    def description(self) -> str:
        module = self.config["module"]
        members = f"{len(self.members)} adapter(s)" if self.members else (
            f"{len(self.networks)} fold networks" if len(self.networks) > 1 else "no adapter")
        kept = chosen_classes(self.postprocessing)
        steps = (", test-time mirroring" if self.module.hparams.tta else "") + (
            f", largest component kept of class(es) {', '.join(map(str, kept))}" if kept else "")
        return f"{module['model']} with {members} on base {self.base}, device {self.device}{steps}"

    @property
    def label_names(self) -> dict[int, str]:
        """Foreground label value -> name: from the training data's fingerprint, else the run's dataset.json,
        else ``class <k>``."""
        if self.domain is not None:
            return self.domain.foreground_labels
        dataset = Path(self.config["datamodule"].get("dataset_json", ""))
        if dataset.is_file():
            return {k: v for k, v in load_dataset_json(dataset).labels.items() if k != 0}
        classes = max(int(self.config["module"].get("model_kwargs", {}).get("out_channels", 1)), 2) - 1
        return {k: f"class {k}" for k in range(1, classes + 1)}

    @torch.no_grad()
    def predict_probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """Mean over the adapters of the probabilities ``(B, C, *spatial)`` of preprocessed volumes ``(B, C_in, *spatial)``."""
        image = image.to(self.device)
        if self.networks:  # fold networks of full / decoder / scratch runs: each one's own weights in turn
            total = None
            for state in self.networks:
                self.module.net.load_state_dict(state)
                probabilities = self.module.predict_probabilities(image)
                total = probabilities if total is None else total.add_(probabilities)
            return total / len(self.networks)
        if not self.members:
            return self.module.predict_probabilities(image)
        total = None
        for name in self.members:
            with folded(self.module.net, name):
                probabilities = self.module.predict_probabilities(image)
            total = probabilities if total is None else total.add_(probabilities)
        return total / len(self.members)

    def predict(self, path: str | os.PathLike) -> Prediction:
        """Read one scan, run the ensemble, and map the probabilities back onto the scan's grid.

        Raises:
            ValueError: the scan cannot be read or used (the message names the file and the reason).
        """
        path = Path(path)
        pipeline = inference_transforms(self.preprocess, self.channels)
        load_and_orient = Compose(pipeline.transforms[:2])  # LoadCased, Orientationd: raw intensities, native spacing
        try:
            data = load_and_orient({"image": str(path), "case_id": input_name(path)})
            image = data["image"]
            spacing = [float(s) for s in image.pixdim]
            found, target = [], None
            if self.domain is not None:
                modality = dicom_modality(path) if path.is_dir() else None
                found = self.domain.check(image.numpy(), spacing, modality)
                if self.preprocess.target_spacing is None:  # trained on the native grid: resample only a stranger
                    target = self.domain.resample_spacing(spacing)
            if target is not None:  # the same load/orient objects, so that Invertd finds its own transforms
                resampling = inference_transforms(dataclasses.replace(self.preprocess, target_spacing=target), self.channels)
                pipeline = Compose([*pipeline.transforms[:2], *resampling.transforms[2:]])
            data = Compose(pipeline.transforms[2:])(data)
        except Exception as error:  # MONAI wraps the reader's error: report the root cause
            raise ValueError(f"cannot use input {path}: {_root_cause(error)}") from error
        for message in found:
            log.warning("%s: %s", path, message)
        image = data["image"]
        data["pred"] = MetaTensor(self.predict_probabilities(image[None])[0].float().cpu())
        restored = invert_transform(pipeline, keys="pred")(data)["pred"]
        affine = np.asarray(input_affine(image), dtype=np.float64)
        shape = tuple(int(s) for s in image.meta["spatial_shape"])
        if tuple(restored.shape[1:]) != shape or not np.allclose(np.asarray(restored.affine), affine, atol=1e-4):
            raise RuntimeError(f"{path}: inverting the preprocessing gave shape {tuple(restored.shape[1:])} and affine "
                               f"{np.asarray(restored.affine).round(4).tolist()} instead of the input's {shape} and "
                               f"{affine.round(4).tolist()}")
        probabilities = restored.as_tensor().numpy().astype(np.float32)
        mask = probabilities[0] > self.threshold if len(probabilities) == 1 else probabilities.argmax(0)
        mask = keep_largest_component(mask.astype(np.uint8), chosen_classes(self.postprocessing))
        return Prediction(path, probabilities, mask, affine, float(np.count_nonzero(mask)) * voxel_volume_ml(affine),
                          found, target)


def input_affine(image: MetaTensor) -> np.ndarray:
    """The voxel-to-world affine of a preprocessed image's input file: the reader's ``original_affine``, or, from
    Pillow's reader (PNG, JPEG, BMP, TIFF), which records none, the affine its reorientation started from."""
    if "original_affine" in image.meta:
        return np.asarray(image.meta["original_affine"])
    orientation = next(op for op in image.applied_operations if "Orientation" in op[TraceKeys.CLASS_NAME])
    return np.asarray(orientation[TraceKeys.EXTRA_INFO]["original_affine"])


def run_domain(run_dir: str | os.PathLike) -> Optional[TrainingDomain]:
    """The training data of a run (its ``fingerprint.json``); None, with one warning, for a run without one."""
    path = Path(run_dir) / FINGERPRINT_FILE
    if not path.is_file():
        log.warning("%s has no %s (a run from before segadapt stored it): inputs are not checked against the "
                    "training data's modality, spacing and intensities", run_dir, FINGERPRINT_FILE)
        return None
    return TrainingDomain.from_file(path)
