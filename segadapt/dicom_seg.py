"""DICOM-SEG output: a prediction of a DICOM series as a DICOM Segmentation object (highdicom).

::

    prediction = predictor.predict("ct_dicom/")
    write_dicom_seg(prediction, "ct_seg.dcm", {1: "liver"})   # or: segadapt predict ... --dicom-seg ct_seg.dcm

One segment per foreground class (label value k -> segment k, labelled with the dataset's label name), BINARY
segmentation type, one frame per source slice and segment (empty frames kept, so frame i of segment k is source
slice i), referencing the source series (its Study, Series and SOP Instance UIDs; patient and study copied).
The mask is brought onto the source geometry by highdicom (``Volume.match_geometry``: permutes and flips the
prediction's voxel axes, never resamples), so it is written exactly as predicted, frame i onto the i-th source
image in highdicom's order (down the slice normal); a mask that is not on the series' grid is refused.
highdicom is in the ``dicom`` extra (``pip install 'segadapt[dicom]'``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from segadapt.data.files import atomic_path

if TYPE_CHECKING:
    from segadapt.inference import Prediction

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # MONAI/NIfTI world (RAS) -> DICOM patient coordinates (LPS)


def _highdicom():
    try:
        import highdicom
    except ImportError:
        raise ValueError("--dicom-seg needs highdicom, which is not installed: pip install 'segadapt[dicom]'") from None
    return highdicom


def check_dicom_seg_request(inputs: list[Path], out: str | os.PathLike) -> Path:
    """Refuse, before any work, a DICOM-SEG request that cannot be met: several inputs, or an input that is not a
    DICOM series folder (a NIfTI has no source images to reference); highdicom missing."""
    from segadapt.inference import is_dicom_series

    if len(inputs) != 1:
        raise ValueError(f"--dicom-seg {out} writes one DICOM-SEG object, for one DICOM series; got {len(inputs)} inputs")
    if not (inputs[0].is_dir() and is_dicom_series(inputs[0])):
        raise ValueError(f"--dicom-seg needs a DICOM series folder as input; {inputs[0]} is not one (a DICOM-SEG "
                         "references its source images)")
    _highdicom()
    check_dicom_seg_sources(inputs[0])
    return Path(out)


def check_dicom_seg_sources(folder: Path) -> None:
    """Refuse, before any work, a series that no DICOM-SEG could reference (:func:`_source_header`, read here
    from the headers only) or whose geometry highdicom cannot describe (:func:`series_geometry`)."""
    import pydicom

    from segadapt.inference import dicom_series_files

    files = dicom_series_files(folder)
    series_geometry([_source_header(pydicom.dcmread(f, stop_before_pixels=True), f) for f in files])


def _source_header(ds, path: str):
    """A source image's header, its empty SOP Class / Instance UIDs taken from its file meta (the same UIDs by
    definition: some anonymisers blank only the dataset's); ValueError when the series cannot be referenced."""
    for name, meta in (("SOPClassUID", "MediaStorageSOPClassUID"), ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
        if not ds.get(name) and getattr(ds, "file_meta", None) is not None and ds.file_meta.get(meta):
            setattr(ds, name, ds.file_meta.get(meta))
    missing = [name for name in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
                                 "FrameOfReferenceUID", "ImagePositionPatient", "ImageOrientationPatient",
                                 "PixelSpacing") if not ds.get(name)]
    if missing:
        raise ValueError(f"DICOM file {path} has no {', '.join(missing)} (an anonymised series?): a DICOM-SEG must "
                         "reference its source series by these; restore them or write the NIfTI mask only")
    return ds


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
                    series_description: str = "segadapt segmentation") -> Path:
    """Write ``prediction`` (of a DICOM series folder) as a DICOM-SEG file `out`, atomically.

    Args:
        labels: label value -> segment label for each foreground class (values missing get ``class <k>``).

    Raises:
        ValueError: the prediction's source is not a DICOM series, misses the UIDs a reference needs, or its
            mask is not on the series' grid.
    """
    import pydicom

    hd = _highdicom()
    from pydicom.sr.codedict import codes

    from segadapt import __version__
    from segadapt.inference import dicom_series_files

    check_dicom_seg_request([Path(prediction.source)], out)
    sources = [_source_header(pydicom.dcmread(f, stop_before_pixels=True), f) for f in dicom_series_files(prediction.source)]
    sources, geometry = series_geometry(sources)
    mask = hd.Volume(np.asarray(prediction.mask, dtype=np.uint8), _RAS_TO_LPS @ np.asarray(prediction.affine),
                     coordinate_system="PATIENT", frame_of_reference_uid=geometry.frame_of_reference_uid)
    # match_geometry would also pad or crop; only a permutation / flip of the same grid is written
    if not np.allclose(_corners(mask.affine, mask.spatial_shape), _corners(geometry.affine, geometry.spatial_shape),
                       atol=1e-3 * float(np.min(geometry.spacing))):
        raise ValueError(f"the mask of {prediction.source} is not on the DICOM series' grid")
    mask = mask.match_geometry(geometry)
    n_classes = max(len(prediction.probabilities), 2) - 1  # C = 1: one foreground class
    algorithm = hd.AlgorithmIdentificationSequence(name="segadapt", version=str(__version__),
                                                   family=codes.cid7162.ArtificialIntelligence)
    segments = [
        hd.seg.SegmentDescription(
            segment_number=k, segment_label=str(labels.get(k, f"class {k}"))[:64],
            segmented_property_category=codes.cid7150.Tissue, segmented_property_type=codes.cid7166.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
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
