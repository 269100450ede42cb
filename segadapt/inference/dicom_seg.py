"""DICOM-SEG output: a prediction of a DICOM series as a DICOM Segmentation object (highdicom).

::

    prediction = predictor.predict("ct_dicom/")
    write_dicom_seg(prediction, "ct_seg.dcm", {1: "liver"})   # or: segadapt predict ... --dicom-seg ct_seg.dcm

One segment per foreground class (label value k -> segment k, labelled with the dataset's label name and coded by
:func:`segment_codes`: SNOMED CT category and type for the structures it knows by name, e.g. hippocampus,
haemorrhage, lesion, liver, spleen, kidney, vessel; ``--segment-code LABEL=CATEGORY/TYPE`` otherwise), BINARY
segmentation type, one frame per source slice and segment (empty frames kept, so frame i of segment k is source
slice i), referencing the source series (its Study, Series and SOP Instance UIDs; patient and study copied).
The mask is brought onto the source geometry by highdicom (``Volume.match_geometry``: permutes and flips the
prediction's voxel axes, never resamples), so it is written exactly as predicted, frame i onto the i-th source
image in highdicom's order (down the slice normal); a mask that is not on the series' grid is refused.
An anonymised series with blank Study / Series / SOP Instance or Frame of Reference UIDs gets new UIDs (one
``highdicom.UID()`` per series-level UID, one per image), said in one warning line; patient and study attributes
that DICOM makes type 2 (PatientBirthDate, PatientSex, ...) and the series lacks are written empty. The source
files are never modified.
highdicom is in the ``dicom`` extra (``pip install 'segadapt[dicom]'``).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from segadapt.io import atomic_path
from segadapt.data.readers import dicom_series_files, is_dicom_series
from segadapt.parsers import SEGMENT_CODE_HELP

if TYPE_CHECKING:
    from .predictor import Prediction

log = logging.getLogger(__name__)

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # MONAI/NIfTI world (RAS) -> DICOM patient coordinates (LPS)
SERIES_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")  # one value shared by the series
# Patient / study attributes highdicom copies from the source, type 2 in DICOM (present, may be empty)
TYPE2_ATTRIBUTES = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                    "StudyDate", "StudyTime", "ReferringPhysicianName")
ABNORMAL, ANATOMY = "MorphologicallyAbnormalStructure", "AnatomicalStructure"
# Label-name word (its start) -> (category, type) as pydicom.sr.codedict SCT keywords (SNOMED CT, DICOM CID 7150/7151)
KNOWN_STRUCTURES = {
    "hippocamp": (ANATOMY, "Hippocampus"), "haemorrhage": (ABNORMAL, "Hemorrhage"), "hemorrhage": (ABNORMAL, "Hemorrhage"),
    "bleed": (ABNORMAL, "Hemorrhage"), "sah": (ABNORMAL, "Hemorrhage"), "lesion": (ABNORMAL, "Lesion"),
    "tumo": (ABNORMAL, "Neoplasm"), "neoplasm": (ABNORMAL, "Neoplasm"), "oedema": (ABNORMAL, "Edema"),
    "edema": (ABNORMAL, "Edema"), "liver": (ANATOMY, "Liver"), "spleen": (ANATOMY, "Spleen"),
    "kidney": (ANATOMY, "Kidney"), "vessel": (ANATOMY, "BloodVessel"), "artery": (ANATOMY, "Artery"),
    "vein": (ANATOMY, "Vein"), "aorta": (ANATOMY, "Aorta"), "brain": (ANATOMY, "Brain"), "pancreas": (ANATOMY, "Pancreas"),
    "lung": (ANATOMY, "Lung"), "heart": (ANATOMY, "Heart"),
}


def _highdicom():
    try:
        import highdicom
    except ImportError:
        raise ValueError("--dicom-seg needs highdicom, which is not installed: pip install 'segadapt[dicom]'") from None
    return highdicom


def check_dicom_seg_request(inputs: list[Path], out: str | os.PathLike) -> Path:
    """Refuse, before any work, a DICOM-SEG request that cannot be met: several inputs, or an input that is not a
    DICOM series folder (a NIfTI has no source images to reference); highdicom missing."""
    if len(inputs) != 1:
        raise ValueError(f"--dicom-seg {out} writes one DICOM-SEG object, for one DICOM series; got {len(inputs)} inputs")
    if not (inputs[0].is_dir() and is_dicom_series(inputs[0])):
        raise ValueError(f"--dicom-seg needs a DICOM series folder as input; {inputs[0]} is not one (a DICOM-SEG "
                         "references its source images)")
    _highdicom()
    check_dicom_seg_sources(inputs[0])
    return Path(out)


def check_dicom_seg_sources(folder: Path) -> None:
    """Refuse, before any work, a series that no DICOM-SEG could reference (:func:`_source_headers`, read here
    from the headers only) or whose geometry highdicom cannot describe (:func:`series_geometry`)."""
    series_geometry(_source_headers(dicom_series_files(folder), warn=False))


def _source_headers(files: Sequence[str], warn: bool = True) -> list:
    """The headers of a series' images, ready to be referenced (in memory; the files are not touched): empty SOP
    Class / Instance UIDs taken from the file meta (the same UIDs by definition: some anonymisers blank only the
    dataset's), other empty UIDs generated (one warning line), missing type-2 patient / study attributes empty.
    ValueError when the series lacks its SOP Class or geometry."""
    import pydicom

    hd = _highdicom()
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    generated = set()
    for ds in headers:
        for name, meta in (("SOPClassUID", "MediaStorageSOPClassUID"), ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
            if not ds.get(name) and getattr(ds, "file_meta", None) is not None and ds.file_meta.get(meta):
                setattr(ds, name, ds.file_meta.get(meta))
    for name in SERIES_UIDS:
        if not all(ds.get(name) for ds in headers):
            shared = next((ds.get(name) for ds in headers if ds.get(name)), None)
            uid = shared or hd.UID()
            for ds in headers:
                if not ds.get(name):
                    setattr(ds, name, uid)
            generated.add(name)
    for ds in headers:
        if not ds.get("SOPInstanceUID"):
            ds.SOPInstanceUID = hd.UID()
            generated.add("SOPInstanceUID")
        for name in TYPE2_ATTRIBUTES:
            if name not in ds or ds.get(name) is None:
                setattr(ds, name, "")
    for ds, path in zip(headers, files):
        missing = [name for name in ("SOPClassUID", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
                   if not ds.get(name)]
        if missing:
            raise ValueError(f"DICOM file {path} has no {', '.join(missing)}: a DICOM-SEG must reference its source "
                             "images by these; restore them or write the NIfTI mask only")
    if generated and warn:
        log.warning("DICOM series %s has no %s (anonymised?): the DICOM-SEG references new UIDs generated for them "
                    "(highdicom.UID()), which these files do not carry", Path(files[0]).parent,
                    ", ".join(sorted(generated)))
    return headers


def _code(text: str, what: str):
    """A ``CodedConcept`` from a pydicom.sr.codedict SCT keyword or ``SCHEME:VALUE:MEANING``."""
    hd = _highdicom()
    from pydicom.sr.codedict import codes

    parts = text.strip().split(":", 2)
    if len(parts) == 3 and all(p.strip() for p in parts):
        return hd.sr.CodedConcept(parts[1].strip(), parts[0].strip(), parts[2].strip())
    try:
        code = getattr(codes.SCT, text.strip())
    except (AttributeError, ValueError):
        raise ValueError(f"segment {what} {text!r} is neither a SNOMED CT keyword of pydicom.sr.codedict "
                         "(e.g. AnatomicalStructure, Brain) nor SCHEME:VALUE:MEANING (e.g. SCT:12738006:Brain)") from None
    return hd.sr.CodedConcept(code.value, code.scheme_designator, code.meaning)


def parse_segment_code(text: str) -> tuple[str, tuple[str, str]]:
    """``LABEL=CATEGORY/TYPE`` (``--segment-code``) -> (LABEL, (CATEGORY, TYPE)); ValueError when malformed."""
    label, _, pair = text.partition("=")
    category, _, kind = pair.partition("/")
    if not (label.strip() and category.strip() and kind.strip()):
        raise ValueError(f"--segment-code {text!r}: expected {SEGMENT_CODE_HELP}")
    return label.strip(), (category.strip(), kind.strip())


def known_structure(*names: str) -> Optional[tuple[str, str]]:
    """The (category, type) keywords of the first of `names` whose words start with a :data:`KNOWN_STRUCTURES` key."""
    for name in names:
        words = re.split(r"[^a-z]+", str(name).casefold())
        found = next((v for k, v in KNOWN_STRUCTURES.items() if any(w.startswith(k) for w in words)), None)
        if found is not None:
            return found
    return None


def segment_codes(labels: Mapping[int, str], user: Optional[Mapping[Any, Sequence[str]]] = None,
                  dataset: str = "") -> dict[int, tuple[Any, Any]]:
    """Label value -> (segmented property category, type) as highdicom ``CodedConcept``s: the user's code for the
    label (keyed by value or name: ``(CATEGORY, TYPE)``, each a codedict keyword or ``SCHEME:VALUE:MEANING``), else
    the SNOMED CT code of a structure known by its label name (or, failing that, by the dataset's name: MSD
    hippocampus labels are 'anterior' / 'posterior').

    Raises:
        ValueError: a label with neither (naming it and ``--segment-code``), a user code for no label, a bad code.
    """
    user = {str(k): v for k, v in (user or {}).items()}
    names = {str(k): k for k in labels} | {str(v): k for k, v in labels.items()}
    unknown = [k for k in user if k not in names]
    if unknown:
        raise ValueError(f"--segment-code {unknown[0]}: no such label (the labels are "
                         f"{', '.join(f'{k} {v}' for k, v in labels.items())})")
    found = {}
    for value, name in labels.items():
        given = user.get(str(value), user.get(str(name)))
        pair = tuple(given) if given is not None else known_structure(name, dataset)
        if pair is None:
            raise ValueError(f"label {value} {name!r} is not a structure segadapt knows a DICOM code for: give "
                             f"--segment-code {value}=CATEGORY/TYPE ({SEGMENT_CODE_HELP})")
        found[value] = (_code(pair[0], "category"), _code(pair[1], "type"))
    return found


def series_geometry(sources):
    """The single-frame images of a series in highdicom's frame order, and their ``VolumeGeometry`` (frame i =
    image i; slices evenly spaced: the reader checked it). highdicom stacks frames so that (frame, row, column)
    is right-handed, i.e. against the normal row x column: from the highest slice along it down."""
    hd = _highdicom()
    orientation = np.asarray(sources[0].ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(orientation[:3], orientation[3:])
    sources = sorted(sources, key=lambda ds: -float(np.asarray(ds.ImagePositionPatient, dtype=np.float64) @ normal))
    along = [-float(np.asarray(ds.ImagePositionPatient, dtype=np.float64) @ normal) for ds in sources]
    first = sources[0]
    return sources, hd.VolumeGeometry.from_attributes(
        image_position=[float(v) for v in first.ImagePositionPatient], image_orientation=orientation.tolist(),
        rows=int(first.Rows), columns=int(first.Columns), pixel_spacing=[float(v) for v in first.PixelSpacing],
        spacing_between_slices=(along[-1] - along[0]) / max(len(along) - 1, 1) or 1.0, number_of_frames=len(sources),
        coordinate_system="PATIENT", frame_of_reference_uid=str(first.FrameOfReferenceUID))


def _corners(affine: np.ndarray, shape) -> np.ndarray:
    """The world positions of the 8 corner voxel centres of a grid, sorted (the same for a permuted or flipped grid)."""
    index = np.array(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij")).reshape(3, -1)
    points = (np.asarray(affine)[:3, :3] @ index + np.asarray(affine)[:3, 3:]).T
    return points[np.lexsort(np.round(points, 3).T[::-1])]


def write_dicom_seg(prediction: Prediction, out: str | os.PathLike, labels: Mapping[int, str],
                    series_description: str = "segadapt segmentation",
                    codes: Optional[Mapping[Any, Sequence[str]]] = None, dataset: str = "") -> Path:
    """Write ``prediction`` (of a DICOM series folder) as a DICOM-SEG file `out`, atomically.

    Args:
        labels: label value -> segment label for each foreground class (values missing get ``class <k>``).
        codes, dataset: the user's segment codes and the dataset's name, as :func:`segment_codes` takes them.

    Raises:
        ValueError: the prediction's source is not a DICOM series, misses the UIDs a reference needs, or its
            mask is not on the series' grid.
    """
    hd = _highdicom()
    from pydicom.sr.codedict import codes as codedict

    from segadapt import __version__

    check_dicom_seg_request([Path(prediction.source)], out)
    n_classes = max(len(prediction.probabilities), 2) - 1  # C = 1: one foreground class
    labels = {k: str(labels.get(k, f"class {k}")) for k in range(1, n_classes + 1)}
    coded = segment_codes(labels, codes, dataset)
    sources, geometry = series_geometry(_source_headers(dicom_series_files(prediction.source)))
    mask = hd.Volume(np.asarray(prediction.mask, dtype=np.uint8), _RAS_TO_LPS @ np.asarray(prediction.affine),
                     coordinate_system="PATIENT", frame_of_reference_uid=geometry.frame_of_reference_uid)
    # match_geometry would also pad or crop; only a permutation / flip of the same grid is written
    if not np.allclose(_corners(mask.affine, mask.spatial_shape), _corners(geometry.affine, geometry.spatial_shape),
                       atol=1e-3 * float(np.min(geometry.spacing))):
        raise ValueError(f"the mask of {prediction.source} is not on the DICOM series' grid")
    mask = mask.match_geometry(geometry)
    algorithm = hd.AlgorithmIdentificationSequence(name="segadapt", version=str(__version__),
                                                   family=codedict.cid7162.ArtificialIntelligence)
    segments = [
        hd.seg.SegmentDescription(
            segment_number=k, segment_label=labels[k][:64], segmented_property_category=coded[k][0],
            segmented_property_type=coded[k][1], algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for k in range(1, n_classes + 1)
    ]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=mask.array, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments, series_instance_uid=hd.UID(),
        series_number=int(getattr(sources[0], "SeriesNumber", 0) or 0) + 1000,  # beside the source series
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="segadapt", manufacturer_model_name="segadapt",
        software_versions=str(__version__), device_serial_number="0", series_description=series_description,
        omit_empty_frames=False,
    )
    with atomic_path(out) as tmp:
        seg.save_as(tmp)
    return Path(out)
