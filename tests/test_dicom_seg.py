"""DICOM-SEG output (``--dicom-seg``): written with highdicom for a DICOM series, read back with pydicom/highdicom
(frames, referenced series, segment labels, pixels = the predicted mask); refused for other inputs."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from run_fixtures import fit_scratch_unet

from segadapt.data import load_dataset_json
from segadapt.data.readers import dicom_series_files
from segadapt.inference import Predictor, predict_to_folder
from segadapt.inference.cli import main

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


def _real_series(folder: Path) -> tuple[dict[str, str], list[str], pydicom.Dataset]:
    """A real DICOM series of ../shared/data (skipped when absent): the sha256 of its files (to check they stay
    untouched), its files in the reader's order, and the first file's header."""
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    files = dicom_series_files(folder)
    return _hashes(folder), files, pydicom.dcmread(files[0], stop_before_pixels=True)


def _hashes(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in folder.iterdir()}


def test_dicom_seg_of_the_real_ct_series(predictor, shared_data, tmp_path, caplog):
    import logging

    from segadapt.inference.dicom_seg import write_dicom_seg

    folder = shared_data / "ct_abdomen_totalseg" / "ct_dicom"
    before, files, first = _real_series(folder)
    assert not first.get("StudyInstanceUID") and not first.get("SeriesInstanceUID")  # anonymised: blanked
    prediction = predictor.predict(folder)
    with caplog.at_level(logging.WARNING, logger="segadapt.inference.dicom_seg"):
        write_dicom_seg(prediction, tmp_path / "seg.dcm", predictor.label_names)
    (message,) = [r.getMessage() for r in caplog.records if r.name == "segadapt.inference.dicom_seg"]
    assert "has no SeriesInstanceUID, StudyInstanceUID (anonymised?)" in message and "highdicom.UID()" in message
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    assert int(seg.NumberOfFrames) == len(files) == 20
    (series,) = seg.ReferencedSeriesSequence
    study, series_uid = seg.StudyInstanceUID, series.SeriesInstanceUID
    assert study and series_uid and study != series_uid  # generated: valid, one per series
    assert all(re.fullmatch(r"[0-9]+(\.[0-9]+)+", uid) and len(uid) <= 64 for uid in (study, series_uid))
    # every source image referenced once, by the SOP Instance UID of its file meta
    referenced = [item.ReferencedSOPInstanceUID for item in series.ReferencedInstanceSequence]
    assert sorted(referenced) == sorted(pydicom.dcmread(f, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID
                                        for f in files)
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["haemorrhage"]
    (segment,) = seg.SegmentSequence
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "50960005"  # SNOMED CT Hemorrhage
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"  # Morphologically Abnormal Structure
    assert list(first.ImageOrientationPatient) == [1, 0, 0, 0, 1, 0]  # axial: frame k = mask[:, :, k].T as above
    assert prediction.mask.any() and not prediction.mask.all()
    by_position = sorted(zip(seg.PerFrameFunctionalGroupsSequence, seg.pixel_array),
                         key=lambda f: float(f[0].PlanePositionSequence[0].ImagePositionPatient[2]))
    slices = sorted(files, key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))
    order = [files.index(f) for f in slices]  # GDCM's order -> ascending z
    np.testing.assert_array_equal(np.stack([p for _, p in by_position]), prediction.mask.transpose(2, 1, 0)[order])
    assert _hashes(folder) == before


def test_dicom_seg_is_refused_for_a_nifti_input(demo_runs, tmp_path, capsys):
    scan = load_dataset_json(Predictor.from_runs(demo_runs[:1], device="cpu").config["datamodule"]["dataset_json"]).cases[0].image
    with pytest.raises(SystemExit) as exit_info:
        main(["--run", str(demo_runs[0]), "--input", str(scan), "--output", str(tmp_path / "out"),
              "--dicom-seg", str(tmp_path / "seg.dcm")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error: --dicom-seg needs a DICOM series folder" in err[0] and str(scan) in err[0]
    assert not (tmp_path / "seg.dcm").exists() and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def hippocampus_run(shared_data, tmp_path_factory) -> Path:
    """A tiny 3D MRI run (MONAI UNet, 2 steps) on three MSD hippocampus cases, both labels (anterior, posterior)."""
    from segadapt.data import write_dataset_json

    source = shared_data / "hippocampus_msd"
    root = tmp_path_factory.mktemp("hippocampus")
    cases = [{"case_id": f"h{i}", "image": str(source / "imagesTr" / name), "label": str(source / "labelsTr" / name)}
             for i, name in enumerate(["hippocampus_001.nii.gz", "hippocampus_003.nii.gz", "hippocampus_004.nii.gz"])]
    dataset = write_dataset_json(root / "dataset.json", "hippocampus", cases,
                                 {0: "background", 1: "anterior", 2: "posterior"}, {0: "MRI"})
    run = root / "run"
    preprocess = {"intensity": "mri", "target_spacing": None, "patch_size": [16, 16, 16], "samples_per_volume": 1,
                  "augment": False}
    return fit_scratch_unet(run, dataset, "hippocampus", {"in_channels": 1, "out_channels": 3, "channels": [4, 8],
                                                          "strides": [2]}, preprocess, [16, 16, 16], max_steps=2, n_folds=3)


def test_dicom_seg_of_the_real_mr_series(hippocampus_run, shared_data, tmp_path, capsys):
    """The MSD hippocampus MRI series (no PatientBirthDate / PatientSex): predict writes a SEG with one segment per
    label, coded SNOMED CT Hippocampus, referencing the series; the source files are untouched."""
    folder = shared_data / "hippocampus_msd" / "dicom_hcrop"
    before, files, first = _real_series(folder)
    assert "PatientBirthDate" not in first and "PatientSex" not in first  # what made highdicom fail
    out = tmp_path / "o"
    (row,) = main(["--run", str(hippocampus_run), "--input", str(folder), "--output", str(out),
                   "--dicom-seg", str(out / "seg.dcm"), "--no-progress"])
    seg = hd.seg.segread(out / "seg.dcm")
    assert seg.Modality == "SEG" and seg.PatientID == first.PatientID and seg.PatientBirthDate == "" \
        and seg.PatientSex == ""
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["anterior", "posterior"]
    for segment in seg.SegmentSequence:  # the dataset is named hippocampus: both labels are hippocampus
        (kind,), (category,) = segment.SegmentedPropertyTypeCodeSequence, segment.SegmentedPropertyCategoryCodeSequence
        assert (kind.CodingSchemeDesignator, kind.CodeValue, kind.CodeMeaning) == ("SCT", "5366008", "Hippocampus")
        assert (category.CodeValue, category.CodeMeaning) == ("91723000", "Anatomical Structure")
    assert int(seg.NumberOfFrames) == 2 * len(files) == 64  # every slice, both segments
    (series,) = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == first.SeriesInstanceUID and seg.StudyInstanceUID == first.StudyInstanceUID
    assert len(series.ReferencedInstanceSequence) == len(files)
    mask = np.asarray(nib.load(row["mask"]).dataobj)
    assert set(np.unique(mask)) == {0, 1, 2}  # both segments hold voxels: the pixel comparison has teeth
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    pixels = np.asarray(seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1, 2]))
    for k in (1, 2):
        np.testing.assert_array_equal(pixels[..., k - 1], (mask == k).transpose(2, 1, 0))
    assert _hashes(folder) == before


def test_segment_codes_known_by_name_given_by_the_user_or_refused():
    from segadapt.inference.dicom_seg import parse_segment_code, segment_codes

    found = segment_codes({1: "liver", 2: "kidney_right", 3: "vessel"})
    assert [found[k][1].value for k in (1, 2, 3)] == ["10200004", "64033007", "59820001"]
    with pytest.raises(ValueError, match=r"label 1 'spot' is not a structure .* --segment-code 1=CATEGORY/TYPE"):
        segment_codes({1: "spot"})
    user = dict([parse_segment_code("spot=AnatomicalStructure/SCT:12738006:Brain")])
    ((category, kind),) = segment_codes({1: "spot"}, user).values()
    assert (category.value, category.meaning, kind.value, kind.meaning) == ("91723000", "Anatomical Structure",
                                                                           "12738006", "Brain")
    with pytest.raises(ValueError, match="neither a SNOMED CT keyword"):
        segment_codes({1: "spot"}, {"1": ("NoSuchThing", "Brain")})
    with pytest.raises(ValueError, match="expected LABEL=CATEGORY/TYPE"):
        parse_segment_code("spot=Brain")
