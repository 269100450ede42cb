"""DICOM-SEG output (``--dicom-seg``): written with highdicom for a DICOM series, read back with pydicom/highdicom
(frames, referenced series, segment labels, pixels = the predicted mask); refused for other inputs."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segadapt.data import load_dataset_json
from segadapt.inference import Predictor, dicom_series_files, main, predict_to_folder

hd = pytest.importorskip("highdicom")
pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid  # noqa: E402


def write_ct_series(folder: Path, volume: np.ndarray, spacing: tuple[float, float, float]) -> str:
    """One CT Image Storage file per slice of `volume` (slice, row, column; HU as int16), axial, slices along +z
    every spacing[0] mm, rows spacing[1] mm apart, columns spacing[2] mm; returns the SeriesInstanceUID."""
    folder.mkdir(parents=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for k, plane in enumerate(volume.astype(np.int16)):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID = CTImageStorage, ExplicitVRLittleEndian
        meta.MediaStorageSOPInstanceUID = uid = generate_uid()
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "CT", "Test^Phantom", "p1", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "20260101", "120000", "1", "", ""
        ds.SeriesNumber, ds.InstanceNumber, ds.Manufacturer = 3, k + 1, "test"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, k * spacing[0]]
        ds.PixelSpacing, ds.SliceThickness = [spacing[1], spacing[2]], spacing[0]
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.PixelData = plane.tobytes()
        ds.save_as(folder / f"{k:03d}.dcm", enforce_file_format=True)
    return series


def read_back(path: Path, source_folder: Path) -> tuple[Dataset, np.ndarray]:
    """The SEG dataset and its pixels per source file (GDCM order): (slices, rows, cols, segments)."""
    seg = hd.seg.segread(path)
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in dicom_series_files(source_folder)]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids,
                                               segment_numbers=list(range(1, seg.number_of_segments + 1)))
    return seg, np.asarray(pixels)


@pytest.fixture(scope="module")
def predictor(demo_runs) -> Predictor:
    return Predictor.from_runs(demo_runs[:1], device="cpu")


@pytest.fixture(scope="module")
def phantom_series(predictor, tmp_path_factory) -> tuple[Path, str]:
    """A phantom head of the demo target as a CT DICOM series at the training spacing."""
    case = load_dataset_json(predictor.config["datamodule"]["dataset_json"]).cases[0]
    image = nib.load(case.image)
    spacing = np.linalg.norm(image.affine[:3, :3], axis=0)
    volume = np.asarray(image.dataobj).transpose(2, 1, 0)  # (x, y, z) -> (slice, row, column)
    folder = tmp_path_factory.mktemp("dicom") / "phantom_series"
    return folder, write_ct_series(folder, volume, (spacing[2], spacing[1], spacing[0]))


def test_dicom_seg_of_a_synthetic_series_reads_back_as_predicted(predictor, phantom_series, tmp_path):
    folder, series_uid = phantom_series
    out = tmp_path / "seg.dcm"
    (row,) = predict_to_folder(predictor, folder, tmp_path / "pred", progress=False, dicom_seg=out)
    mask = np.asarray(nib.load(row["mask"]).dataobj)
    assert 0 < mask.sum() < mask.size  # a mask with both values, so the pixel comparison has teeth
    assert row["warnings"] == ""  # the training data's own kind of scan, at its spacing
    seg, pixels = read_back(out, folder)
    source = pydicom.dcmread(dicom_series_files(folder)[0], stop_before_pixels=True)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.SegmentationType == "BINARY"
    assert int(seg.NumberOfFrames) == mask.shape[2]  # one frame per source slice, one segment
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.PatientID == "p1"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["haemorrhage"]  # the dataset's label name
    # The reader's voxel (i, j, k) is column i, row j of slice k (ITK index order): frame k = mask[:, :, k].T
    np.testing.assert_array_equal(pixels[..., 0], mask.transpose(2, 1, 0))


def test_dicom_seg_of_the_real_ct_series(predictor, shared_data, tmp_path):
    folder = shared_data / "ct_abdomen_totalseg" / "ct_dicom"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    from segadapt.dicom_seg import write_dicom_seg

    # The shared series is anonymised: Study and Series Instance UIDs blanked, so nothing could reference it.
    with pytest.raises(ValueError, match="has no StudyInstanceUID, SeriesInstanceUID .*anonymised"):
        write_dicom_seg(predictor.predict(folder), tmp_path / "refused.dcm", predictor.label_names)
    assert not (tmp_path / "refused.dcm").exists()
    # A copy with those UIDs restored (pixel data, still JPEG 2000, and geometry untouched).
    copy, study, series = tmp_path / "ct_dicom", generate_uid(), generate_uid()
    copy.mkdir()
    for f in sorted(folder.iterdir()):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
        ds.save_as(copy / f.name)
    files = dicom_series_files(copy)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    prediction = predictor.predict(copy)
    write_dicom_seg(prediction, tmp_path / "seg.dcm", predictor.label_names)
    seg, pixels = read_back(tmp_path / "seg.dcm", copy)
    assert int(seg.NumberOfFrames) == len(files) == 20
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series and seg.StudyInstanceUID == study
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["haemorrhage"]
    assert list(first.ImageOrientationPatient) == [1, 0, 0, 0, 1, 0]  # axial: frame k = mask[:, :, k].T as above
    assert prediction.mask.any() and not prediction.mask.all()
    np.testing.assert_array_equal(pixels[..., 0], prediction.mask.transpose(2, 1, 0))


def test_dicom_seg_is_refused_for_a_nifti_input(demo_runs, tmp_path, capsys):
    scan = load_dataset_json(Predictor.from_runs(demo_runs[:1], device="cpu").config["datamodule"]["dataset_json"]).cases[0].image
    with pytest.raises(SystemExit) as exit_info:
        main(["--run", str(demo_runs[0]), "--input", str(scan), "--output", str(tmp_path / "out"),
              "--dicom-seg", str(tmp_path / "seg.dcm")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error: --dicom-seg needs a DICOM series folder" in err[0] and str(scan) in err[0]
    assert not (tmp_path / "seg.dcm").exists() and not (tmp_path / "out").exists()
