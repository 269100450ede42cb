"""Writing predictions: a folder of scans -> masks, probabilities and ``volumes.csv`` (:func:`predict_to_folder`).

Per input ``<name>``: ``<name>_mask.nii.gz`` (uint8 label map; for a 2D image file, ``<name>_mask.<its suffix>`` of
the same size, PNG for a JPEG input, whose lossy compression would alter the labels), with ``probabilities``
``<name>_probabilities.nii.gz`` (float32; channels last when there are several), and a row of ``volumes.csv``
(lesion volume in mL = foreground voxels x |det A| / 1000; of a 2D image its area, in mm^2 = pixels x |det A| with a
pixel spacing, in pixels for image files, which carry none). Every file is written to a temporary file beside it and
moved into place, so an interruption leaves no half-written file.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Optional

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from segadapt.io import atomic_path, check_output_file, check_output_folder, stale_temp_files
from segadapt.data.files import nifti_image
from segadapt.runs import CONFIG_FILE
from segadapt.training.metrics import voxel_volume_ml

from .dicom_seg import check_dicom_seg_request, segment_codes, write_dicom_seg
from .domain import format_mm
from .inputs import find_inputs, input_name, is_pixel_file
from .predictor import Prediction, Predictor

# 2D image file suffix -> (mask suffix, Pillow format) of its mask: lossless, so JPEG inputs get PNG masks
PIXEL_MASK_FORMATS = {".png": (".png", "PNG"), ".jpg": (".png", "PNG"), ".jpeg": (".png", "PNG"),
                      ".bmp": (".bmp", "BMP"), ".tif": (".tif", "TIFF"), ".tiff": (".tiff", "TIFF")}
CSV_FILE = "volumes.csv"
CSV_COLUMNS = ("input", "mask", "probabilities", "lesion_voxels", "voxel_ml", "lesion_volume_ml", "lesion_area_mm2",
               "lesion_area_px", "members", "warnings")


def mask_suffix(path: str | os.PathLike) -> str:
    """The suffix of an input's mask file: ``.nii.gz``, or a 2D image file's own lossless format."""
    name = Path(path).name.lower()
    return next((mask for s, (mask, _) in PIXEL_MASK_FORMATS.items() if name.endswith(s)), ".nii.gz")


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
    write the mask as a DICOM-SEG file there (:func:`segadapt.inference.dicom_seg.write_dicom_seg`; one DICOM series input),
    its segments coded by :func:`segadapt.inference.dicom_seg.segment_codes` (`dicom_seg_codes`: label -> (category, type)).

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
