"""Inference on CT scans: the fold adapters of a run on one shared base -> masks on the input's grid.

One frozen base network holds the K fold adapters side by side (``segadapt.adapters.load_adapter`` under
the names ``m0 .. m{K-1}``). A scan is preprocessed once with the preprocessing saved in the run
(``segadapt.data.inference_transforms``); each adapter in turn is folded into the weights (:func:`folded`,
a temporary merge that puts the base weights back bit for bit) and predicts whole-volume probabilities
(multi-view fusion or MONAI sliding window, exactly as in validation: ``SegAdaptModule.predict_probabilities``);
the K probability volumes are averaged,

    p(x) = 1/K sum_k p_k(x),

and ``segadapt.data.invert_transform`` maps the mean back onto the input's grid (orientation, spacing
and crop undone): the mask has the input's shape and affine. Memory: one base + K adapters (+ one
adapter's folded weights while it runs). ``scripts/benchmark_ensemble.py`` measures it against K
separate models.

Each model's probabilities are test-time mirrored when its run was trained so (``tta`` in the run config).
The mask keeps only the largest connected component of the classes the runs chose on their validation
cases (``postprocessing`` in metrics.json, decided once on the folds' pooled cases: :func:`recorded_postprocessing`).

Python::

    predictor = Predictor.from_runs(["runs/phantom_sah/multiview_unet/cp_lora/fold0", ".../fold1", ".../fold2"])
    prediction = predictor.predict("ct.nii.gz")   # .probabilities (C, *shape) .mask .affine .volume_ml
    rows = predict_to_folder(predictor, "scans/", "predictions/", probabilities=True)

Command line (``segadapt predict`` with these arguments, or ``python scripts/predict.py``)::

    segadapt predict --run runs/phantom_sah/multiview_unet/cp_lora/fold0 runs/phantom_sah/multiview_unet/cp_lora/fold1 \
        --input ct.nii.gz --output predictions/
    segadapt predict --adapters fold0.safetensors fold1.safetensors --run-config runs/.../fold0 \
        --base base.safetensors --input scans/ --output predictions/ --probabilities

Inputs: a NIfTI (``.nii``/``.nii.gz``), NRRD or MHA/MHD file, a DICOM series folder, a 2D image file (PNG,
JPEG, BMP, TIFF: for a run trained on 2D images), or a folder of those. Per input ``<name>``:
``<name>_mask.nii.gz`` (uint8 label map; for a 2D image file, ``<name>_mask.<its suffix>`` of the same size,
PNG for a JPEG input, whose lossy compression would alter the labels), with ``--probabilities``
``<name>_probabilities.nii.gz`` (float32; channels last when there are several), and a row of
``volumes.csv`` (lesion volume in mL = foreground voxels x |det A| / 1000; of a 2D image its area, in mm^2
= pixels x |det A| with a pixel spacing, in pixels for image files, which carry none). Every file is written to a
temporary file beside it and moved into place, so an interruption leaves no half-written file.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from monai.transforms import Compose
from monai.utils import TraceKeys
from torch import nn
from tqdm.auto import tqdm

from segadapt.adapters import active_adapter, adapted_layers, load_adapter, set_active_adapter
from segadapt.adapters.trained import use_trained_copies
from segadapt.data import PreprocessConfig, inference_transforms, invert_transform, load_dataset_json, make_phantom_dataset
from segadapt.data.plan import PIXEL_SUFFIXES
from segadapt.data.readers import dicom_series_files, is_dicom_series
from segadapt.data.files import atomic_path, check_output_file, check_output_folder, nifti_image, stale_temp_files
from segadapt.dicom_seg import check_dicom_seg_request, parse_segment_code, segment_codes, write_dicom_seg
from segadapt.domain import TrainingDomain, format_mm
from segadapt.models.pretrained import read_state_dict
from segadapt.parsers import predict_parser
from segadapt.runs import (ADAPTER_FILE, CONFIG_FILE, FINGERPRINT_FILE, METRICS_FILE, WEIGHTS_FILE, open_run,
                           read_metrics, read_run_config)
from segadapt.training import RunConfig, SegAdaptModule, fit_run
from segadapt.training.metrics import voxel_volume_ml
from segadapt.training.postprocessing import chosen_classes, keep_largest_component, pooled_choice

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", *PIXEL_SUFFIXES)
# 2D image file suffix -> (mask suffix, Pillow format) of its mask: lossless, so JPEG inputs get PNG masks
PIXEL_MASK_FORMATS = {".png": (".png", "PNG"), ".jpg": (".png", "PNG"), ".jpeg": (".png", "PNG"),
                      ".bmp": (".bmp", "BMP"), ".tif": (".tif", "TIFF"), ".tiff": (".tiff", "TIFF")}
CSV_FILE = "volumes.csv"
CSV_COLUMNS = ("input", "mask", "probabilities", "lesion_voxels", "voxel_ml", "lesion_volume_ml", "lesion_area_mm2",
               "lesion_area_px", "members", "warnings")


# ---- inputs -------------------------------------------------------------------------------------
def dicom_modality(folder: str | os.PathLike) -> Optional[str]:
    """The DICOM ``Modality`` (CT, MR, ...) of the series in `folder` (its first file's header), or None."""
    files = dicom_series_files(folder)
    if not files:
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(files[0])
    reader.ReadImageInformation()  # the header only
    return reader.GetMetaData("0008|0060").strip() or None if reader.HasMetaDataKey("0008|0060") else None


def is_pixel_file(path: str | os.PathLike) -> bool:
    """A 2D image file without a physical pixel size (PNG, JPEG, BMP, TIFF)."""
    return Path(path).name.lower().endswith(PIXEL_SUFFIXES)


def mask_suffix(path: str | os.PathLike) -> str:
    """The suffix of an input's mask file: ``.nii.gz``, or a 2D image file's own lossless format."""
    name = Path(path).name.lower()
    return next((mask for s, (mask, _) in PIXEL_MASK_FORMATS.items() if name.endswith(s)), ".nii.gz")


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES) and not path.name.startswith(".")


def input_name(path: str | os.PathLike) -> str:
    """Output stem of an input: the file name without its image suffix, or the DICOM folder's name."""
    name = Path(path).name
    suffix = next((s for s in IMAGE_SUFFIXES if name.lower().endswith(s)), "")
    return name[: len(name) - len(suffix)]


def find_inputs(path: str | os.PathLike) -> list[Path]:
    """The scans `path` names: itself (an image file or a DICOM series folder), or the image files and
    DICOM series sub-folders of a folder, sorted by name.

    Raises:
        FileNotFoundError: `path` does not exist, or a folder holds no scan.
        ValueError: `path` is a file of an unsupported type.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}")
    if path.is_file():
        if not is_image_file(path):
            raise ValueError(f"{path} is not a supported scan: give a NIfTI (.nii, .nii.gz), NRRD (.nrrd) or "
                             "MHA/MHD file, a 2D image (PNG, JPEG, BMP, TIFF), or the folder of a DICOM series")
        return [path]
    if is_dicom_series(path):
        return [path]
    found = [p for p in sorted(path.iterdir()) if is_image_file(p) or (p.is_dir() and is_dicom_series(p))]
    if not found:
        raise FileNotFoundError(f"no NIfTI, NRRD, MHA/MHD, PNG, JPEG, BMP or TIFF file or DICOM series folder in {path}")
    return found


def _root_cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def check_threshold(threshold: float) -> float:
    """`threshold` as a float, refused unless 0 < threshold < 1 (a probability cut-off)."""
    value = float(threshold)
    if not 0.0 < value < 1.0:  # also refuses NaN
        raise ValueError(f"threshold must be a probability in (0, 1), got {threshold}")
    return value


def resolve_device(device: Optional[str]) -> torch.device:
    """`device` (default: CUDA when available, else CPU), refused when it is not on this machine."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {device!r} asked for, but this machine has no CUDA GPU that torch can use; "
                             "use --device cpu")
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device {device!r} asked for, but this machine has {count} CUDA GPU(s)")
    return resolved


# ---- the predictor ------------------------------------------------------------------------------
@contextmanager
def folded(net: nn.Module, name: str) -> Iterator[nn.Module]:
    """`net` computing as if adapter `name` were merged: each adapted layer's base weight is swapped for
    W = f(W0) (the adapter's weight-space formula) and W0 is put back afterwards, untouched.

    A temporary, out-of-place merge: built once per volume instead of once per forward call (unmerged
    adapters rebuild W in every slice batch), so each member runs at the plain network's speed; unlike
    ``merge``/``unmerge`` it restores W0 bit for bit. Extra memory while active: one adapter's folded weights.
    """
    layers = [layer for _, layer in adapted_layers(net) if name in layer.adapters]
    if not layers:
        raise ValueError(f"no adapter named {name!r} to fold")
    originals = [layer.base_layer.weight for layer in layers]
    active = active_adapter(net)
    try:
        set_active_adapter(net, None)
        use_trained_copies(net, name)  # modules the adapter trains in full run its copies
        with torch.no_grad():
            for layer in layers:
                weight = layer.adapters[name].adapted_weight(layer.spec.canonical(layer.base_layer.weight))
                layer.base_layer.weight = nn.Parameter(layer.spec.to_base(weight).contiguous(), requires_grad=False)
        yield net
    finally:
        for layer, weight in zip(layers, originals):
            layer.base_layer.weight = weight
        set_active_adapter(net, active)


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
        config: a run's ``config.yaml`` (:func:`segadapt.runs.read_run_config`): ``module`` gives the
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

        Runs without an adapter file: a full / decoder / scratch run's ``model.safetensors`` is the network
        (several such runs: each fold's own network, probabilities averaged); a single ``none`` run is its base.

        Raises:
            FileNotFoundError: a run folder without ``config.yaml``, or an unfinished run.
            ValueError: the runs differ in network, base checkpoint or preprocessing.
        """
        runs = [Path(r) for r in runs]
        if not runs:
            raise ValueError("give at least one run folder")
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
                           postprocessing=recorded_postprocessing(runs))
        if len(missing) == len(runs) and all(w.is_file() for w in weights):  # full / decoder / scratch fold runs
            return cls(configs[0], (), weights[0], device, threshold, strict, domain, networks=weights,
                       postprocessing=recorded_postprocessing(runs))
        if missing:
            raise FileNotFoundError(f"run folder {missing[0]} has no {ADAPTER_FILE} (unfinished run, or a fold "
                                    "ensemble that mixes adapter runs with full/decoder/scratch runs)")
        return cls(configs[0], adapters, base, device, threshold, strict, domain,
                   postprocessing=recorded_postprocessing(runs))

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


def recorded_postprocessing(run_dirs: Sequence[str | os.PathLike]) -> list[bool]:
    """Per foreground class, whether an ensemble of these runs keeps the largest component: decided once on
    their pooled validation cases (``postprocessing`` in each ``metrics.json``:
    :func:`segadapt.training.postprocessing.pooled_choice`); [] when a run has no record."""
    records = []
    for run_dir in run_dirs:
        path = Path(run_dir) / METRICS_FILE
        try:
            records.append(json.loads(path.read_text(encoding="utf-8")).get("postprocessing") if path.is_file() else None)
        except ValueError as error:
            raise ValueError(f"cannot read {path}: {error}") from None
    return pooled_choice(records)


def run_domain(run_dir: str | os.PathLike) -> Optional[TrainingDomain]:
    """The training data of a run (its ``fingerprint.json``); None, with one warning, for a run without one."""
    path = Path(run_dir) / FINGERPRINT_FILE
    if not path.is_file():
        log.warning("%s has no %s (a run from before segadapt stored it): inputs are not checked against the "
                    "training data's modality, spacing and intensities", run_dir, FINGERPRINT_FILE)
        return None
    return TrainingDomain.from_file(path)


# ---- writing ------------------------------------------------------------------------------------
def output_paths(out_dir: str | os.PathLike, name: str, probabilities: bool = False,
                 suffix: str = ".nii.gz") -> dict[str, Path]:
    """{'mask': <out_dir>/<name>_mask<suffix>[, 'probabilities': <out_dir>/<name>_probabilities.nii.gz]}
    (`suffix`: :func:`mask_suffix` of the input)."""
    paths = {"mask": Path(out_dir) / f"{name}_mask{suffix}"}
    if probabilities:
        paths["probabilities"] = Path(out_dir) / f"{name}_probabilities.nii.gz"
    return paths


@contextmanager
def writing_prediction(prediction: Prediction, out_dir: str | os.PathLike, name: str,
                       probabilities: bool = False) -> Iterator[dict[str, Path]]:
    """Write the mask (and probabilities) to temporary files; they move onto their names (yielded) when the
    block ends without error, and are removed otherwise. What the block records (``volumes.csv``) is thus
    on disk before the files it lists: a kill in between leaves a listed mask missing, never an unlisted one."""
    suffix = mask_suffix(prediction.source)
    paths = output_paths(out_dir, name, probabilities, suffix)
    images = {"mask": nifti_image(prediction.mask, prediction.affine)}
    if probabilities:
        p = prediction.probabilities
        p = p[0] if len(p) == 1 else np.moveaxis(p, 0, -1)  # NIfTI keeps channels in the 4th dim
        images["probabilities"] = nifti_image(p, prediction.affine)
    with ExitStack() as stack:
        for key, image in images.items():
            tmp = stack.enter_context(atomic_path(paths[key]))
            if key == "mask" and suffix != ".nii.gz":
                write_pixel_mask(prediction.mask, tmp, PIXEL_MASK_FORMATS[suffix][1])
            else:
                nib.save(image, tmp)
        yield paths


def write_pixel_mask(mask: np.ndarray, path: str | os.PathLike, image_format: str) -> None:
    """A 2D label map (x, y: the reader's axes) as an image file of the input's size (rows = y), values = labels."""
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(np.asarray(mask, dtype=np.uint8).T)).save(path, format=image_format)


def write_prediction(prediction: Prediction, out_dir: str | os.PathLike, name: str,
                     probabilities: bool = False) -> dict[str, Path]:
    """Write ``<name>_mask.nii.gz`` (and ``<name>_probabilities.nii.gz``) atomically with the input's affine."""
    with writing_prediction(prediction, out_dir, name, probabilities) as paths:
        pass
    return paths


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _kept_rows(csv_path: Path, replaced: set[Path]) -> list[dict[str, Any]]:
    """Rows of an earlier ``volumes.csv`` whose mask is still on disk and not about to be rewritten."""
    if not csv_path.is_file():
        return []
    with open(csv_path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return [{k: r.get(k, "") for k in CSV_COLUMNS} for r in rows
            if r.get("mask") and Path(r["mask"]).is_file() and Path(r["mask"]).resolve() not in replaced]


def check_outputs_spare_inputs(inputs: str | os.PathLike, out_dir: str | os.PathLike,
                               dicom_seg: Optional[str | os.PathLike] = None,
                               model_paths: Sequence[str | os.PathLike] = ()) -> None:
    """Refuse, before any work, outputs that would land in an input: nothing is written into an input DICOM
    series (a file there joins the series), a run folder, or the folder of the input files (the masks would be
    inputs next time), and the DICOM-SEG file replaces no input, model file or other output. Paths are compared
    resolved (symlinks followed).

    `model_paths`: the run folders, adapter / base / config files; a file's folder counts as a run folder when it
    holds ``config.yaml``.

    Raises:
        ValueError: naming the output and the input it would land in.
    """
    scans = find_inputs(inputs)
    models = [Path(p).resolve() for p in model_paths if p is not None]
    protected_files = {p for p in models if not p.is_dir()} | {s.resolve() for s in scans if s.is_file()}
    protected_folders = {s.resolve(): "input DICOM series" for s in scans if s.is_dir()}
    protected_folders.update({p if p.is_dir() else p.parent: "run folder" for p in models
                              if (p / CONFIG_FILE).is_file() or (p.parent / CONFIG_FILE).is_file()})
    out = Path(out_dir).resolve()
    for folder, what in protected_folders.items():
        if out.is_relative_to(folder):
            raise ValueError(f"output folder {out_dir} is inside the {what} {folder}: write the predictions elsewhere")
    input_folders = {f for s in scans if s.is_file() for f in (s.parent.resolve(), s.resolve().parent)}
    if Path(inputs).is_dir() and Path(inputs).resolve() not in protected_folders:
        input_folders.add(Path(inputs).resolve())
    if out in input_folders:
        raise ValueError(f"output folder {out_dir} holds the inputs: write the predictions to another folder")
    if dicom_seg is None:
        return
    seg = Path(dicom_seg).resolve()
    outputs = {p.resolve() for s in scans for p in output_paths(out_dir, input_name(s), True).values()}
    if seg in protected_files or seg in outputs or seg == (out / CSV_FILE):
        raise ValueError(f"--dicom-seg {dicom_seg} would replace an input, model or output file: give a new file name")
    for folder, what in protected_folders.items():
        if seg.is_relative_to(folder):
            why = " (a file in a DICOM series folder joins the series)" if what == "input DICOM series" else ""
            raise ValueError(f"--dicom-seg {dicom_seg} is inside the {what} {folder}: write it elsewhere{why}")


def predict_to_folder(
    predictor: Predictor,
    inputs: str | os.PathLike,
    out_dir: str | os.PathLike,
    probabilities: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = tqdm.write,
    dicom_seg: Optional[str | os.PathLike] = None,
    dicom_seg_codes: Optional[Mapping[Any, Sequence[str]]] = None,
) -> list[dict[str, Any]]:
    """Predict every scan of `inputs` (see :func:`find_inputs`) into `out_dir`; returns this run's CSV rows.

    Each row gives the lesion's size in mL (3D: ``lesion_volume_ml``), mm^2 (2D images with a pixel spacing:
    ``lesion_area_mm2``) or pixels (PNG, JPEG, BMP, TIFF: ``lesion_area_px``)
    and the ``warnings`` about the input (``; ``-separated, see :meth:`Predictor.predict`). `dicom_seg`: also
    write the mask as a DICOM-SEG file there (:func:`segadapt.dicom_seg.write_dicom_seg`; one DICOM series input),
    its segments coded by :func:`segadapt.dicom_seg.segment_codes` (`dicom_seg_codes`: label -> (category, type)).

    ``volumes.csv`` lists every mask in `out_dir`: the rows of an earlier run whose masks are still
    there, then this run's. It is rewritten (atomically) for each scan *before* that scan's files move
    into place, so whatever stops the run -- an error, Ctrl-C, kill -9 -- no mask is left unlisted;
    temporary files are removed on errors and interrupts, and those of a killed run on the next one.
    A scan that cannot be read stops the run with a ``ValueError`` naming it; the scans before it keep
    their complete outputs and nothing is written for it.

    Raises:
        ValueError: two inputs would write the same output, `out_dir` is the inputs' folder, a file,
            or not writable.
    """
    scans, out_dir = find_inputs(inputs), check_output_folder(out_dir)
    check_outputs_spare_inputs(inputs, out_dir, dicom_seg, [*predictor.adapters, predictor.base])
    dataset = predictor.domain.dataset if predictor.domain is not None else ""
    if dicom_seg is not None:
        check_output_file(check_dicom_seg_request(scans, dicom_seg), "DICOM-SEG file")
        if predictor.preprocess.spatial_dims != 3:
            raise ValueError(f"--dicom-seg needs a 3D network (one mask on the series' grid); this run's is "
                             f"{predictor.preprocess.spatial_dims}D")
        segment_codes(predictor.label_names, dicom_seg_codes, dataset)  # every segment coded, before any write
    names, suffixes = [input_name(s) for s in scans], [mask_suffix(s) for s in scans]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise ValueError(f"several inputs in {inputs} are named {duplicate!r} (e.g. .nii.gz and .nrrd): rename one")
    csv_path = out_dir / CSV_FILE
    outputs = [p for n, x in zip(names, suffixes) for p in output_paths(out_dir, n, True, x).values()]
    for path in [csv_path, *outputs]:
        for stale in stale_temp_files(path):  # left by a killed run
            stale.unlink()
    kept = _kept_rows(csv_path, {p.resolve() for p in outputs})
    rows: list[dict[str, Any]] = []
    for scan, name in zip(tqdm(scans, desc="predict", unit="scan", disable=not progress or len(scans) == 1), names):
        prediction = predictor.predict(scan)
        planar, pixels = prediction.spatial_dims == 2, is_pixel_file(scan)
        with writing_prediction(prediction, out_dir, name, probabilities) as paths:
            row = {
                "input": str(scan),
                "mask": str(paths["mask"]),
                "probabilities": str(paths.get("probabilities", "")),
                "lesion_voxels": prediction.voxels,
                "voxel_ml": "" if planar else f"{voxel_volume_ml(prediction.affine):.6g}",
                "lesion_volume_ml": "" if planar else f"{prediction.volume_ml:.4f}",
                "lesion_area_mm2": f"{prediction.area_mm2:.4f}" if planar and not pixels else "",
                "lesion_area_px": prediction.area_px if pixels else "",
                "members": max(len(predictor.members), len(predictor.networks), 1),
                "warnings": "; ".join(prediction.warnings),
            }
            if dicom_seg is not None:  # before the CSV and masks: a refusal leaves nothing written
                write_dicom_seg(prediction, dicom_seg, predictor.label_names, codes=dicom_seg_codes, dataset=dataset)
            rows.append(row)
            write_csv(csv_path, kept + rows)
        size = (f"area {row['lesion_area_px']} px" if pixels else f"area {row['lesion_area_mm2']} mm^2" if planar
                else f"volume {row['lesion_volume_ml']} mL")
        resampled = "" if prediction.resampled_to is None else f", resampled to {format_mm(prediction.resampled_to)} mm"
        echo(f"{name}: lesion {size} ({prediction.voxels} voxels, shape "
             f"{prediction.mask.shape}{resampled}) -> {paths['mask']}" + (f" and {dicom_seg}" if dicom_seg else ""))
    return rows


# ---- the runs training wrote, or a tiny demo run for a fresh clone ----------------------------------
TRAIN_CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # scripts/train.py's Hydra configs (a source checkout)


def trained_fold_runs(overrides: Sequence[str] = (), root: str | os.PathLike = ".",
                      config_dir: str | os.PathLike = TRAIN_CONFIGS) -> tuple[Path, list[Path]]:
    """Where ``python scripts/train.py -m fold=0,1,... <overrides>``, run in `root`, writes its fold runs, and the
    finished ones there: (`root`/``run_dir`` of ``configs/train.yaml`` composed with `overrides` and ``fold=*``,
    e.g. ``runs/phantom_sah/multiview_unet/cp_lora/fold*``; the folders matching it that hold ``config.yaml``,
    ``adapter.safetensors`` and ``metrics.json``, by fold)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "fold='*'"])
    pattern = Path(root) / str(cfg.run_dir)
    runs = [r for r in pattern.parent.glob(pattern.name)
            if all((r / f).is_file() for f in (CONFIG_FILE, ADAPTER_FILE, METRICS_FILE))]
    return pattern, sorted(runs, key=lambda r: int(read_run_config(r)["run"]["fold"]))


def is_demo_run(run_dir: str | os.PathLike) -> bool:
    """A run made by :func:`make_demo_runs` (a few steps: its masks are not segmentations)."""
    return read_run_config(run_dir)["run"].get("experiment") == "demo"


DEMO_MODEL = {"out_channels": 1, "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 0,
              "norm": "instance", "shared_weights": True, "fusion": "mean"}


def make_demo_runs(
    out_dir: str | os.PathLike,
    members: int = 3,
    method: str = "cp_lora",
    rank: int = 4,
    model_kwargs: Optional[Mapping[str, Any]] = None,
    shape: Sequence[int] = (40, 40, 20),
    steps: tuple[int, int] = (10, 4),
    seed: int = 0,
) -> list[Path]:
    """Small real run folders to try inference on in seconds (CPU): returns the `members` fold runs.

    Writes the phantom source (``tbi``) and target (``sah``) datasets under ``out_dir/data``, a
    multi-view UNet base trained ``steps[0]`` steps from scratch on the source (``out_dir/runs/base``),
    and one `method` adapter per fold of the target trained ``steps[1]`` steps at a high learning rate, so
    that the folds differ (``out_dir/runs/demo/<method>/fold<k>``), all with :func:`segadapt.training.fit_run`.
    Complete folders of the same network are reused. The schedules are far too short to segment well: this
    exercises the pipeline; ``python scripts/train.py`` makes a real run.
    """
    out_dir = Path(out_dir).resolve()
    runs = [out_dir / "runs" / "demo" / method / f"fold{k}" for k in range(members)]
    model_kwargs = {"in_channels": PreprocessConfig().in_channels, **dict(model_kwargs or DEMO_MODEL)}
    if all((r / name).is_file() for r in runs for name in (ADAPTER_FILE, CONFIG_FILE, METRICS_FILE)) \
            and read_run_config(runs[0])["module"]["model_kwargs"] == model_kwargs:
        return runs
    spacing = [220.0 / shape[0], 220.0 / shape[1], 160.0 / shape[2]]  # the phantom head's field of view in mm
    divisor = math.prod(model_kwargs.get("strides", [2]))
    slice_size = [math.ceil(s / divisor) * divisor for s in shape[:2]]  # training slices are padded up to this
    preprocess = PreprocessConfig(slice_size=slice_size, samples_per_volume=4, augment=False).to_dict()
    trainer = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "enable_model_summary": False,
               "num_sanity_val_steps": 0, "log_every_n_steps": 1, "check_val_every_n_epoch": 10_000}
    model = {"model": "multiview_unet", "model_kwargs": model_kwargs}

    def data(domain: str, fold: int) -> dict[str, Any]:
        n = max(members, 2)  # one validation case per fold
        dataset = make_phantom_dataset(out_dir / "data" / domain, domain, n, seed, shape, spacing)
        return {"dataset_json": str(dataset), "fold": fold, "n_folds": n, "split_seed": seed,
                "preprocess": preprocess, "batch_size": 2}

    base_run = out_dir / "runs" / "base"
    fit_run(RunConfig(base_run, {"experiment": "demo", "method": "scratch", "fold": 0}, {**model, "adapter": "scratch", "lr": 3e-3},
            data("tbi", 0), {**trainer, "max_steps": steps[0]}, seed=seed, eval_base=False, overwrite=True))
    adapter = {"method": method, "rank": rank}
    for k, run in enumerate(runs):
        fit_run(RunConfig(run, {"experiment": "demo", "method": method, "fold": k},
                {**model, "adapter": adapter, "preset": "all_conv", "lr": 3e-2, "base_checkpoint": str(base_run / WEIGHTS_FILE)},
                data("sah", k), {**trainer, "max_steps": steps[1]}, seed=seed + k, eval_base=False, overwrite=True))
    return runs


# ---- command line -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    return predict_parser()  # in segadapt.parsers: `segadapt predict --help` imports no torch


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
    """``segadapt predict --run ... --input ...``; bad inputs exit with status 2 and a one-line error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    strict = not args.force
    try:
        # bad inputs, output folder, threshold or device fail before the network is built
        scans = find_inputs(args.input)
        check_output_folder(args.output)
        check_outputs_spare_inputs(args.input, args.output, args.dicom_seg,
                                   [*(args.run or args.adapters), args.run_config, args.base])
        codes = dict(parse_segment_code(text) for text in args.segment_code)
        if args.dicom_seg is not None:
            check_output_file(check_dicom_seg_request(scans, args.dicom_seg), "DICOM-SEG file")
        if args.threshold is not None:
            check_threshold(args.threshold)
        resolve_device(args.device)
        if args.run:
            predictor = Predictor.from_runs(args.run, args.base, args.device, args.threshold, strict)
        else:
            predictor = Predictor.from_adapter_files(args.adapters, args.run_config, args.base, args.device,
                                                     args.threshold, strict)
        print(f"segadapt predict: {predictor.description}")
        rows = predict_to_folder(predictor, args.input, args.output, args.probabilities, not args.no_progress,
                                 dicom_seg=args.dicom_seg, dicom_seg_codes=codes)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"segadapt predict: error: {error}\n")
    except KeyboardInterrupt:  # temporary files are already removed; finished scans are listed in volumes.csv
        parser.exit(130, f"segadapt predict: interrupted; complete outputs are listed in {Path(args.output) / CSV_FILE}\n")
    key, what, unit = next(((k, w, u) for k, w, u in (("lesion_area_px", "area", "px"), ("lesion_area_mm2", "area", "mm^2"))
                            if rows and rows[0][k] != ""), ("lesion_volume_ml", "volume", "mL"))
    total = sum(float(r[key]) for r in rows)
    print(f"{len(rows)} scan(s), total lesion {what} {total:.2f} {unit} -> {Path(args.output) / CSV_FILE}")
    return rows


if __name__ == "__main__":
    main()
