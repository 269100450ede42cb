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

Inputs: a NIfTI (``.nii``/``.nii.gz``), NRRD or MHA/MHD file, a DICOM series folder, or a folder of
those. Per input ``<name>``: ``<name>_mask.nii.gz`` (uint8 label map), with ``--probabilities``
``<name>_probabilities.nii.gz`` (float32; channels last when there are several), and a row of
``volumes.csv`` (lesion volume in mL = foreground voxels x |det A| / 1000). Every file is written to a
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
from torch import nn
from tqdm.auto import tqdm

from segadapt.adapters import active_adapter, adapted_layers, load_adapter, set_active_adapter
from segadapt.adapters.trained import use_trained_copies
from segadapt.data import PreprocessConfig, inference_transforms, invert_transform, load_dataset_json, make_phantom_dataset
from segadapt.data.files import atomic_path, check_output_file, check_output_folder, nifti_image, stale_temp_files
from segadapt.dicom_seg import check_dicom_seg_request, write_dicom_seg
from segadapt.domain import TrainingDomain, format_mm
from segadapt.training import ADAPTER_FILE, CONFIG_FILE, METRICS_FILE, WEIGHTS_FILE, SegAdaptModule, fit_run, read_run_config
from segadapt.training.metrics import voxel_volume_ml
from segadapt.training.postprocessing import chosen_classes, keep_largest_component, pooled_choice
from segadapt.training.run import FINGERPRINT_FILE

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
CSV_FILE = "volumes.csv"
CSV_COLUMNS = ("input", "mask", "probabilities", "lesion_voxels", "voxel_ml", "lesion_volume_ml", "lesion_area_mm2",
               "members", "warnings")


# ---- inputs -------------------------------------------------------------------------------------
def is_dicom_series(folder: str | os.PathLike) -> bool:
    """True if `folder` holds DICOM files of at least one series (GDCM's scan, not recursive)."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM warns on every folder without DICOM files
    try:
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def dicom_series_files(folder: str | os.PathLike) -> list[str]:
    """The files of the DICOM series in `folder`, in GDCM's slice order (the order the reader stacks them)."""
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))


def dicom_modality(folder: str | os.PathLike) -> Optional[str]:
    """The DICOM ``Modality`` (CT, MR, ...) of the series in `folder` (its first file's header), or None."""
    files = dicom_series_files(folder)
    if not files:
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(files[0])
    reader.ReadImageInformation()  # the header only
    return reader.GetMetaData("0008|0060").strip() or None if reader.HasMetaDataKey("0008|0060") else None


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
                             "MHA/MHD file, or the folder of a DICOM series")
        return [path]
    if is_dicom_series(path):
        return [path]
    found = [p for p in sorted(path.iterdir()) if is_image_file(p) or (p.is_dir() and is_dicom_series(p))]
    if not found:
        raise FileNotFoundError(f"no NIfTI, NRRD, MHA/MHD file or DICOM series folder in {path}")
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

        A single run without an adapter file is used alone: a full / decoder / scratch run's
        ``model.safetensors`` is the network; a ``none`` run is its base.

        Raises:
            FileNotFoundError: a run folder without ``config.yaml``, or an unfinished run.
            ValueError: the runs differ in network, base checkpoint or preprocessing.
        """
        runs = [Path(r) for r in runs]
        if not runs:
            raise ValueError("give at least one run folder")
        configs = [read_run_config(r) for r in runs]
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
        if len(runs) == 1 and missing:
            weights = runs[0] / WEIGHTS_FILE
            if weights.is_file() or configs[0]["run"].get("tuning") == "none":
                return cls(configs[0], (), weights if weights.is_file() else base, device, threshold, strict, domain,
                           recorded_postprocessing(runs))
        if missing:
            raise FileNotFoundError(f"run folder {missing[0]} has no {ADAPTER_FILE} (unfinished run, or a full/decoder/"
                                    "scratch run: those are used alone, not in a fold ensemble)")
        return cls(configs[0], adapters, base, device, threshold, strict, domain, recorded_postprocessing(runs))

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
        return cls(read_run_config(run_dir), adapters, base, device, threshold, strict, run_domain(run_dir),
                   recorded_postprocessing([Path(a).parent for a in adapters]))

    @property
    def description(self) -> str:
        module = self.config["module"]
        members = f"{len(self.members)} adapter(s)" if self.members else "no adapter"
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
        affine = np.asarray(image.meta["original_affine"], dtype=np.float64)
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
def output_paths(out_dir: str | os.PathLike, name: str, probabilities: bool = False) -> dict[str, Path]:
    """{'mask': <out_dir>/<name>_mask.nii.gz[, 'probabilities': <out_dir>/<name>_probabilities.nii.gz]}."""
    paths = {"mask": Path(out_dir) / f"{name}_mask.nii.gz"}
    if probabilities:
        paths["probabilities"] = Path(out_dir) / f"{name}_probabilities.nii.gz"
    return paths


@contextmanager
def writing_prediction(prediction: Prediction, out_dir: str | os.PathLike, name: str,
                       probabilities: bool = False) -> Iterator[dict[str, Path]]:
    """Write the mask (and probabilities) to temporary files; they move onto their names (yielded) when the
    block ends without error, and are removed otherwise. What the block records (``volumes.csv``) is thus
    on disk before the files it lists: a kill in between leaves a listed mask missing, never an unlisted one."""
    paths = output_paths(out_dir, name, probabilities)
    images = {"mask": nifti_image(prediction.mask, prediction.affine)}
    if probabilities:
        p = prediction.probabilities
        p = p[0] if len(p) == 1 else np.moveaxis(p, 0, -1)  # NIfTI keeps channels in the 4th dim
        images["probabilities"] = nifti_image(p, prediction.affine)
    with ExitStack() as stack:
        for key, image in images.items():
            nib.save(image, stack.enter_context(atomic_path(paths[key])))
        yield paths


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


def predict_to_folder(
    predictor: Predictor,
    inputs: str | os.PathLike,
    out_dir: str | os.PathLike,
    probabilities: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = tqdm.write,
    dicom_seg: Optional[str | os.PathLike] = None,
) -> list[dict[str, Any]]:
    """Predict every scan of `inputs` (see :func:`find_inputs`) into `out_dir`; returns this run's CSV rows.

    Each row gives the lesion's size in mL (3D: ``lesion_volume_ml``) or mm^2 (2D images: ``lesion_area_mm2``)
    and the ``warnings`` about the input (``; ``-separated, see :meth:`Predictor.predict`). `dicom_seg`: also
    write the mask as a DICOM-SEG file there (:func:`segadapt.dicom_seg.write_dicom_seg`; one DICOM series input).

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
    if dicom_seg is not None:
        check_output_file(check_dicom_seg_request(scans, dicom_seg), "DICOM-SEG file")
    names = [input_name(s) for s in scans]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise ValueError(f"several inputs in {inputs} are named {duplicate!r} (e.g. .nii.gz and .nrrd): rename one")
    if any(out_dir.resolve() == s.parent.resolve() for s in scans if s.is_file()):
        raise ValueError(f"output folder {out_dir} holds the inputs: write the predictions to another folder")
    csv_path = out_dir / CSV_FILE
    for path in [csv_path, *(p for n in names for p in output_paths(out_dir, n, True).values())]:
        for stale in stale_temp_files(path):  # left by a killed run
            stale.unlink()
    kept = _kept_rows(csv_path, {p.resolve() for n in names for p in output_paths(out_dir, n, True).values()})
    rows: list[dict[str, Any]] = []
    for scan, name in zip(tqdm(scans, desc="predict", unit="scan", disable=not progress or len(scans) == 1), names):
        prediction = predictor.predict(scan)
        planar = prediction.spatial_dims == 2
        with writing_prediction(prediction, out_dir, name, probabilities) as paths:
            row = {
                "input": str(scan),
                "mask": str(paths["mask"]),
                "probabilities": str(paths.get("probabilities", "")),
                "lesion_voxels": prediction.voxels,
                "voxel_ml": "" if planar else f"{voxel_volume_ml(prediction.affine):.6g}",
                "lesion_volume_ml": "" if planar else f"{prediction.volume_ml:.4f}",
                "lesion_area_mm2": f"{prediction.area_mm2:.4f}" if planar else "",
                "members": max(len(predictor.members), 1),
                "warnings": "; ".join(prediction.warnings),
            }
            rows.append(row)
            write_csv(csv_path, kept + rows)
        if dicom_seg is not None:
            write_dicom_seg(prediction, dicom_seg, predictor.label_names)
        size = f"area {row['lesion_area_mm2']} mm^2" if planar else f"volume {row['lesion_volume_ml']} mL"
        resampled = "" if prediction.resampled_to is None else f", resampled to {format_mm(prediction.resampled_to)} mm"
        echo(f"{name}: lesion {size} ({prediction.voxels} voxels, shape "
             f"{prediction.mask.shape}{resampled}) -> {paths['mask']}" + (f" and {dicom_seg}" if dicom_seg else ""))
    return rows


# ---- a tiny demo run, for a fresh clone -----------------------------------------------------------
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
    if all((r / ADAPTER_FILE).is_file() and (r / CONFIG_FILE).is_file() for r in runs) \
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
    fit_run(base_run, {"experiment": "demo", "method": "scratch", "fold": 0}, {**model, "adapter": "scratch", "lr": 3e-3},
            data("tbi", 0), {**trainer, "max_steps": steps[0]}, seed=seed, eval_base=False, overwrite=True)
    adapter = {"method": method, "rank": rank}
    for k, run in enumerate(runs):
        fit_run(run, {"experiment": "demo", "method": method, "fold": k},
                {**model, "adapter": adapter, "preset": "all_conv", "lr": 3e-2, "base_checkpoint": str(base_run / WEIGHTS_FILE)},
                data("sah", k), {**trainer, "max_steps": steps[1]}, seed=seed + k, eval_base=False, overwrite=True)
    return runs


# ---- command line -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segadapt predict",
        description="Segment CT scans with the fold adapters of a run on their shared base: masks on each "
                    "input's grid, lesion volumes in volumes.csv.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", nargs="+", metavar="RUN_DIR",
                        help="run folder(s) with config.yaml + adapter.safetensors; several = fold ensemble")
    source.add_argument("--adapters", nargs="+", metavar="FILE", help="adapter files made on one base")
    parser.add_argument("--run-config", metavar="PATH",
                        help="with --adapters: the run's config.yaml (or its folder) giving network and "
                             "preprocessing (default: the folder of the first adapter)")
    parser.add_argument("--base", metavar="FILE", help="base checkpoint (default: the run config's)")
    parser.add_argument("--input", "-i", required=True, metavar="PATH",
                        help="NIfTI / NRRD / MHA file, DICOM series folder, or a folder of those")
    parser.add_argument("--output", "-o", default="predictions", metavar="DIR", help="output folder (default: %(default)s)")
    parser.add_argument("--probabilities", action="store_true", help="also write the probability maps")
    parser.add_argument("--dicom-seg", metavar="OUT.dcm",
                        help="also write the mask as a DICOM-SEG object referencing the input DICOM series "
                             "(one DICOM series folder as --input; needs highdicom: the 'dicom' extra)")
    parser.add_argument("--threshold", type=float, help="foreground probability threshold (default: the run's)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar over a folder")
    parser.add_argument("--force", action="store_true",
                        help="load adapters made on a base with the same modules and shapes but other weights "
                             "(a warning instead of an error)")
    return parser


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
                                 dicom_seg=args.dicom_seg)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"segadapt predict: error: {error}\n")
    except KeyboardInterrupt:  # temporary files are already removed; finished scans are listed in volumes.csv
        parser.exit(130, f"segadapt predict: interrupted; complete outputs are listed in {Path(args.output) / CSV_FILE}\n")
    planar = bool(rows) and rows[0]["lesion_area_mm2"] != ""
    key, what, unit = ("lesion_area_mm2", "area", "mm^2") if planar else ("lesion_volume_ml", "volume", "mL")
    total = sum(float(r[key]) for r in rows)
    print(f"{len(rows)} scan(s), total lesion {what} {total:.2f} {unit} -> {Path(args.output) / CSV_FILE}")
    return rows


if __name__ == "__main__":
    main()
