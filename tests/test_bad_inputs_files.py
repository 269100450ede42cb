"""Bad inputs and weight files, table-driven: each is refused with the right exception type (or exit code 2
at the predict / export command lines), a ONE-line message naming the offending file / tensor / value,
and nothing written or changed.

Tables: READER_CASES (NIfTI, NRRD, DICOM, case checks), WEIGHT_CASES (adapter and base files through the
Python API), PREDICT_CASES and EXPORT_CASES (command lines). Plus: what loads with a warning (strict=False,
--force, old adapter files), and kill -9 during predict.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from segadapt.adapters import AdapterConfig, inject, load_adapter, merge, save_adapter
from monai.transforms import LoadImage

from segadapt.data import CaseError, PreprocessConfig, SimpleITKReader, make_loader, val_transforms
from segadapt.io import save_safetensors, write_json
from segadapt.data.files import save_nifti
from segadapt.data.loading import LoadCased
from segadapt.data.readers import read_dicom_series
from segadapt.export.cli import main as export_main
from segadapt.inference.cli import main as predict_main
from segadapt.inference.writers import CSV_FILE
from segadapt.models.nnunet import read_checkpoint
from segadapt.models.pretrained import load_pretrained

sys.path.insert(0, str(Path(__file__).parent))  # nnunet_fixtures

HUGE = (30000, 30000, 30000)


def snapshot(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder` (hidden temporaries included)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def one_line(message: str) -> str:
    message = message.strip()
    assert message and "\n" not in message, f"not one line: {message!r}"
    return message


def refused(main, argv: list[str], command: str, expected: list[str], capsys) -> str:
    """Run a command line `main(argv)`: exit 2 and one line ``segadapt <command>: error: ...`` holding every
    text of `expected`; returns the line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    message = one_line(capsys.readouterr().err)
    assert message.startswith(f"segadapt {command}: error: ")
    for text in expected:
        assert text in message, (text, message)
    return message


# ---- readers --------------------------------------------------------------------------------------
def _huge_nifti(tmp: Path) -> Path:
    header = nib.Nifti1Header()
    header.set_data_shape(HUGE)
    header.set_data_dtype(np.int16)
    path = tmp / "huge.nii"
    path.write_bytes(header.binaryblock + b"\0" * 4 + b"\0" * 64)  # header + extension flag + a few voxels
    return path


def _huge_nrrd(tmp: Path) -> Path:
    path = tmp / "huge.nrrd"
    path.write_text("NRRD0004\ntype: short\ndimension: 3\nsizes: 30000 30000 30000\nencoding: raw\n"
                    "endian: little\n\n", encoding="utf-8")
    with open(path, "ab") as handle:
        handle.write(b"\0" * 64)
    return path


def _series(tmp: Path, write_dicom_series, edit=None) -> Path:
    """A 6-slice series at 2.5 mm spacing; `edit(files)` then removes / copies / moves slices."""
    image = sitk.GetImageFromArray(np.random.default_rng(2).integers(-1000, 1000, (6, 5, 4), dtype=np.int16))
    image.SetSpacing((0.8, 0.8, 2.5))
    folder = tmp / "series"
    write_dicom_series(folder, image, "1.2.826.0.1.3680043.2.1125.42")
    if edit is not None:
        edit(sorted(folder.iterdir()))
    return folder


def _remove_slice(files):
    files[2].unlink()


def _duplicate_slice(files):
    shutil.copy(files[2], files[2].with_name("copy.dcm"))


def _shift_slice(files):
    piece = sitk.ReadImage(str(files[3]))
    x, y, z = (float(v) for v in piece.GetMetaData("0020|0032").split("\\"))
    piece.SetMetaData("0020|0032", f"{x}\\{y}\\{z + 1.0}")
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(files[3]))
    writer.Execute(piece)


def _phantom_case(tmp: Path, image: np.ndarray, label: np.ndarray | None = None) -> dict:
    affine = np.diag([4.0, 4.0, 6.0, 1.0])
    nib.save(nib.Nifti1Image(image, affine), tmp / "img.nii.gz")
    label = np.zeros(image.shape, np.uint8) if label is None else label
    nib.save(nib.Nifti1Image(label, affine), tmp / "lbl.nii.gz")
    return {"image": str(tmp / "img.nii.gz"), "label": str(tmp / "lbl.nii.gz"), "case_id": "case_007"}


def _run_val_pipeline(case: dict):
    return val_transforms(PreprocessConfig(cache="none"), (0, 1), 1)(case)


def _read(path: Path):
    return make_loader("image")({"image": str(path)})


def _ours(error: BaseException) -> BaseException:
    """The package's error under MONAI's ``RuntimeError("applying transform ...")`` wrappers."""
    while isinstance(error, RuntimeError) and error.__cause__ is not None:
        error = error.__cause__
    return error


def _air(shape=(20, 20, 8)):
    return np.full(shape, -1000, np.int16)


def _one_nan(shape=(20, 20, 8)):
    image = np.full(shape, 40.0, np.float32)
    image[3, 4, 5] = np.nan
    return image


def _case_files(tmp: Path, image=None, label=None, image_affine=None, label_affine=None) -> dict:
    """A case {image, label, case_id 'case_007'} of NIfTI files (20 x 20 x 8 at 4 x 4 x 6 mm unless given)."""
    affine = np.diag([4.0, 4.0, 6.0, 1.0])
    image = np.full((20, 20, 8), 40, np.int16) if image is None else image
    label = np.zeros(image.shape[:3], np.uint8) if label is None else label
    nib.save(nib.Nifti1Image(image, affine if image_affine is None else image_affine), tmp / "img.nii.gz")
    nib.save(nib.Nifti1Image(label, affine if label_affine is None else label_affine), tmp / "lbl.nii.gz")
    return {"image": str(tmp / "img.nii.gz"), "label": str(tmp / "lbl.nii.gz"), "case_id": "case_007"}


def _one_label_value(value, dtype=np.float32) -> dict:
    label = np.zeros((20, 20, 8), dtype)
    label[3, 4, 5] = value
    return {"label": label}


def _zero_spacing(tmp: Path) -> dict:
    """An image whose sform has a zero z axis (pixdim[3] = 0): no voxel size along z."""
    header = nib.Nifti1Header()
    header.set_data_shape((20, 20, 8))
    header.set_data_dtype(np.int16)
    header["pixdim"][1:4] = [4.0, 4.0, 0.0]
    header["sform_code"], header["qform_code"] = 1, 0
    header["srow_x"], header["srow_y"], header["srow_z"] = [4, 0, 0, 0], [0, 4, 0, 0], [0, 0, 0, 0]
    case = _case_files(tmp)
    nib.save(nib.Nifti1Image(np.full((20, 20, 8), 40, np.int16), None, header), case["image"])
    return case


def _edit_file(key: str, edit) -> callable:
    def prepare(tmp: Path, write_dicom_series):
        case = _case_files(tmp)
        edit(Path(case[key]))
        return case
    return prepare


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _folder_instead(path: Path) -> None:
    path.unlink()
    path.mkdir()
    (path / "notes.txt").write_text("not an image", encoding="utf-8")


def _dangling_link(path: Path) -> None:
    path.unlink()
    path.symlink_to(path.with_name("moved_away.nii.gz"))


def _two_series(tmp: Path, write_dicom_series) -> Path:
    folder = _series(tmp, write_dicom_series)
    other = sitk.GetImageFromArray(np.zeros((3, 5, 4), np.int16))
    write_dicom_series(folder, other, "1.2.826.0.1.3680043.2.1125.43")
    return folder


MONAI_LOAD_IMAGE = LoadImage(reader=SimpleITKReader(), image_only=True)  # the README's use of the reader


NO_CROP = PreprocessConfig(cache="none", crop_foreground=False)

READER_CASES = {
    # name: (prepare(tmp, write_dicom_series) -> input, run(input), exception type, texts the message must hold)
    "nifti_header_30000_cubed": (lambda t, w: _huge_nifti(t), _read, ValueError,
                                 ["huge.nii", "(30000, 30000, 30000)", "GiB"]),
    "nrrd_header_30000_cubed": (lambda t, w: _huge_nrrd(t), _read, ValueError,
                                ["huge.nrrd", "(30000, 30000, 30000)", "GiB"]),
    "nifti_header_through_case_loader": (
        lambda t, w: {"image": str(_huge_nifti(t)), "case_id": "c1"}, LoadCased(("image",)), CaseError,
        ["case 'c1'", "huge.nii", "(30000, 30000, 30000)"]),
    "dicom_missing_slice": (lambda t, w: _series(t, w, _remove_slice), read_dicom_series, ValueError,
                            ["series", "not evenly spaced", "median 2.5 mm", "[2.5, 5.0]"]),
    "dicom_duplicated_slice": (lambda t, w: _series(t, w, _duplicate_slice), read_dicom_series, ValueError,
                               ["series", "not evenly spaced", "[0.0, 2.5]"]),
    "dicom_misplaced_slice": (lambda t, w: _series(t, w, _shift_slice), read_dicom_series, ValueError,
                              ["series", "not evenly spaced", "[1.5, 2.5, 3.5]"]),
    "dicom_missing_slice_through_loader": (lambda t, w: _series(t, w, _remove_slice), _read, ValueError,
                                           ["series", "not evenly spaced"]),
    "all_air_case": (lambda t, w: _phantom_case(t, _air()), _run_val_pipeline, CaseError,
                     ["case 'case_007'", "img.nii.gz", "no foreground voxel", "-500 HU"]),
    "blank_image_no_crop": (lambda t, w: _phantom_case(t, _air()), val_transforms(NO_CROP, (0, 1), 1), CaseError,
                            ["case 'case_007'", "no foreground voxel", "ct intensity step"]),
    "nan_voxels": (lambda t, w: _phantom_case(t, _one_nan()), _run_val_pipeline, CaseError,
                   ["case 'case_007'", "img.nii.gz", "1 NaN or infinite voxel"]),
    "undeclared_label_value": (
        lambda t, w: _phantom_case(t, np.full((20, 20, 8), 40, np.int16), np.full((20, 20, 8), 3, np.uint8)),
        _run_val_pipeline, CaseError, ["case 'case_007'", "lbl.nii.gz", "label values [3]"]),
    # issue 19: reader-level DICOM gaps, zero spacing, and the hostile inputs of round 2
    "dicom_missing_slice_through_monai_load_image": (lambda t, w: _series(t, w, _remove_slice), MONAI_LOAD_IMAGE,
                                                     ValueError, ["series", "not evenly spaced", "[2.5, 5.0]"]),
    "dicom_two_series_through_monai_load_image": (_two_series, MONAI_LOAD_IMAGE, ValueError,
                                                  ["series", "mixes 2 series", "its own folder"]),
    "nifti_zero_spacing": (lambda t, w: _zero_spacing(t), _run_val_pipeline, CaseError,
                           ["case 'case_007'", "img.nii.gz", "without a usable voxel size", "[4.0, 4.0, 0.0]"]),
    "label_of_another_shape": (lambda t, w: _case_files(t, label=np.zeros((20, 20, 7), np.uint8)), _run_val_pipeline,
                               CaseError, ["case 'case_007'", "lbl.nii.gz", "(20, 20, 7)", "same grid"]),
    "label_of_another_affine": (lambda t, w: _case_files(t, label_affine=np.diag([4.0, 4.0, 5.0, 1.0])),
                                _run_val_pipeline, CaseError, ["lbl.nii.gz", "not on the image's grid", "1 mm"]),
    "negative_label_value": (lambda t, w: _case_files(t, **_one_label_value(-1, np.int16)), _run_val_pipeline,
                             CaseError, ["lbl.nii.gz", "label values [-1] not declared"]),
    "fractional_label_value": (lambda t, w: _case_files(t, **_one_label_value(0.5)), _run_val_pipeline, CaseError,
                               ["lbl.nii.gz", "label values [0.5] not declared"]),
    "nan_in_label": (lambda t, w: _case_files(t, **_one_label_value(np.nan)), _run_val_pipeline, CaseError,
                     ["lbl.nii.gz", "label values [nan] not declared"]),
    "image_with_no_voxel_along_an_axis": (
        lambda t, w: _case_files(t, np.zeros((20, 0, 8), np.int16), np.zeros((20, 0, 8), np.uint8)),
        _run_val_pipeline, CaseError, ["case 'case_007'", "img.nii.gz", "holds no voxel", "axis of length 0"]),
    "4d_image_where_3d_is_expected": (lambda t, w: _case_files(t, np.full((20, 20, 8, 2), 40, np.int16)),
                                      _run_val_pipeline, CaseError, ["img.nii.gz", "2 channel(s)", "4D/time-series"]),
    "2d_image_where_3d_is_expected": (
        lambda t, w: _case_files(t, np.full((20, 20), 40, np.int16), np.zeros((20, 20), np.uint8)),
        _run_val_pipeline, CaseError, ["img.nii.gz", "spatial shape (20, 20)", "a 2D image where 3D is expected"]),
    "truncated_gzip": (_edit_file("image", _truncate), _run_val_pipeline, CaseError,
                       ["case 'case_007'", "img.nii.gz is a truncated or corrupt gzip file", "EOFError"]),
    "empty_image_file": (_edit_file("image", lambda p: p.write_bytes(b"")), _run_val_pipeline, CaseError,
                         ["case 'case_007'", "cannot read image", "img.nii.gz", "Empty file"]),
    "label_file_of_text": (_edit_file("label", lambda p: p.write_text("label", encoding="utf-8")), _run_val_pipeline,
                           CaseError, ["cannot read label", "lbl.nii.gz is a truncated or corrupt gzip file"]),
    "folder_where_a_file_is_expected": (_edit_file("image", _folder_instead), _run_val_pipeline, CaseError,
                                        ["case 'case_007'", "no DICOM series found in folder", "img.nii.gz"]),
    "constant_volume_z_scored": (
        lambda t, w: _case_files(t, image_affine=np.diag([0.1, 0.1, 20.0, 1.0]), label_affine=np.diag([0.1, 0.1, 20.0, 1.0])),
        val_transforms(PreprocessConfig(cache="none", intensity="mri"), (0, 1), 1), CaseError,
        ["case 'case_007'", "img.nii.gz", "is constant", "(20, 20, 8) voxels", "no contrast"]),
    "dangling_label_symlink": (_edit_file("label", _dangling_link), _run_val_pipeline, FileNotFoundError,
                               ["case 'case_007'", "label not found", "lbl.nii.gz"]),
}


@pytest.mark.parametrize("name", READER_CASES)
def test_bad_images_are_refused_in_one_line(name, tmp_path, write_dicom_series):
    prepare, run, kind, expected = READER_CASES[name]
    given = prepare(tmp_path, write_dicom_series)
    before = snapshot(tmp_path)
    with pytest.raises(Exception) as info:
        run(given)
    error = _ours(info.value)
    assert isinstance(error, kind), (type(error), error)
    message = one_line(str(error))
    for text in expected:
        assert text in message, (text, message)
    assert snapshot(tmp_path) == before


def test_real_dicom_series_with_a_slice_removed_is_refused(shared_data, tmp_path):
    folder = tmp_path / "ct_dicom"
    shutil.copytree(shared_data / "ct_abdomen_totalseg" / "ct_dicom", folder)
    assert read_dicom_series(folder).GetSpacing()[2] == pytest.approx(2.0)  # the complete series reads
    sorted(folder.iterdir())[7].unlink()
    with pytest.raises(ValueError) as info:
        read_dicom_series(folder)
    message = one_line(str(info.value))
    assert str(folder) in message and "median 2 mm" in message and "[2.0, 4.0]" in message


# ---- weight files through the API -----------------------------------------------------------------
def tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


def tiny_adapter(tmp: Path, base: nn.Module) -> Path:
    model = inject(copy.deepcopy(base), AdapterConfig(method="lora_c", rank=2, targets=["0", "3"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name:
                p.normal_()
    return save_adapter(model, tmp / "adapter.safetensors")


def rewrite(path: Path, edit, out: Path | None = None) -> Path:
    """Copy of a safetensors file with `edit(tensors, metadata)` applied (in place on the dicts)."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    edit(tensors, metadata)
    out = out or path.with_name("edited_" + path.name)
    save_file(tensors, str(out), metadata=metadata)
    return out


def _set(key, value_fn):
    def edit(tensors, metadata):
        tensors[key] = value_fn(tensors[key])
    return edit


def _first_key(path: Path) -> str:
    with safe_open(str(path), framework="pt") as handle:
        return sorted(handle.keys())[0]


def _nan_half(t):
    t = t.clone()
    t.view(-1)[: t.numel() // 2] = float("nan")
    return t


def _adapter_load(edit, expected_extra=()):
    def build(tmp):
        base = tiny_net()
        source = tiny_adapter(tmp, base)
        path = rewrite(source, edit(_first_key(source)))
        return base, lambda model: load_adapter(model, path), [path.name, *expected_extra]
    return build


def _other_weights(tmp):
    path = tiny_adapter(tmp, tiny_net(seed=0))
    return tiny_net(seed=1), lambda model: load_adapter(model, path), [path.name, "other weights", "strict=False"]


def _base_file(edit_fn, key, extra):
    def build(tmp):
        model = tiny_net()
        state = {k: v.clone() for k, v in tiny_net(seed=3).state_dict().items()}
        state[key] = edit_fn(state[key])
        path = tmp / "base.safetensors"
        save_file(state, str(path))
        return model, lambda m: load_pretrained(m, path), [path.name, f"'{key}'", *extra]
    return build


def _adapter_metadata(edit, *texts):
    """An adapter file whose safetensors metadata `edit(metadata)` damaged, loaded onto its own base."""
    def build(tmp):
        base = tiny_net()
        path = rewrite(tiny_adapter(tmp, base), lambda ts, m: edit(m), tmp / "damaged.safetensors")
        return base, lambda model: load_adapter(model, path), [f"adapter file {path}: metadata", *texts]
    return build


def _weights_file(name, write, read=None, *texts):
    """A weights file whose bytes `write(path, tmp)` made, read by `read` (default: load_pretrained)."""
    def build(tmp):
        path = tmp / name
        write(path, tmp)
        action = (lambda m: load_pretrained(m, path)) if read is None else (lambda m: read(path))
        return tiny_net(), action, [str(path), *texts]
    return build


def _nnunet_checkpoint(tmp: Path) -> bytes:
    from nnunet_fixtures import write_results

    folder, _ = write_results(tmp / "results")
    return (folder / "fold_0" / "checkpoint_final.pth").read_bytes()


def _truncated_checkpoint(path: Path, tmp: Path) -> None:
    data = _nnunet_checkpoint(tmp)
    path.write_bytes(data[: len(data) // 2])


def _safetensors_header(edit):
    """A base safetensors file whose JSON header `edit(header)` changed (the tensor bytes as they were)."""
    def write(path: Path, tmp: Path) -> None:
        import json
        import struct

        save_file(tiny_net(seed=3).state_dict(), str(path))
        raw = path.read_bytes()
        size = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8:8 + size])
        edit(header)
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + size:])
    return write


def _plans(edit, *texts):
    """An nnU-Net trained-model folder whose plans.json `edit(plans) -> plans` changed, built by build_nnunet."""
    def build(tmp):
        import json

        from nnunet_fixtures import write_results

        from segadapt.models.nnunet import build_nnunet

        folder, _ = write_results(tmp / "results")
        plans = json.loads((folder / "plans.json").read_text(encoding="utf-8"))
        (folder / "plans.json").write_text(json.dumps(edit(plans)), encoding="utf-8")
        return tiny_net(), lambda m: build_nnunet(str(folder)), [str(folder / "plans.json"), *texts]
    return build


def _arch(edit):
    def apply(plans):
        edit(plans["configurations"]["3d_fullres"]["architecture"])
        return plans
    return apply


def _kwargs(**changes):
    return _arch(lambda arch: arch["arch_kwargs"].update(changes))


def _config(**changes):
    def apply(plans):
        plans["configurations"]["3d_fullres"].update(changes)
        return plans
    return apply


def _merged_save(tmp):
    model = inject(tiny_net(), AdapterConfig(method="lora_c", rank=2, targets=["0"]))
    merge(model)
    return model, lambda m: save_adapter(m, tmp / "new.safetensors"), ["merged into '0'", "unmerge()"]


WEIGHT_CASES = {
    # name: (build(tmp) -> (model, action(model), texts), exception type)
    "adapter_nan": (_adapter_load(lambda k: _set(k, _nan_half), ["NaN or infinite"]), ValueError),
    "adapter_inf": (_adapter_load(lambda k: _set(k, lambda t: t.clone().fill_(float("inf"))), ["NaN or infinite"]),
                    ValueError),
    "adapter_int_tensor": (_adapter_load(lambda k: _set(k, lambda t: t.round().to(torch.int32)), ["torch.int32"]),
                           ValueError),
    "adapter_bool_tensor": (_adapter_load(lambda k: _set(k, lambda t: t > 0), ["torch.bool"]), ValueError),
    "adapter_other_base_weights": (_other_weights, ValueError),
    "base_all_nan": (_base_file(lambda t: torch.full_like(t, float("nan")), "0.weight", ["NaN or infinite"]),
                     ValueError),
    "base_inf_running_var": (_base_file(lambda t: t.clone().fill_(float("inf")), "1.running_var", ["NaN or infinite"]),
                             ValueError),
    "base_int_weight": (_base_file(lambda t: t.round().to(torch.int64), "3.weight", ["torch.int64", "floating"]),
                        ValueError),
    "save_while_merged": (_merged_save, RuntimeError),
    "adapter_metadata_without_config": (_adapter_metadata(lambda m: m.pop("config"), "has no 'config'"), ValueError),
    "adapter_metadata_config_not_json": (_adapter_metadata(lambda m: m.update(config="{rank: 4"),
                                                           "'config' is not valid JSON"), ValueError),
    "adapter_metadata_config_a_list": (_adapter_metadata(lambda m: m.update(config="[1, 2]"),
                                                         "'config' is a list, expected a dict"), ValueError),
    "adapter_metadata_config_unknown_field": (_adapter_metadata(lambda m: m.update(config='{"rnak": 4}'),
                                                                "'config' is not an adapter config", "rnak"), ValueError),
    "adapter_metadata_fingerprint_not_json": (_adapter_metadata(lambda m: m.update(base_fingerprint="[[\"0.weight\""),
                                                                "'base_fingerprint' is not valid JSON"), ValueError),
    "adapter_metadata_fingerprint_malformed": (_adapter_metadata(lambda m: m.update(base_fingerprint="[[1]]"),
                                                                 "'base_fingerprint' is not a list of [name, shape]"),
                                               ValueError),
    "adapter_metadata_train_modules_not_json": (_adapter_metadata(lambda m: m.update(train_modules="{"),
                                                                  "'train_modules' is not valid JSON"), ValueError),
    "base_plain_pickle_of_a_number": (_weights_file("base.pth", lambda p, t: p.write_bytes(pickle.dumps(5)), None,
                                                    "not a readable torch checkpoint", "Invalid magic number"),
                                      ValueError),
    "base_plain_pickle_of_a_dict": (_weights_file("base.pkl", lambda p, t: p.write_bytes(pickle.dumps({"w": [1.0]})),
                                                  None, "not a readable torch checkpoint", "Unsupported operand"),
                                    ValueError),
    "base_empty_file": (_weights_file("base.pt", lambda p, t: p.write_bytes(b""), None,
                                      "not a readable torch checkpoint", "EOFError"), ValueError),
    "nnunet_checkpoint_truncated": (_weights_file("checkpoint_final.pth", _truncated_checkpoint, None,
                                                  "not a readable torch checkpoint (truncated"), ValueError),
    "nnunet_checkpoint_truncated_read_checkpoint": (
        _weights_file("checkpoint_final.pth", _truncated_checkpoint, lambda p: read_checkpoint(p),
                      "not a readable torch checkpoint (truncated"), ValueError),
    "nnunet_checkpoint_network_weights_a_list": (
        _weights_file("checkpoint_final.pth", lambda p, t: torch.save({"network_weights": [torch.zeros(2)]}, p),
                      lambda p: read_checkpoint(p), "not an nnU-Net checkpoint (no 'network_weights')"), ValueError),
    "nnunet_checkpoint_network_weights_a_list_as_base": (
        _weights_file("checkpoint_final.pth", lambda p, t: torch.save({"network_weights": [torch.zeros(2)]}, p), None,
                      "is not a state dict: entries ['network_weights'] are not tensors"), ValueError),
    "safetensors_header_shape_beyond_the_data": (
        _weights_file("base.safetensors", _safetensors_header(lambda h: h["0.weight"].update(shape=[400, 3, 3, 3])),
                      None, "not a readable safetensors file", "invalid shape, data type, or offset"), ValueError),
    "safetensors_header_unknown_dtype": (
        _weights_file("base.safetensors", _safetensors_header(lambda h: h["0.weight"].update(dtype="Q99")), None,
                      "not a readable safetensors file", "unknown variant `Q99`"), ValueError),
    "safetensors_header_integer_dtype": (
        _weights_file("base.safetensors", _safetensors_header(lambda h: h["0.weight"].update(dtype="I32")), None,
                      "tensor '0.weight' has dtype torch.int32"), ValueError),
    "safetensors_header_length_absurd": (
        _weights_file("base.safetensors", lambda p, t: p.write_bytes((2**62).to_bytes(8, "little") + b"{}"), None,
                      "not a readable safetensors file", "header too large"), ValueError),
    "safetensors_name_on_a_text_file": (_weights_file("base.safetensors", lambda p, t: p.write_text("weights"), None,
                                                      "not a readable safetensors file"), ValueError),
    "plans_a_list": (_plans(lambda plans: [plans], "top level must be an object"), ValueError),
    "plans_without_the_configuration": (_plans(lambda plans: {**plans, "configurations": {}},
                                               "configuration '3d_fullres' not found"), ValueError),
    "plans_configuration_inherits_from_a_list": (_plans(_config(inherits_from=["2d"]), "configuration ['2d'] not found"),
                                                 ValueError),
    "plans_patch_size_of_strings": (_plans(_config(patch_size=["16", "16", "16"]), "patch size ['16', '16', '16']"),
                                    ValueError),
    "plans_architecture_without_arch_kwargs": (_plans(_arch(lambda a: a.pop("arch_kwargs")), "has no architecture entry"),
                                               ValueError),
    "plans_arch_kwargs_a_list": (_plans(_arch(lambda a: a.update(arch_kwargs=[1])),
                                        "architecture: needs network_class_name and arch_kwargs (an object)"), ValueError),
    "plans_features_of_wrong_type": (_plans(_kwargs(features_per_stage="many"),
                                            "arch_kwargs do not build a PlainConvUNet"), ValueError),
    "plans_kernel_sizes_2d_for_conv3d": (_plans(_kwargs(kernel_sizes=[[3, 3]] * 3),
                                                "arch_kwargs do not run on the patch size [16, 16, 16]"), ValueError),
    "plans_patch_not_divisible_by_strides": (_plans(_config(patch_size=[15, 16, 16]),
                                                    "arch_kwargs do not run on the patch size [15, 16, 16]"), ValueError),
    "plans_network_class_not_allow_listed": (
        _plans(_arch(lambda a: a.update(network_class_name="dynamic_network_architectures.architectures.vgg.VGG16")),
               "architecture.network_class_name", "is not one of the classes a plans file may name"), ValueError),
    "plans_nonlin_through_a_module_attribute": (
        _plans(_kwargs(nonlin="torch.nn.modules.module.torch.hub.load"), "architecture.arch_kwargs.nonlin",
               "is not one of the classes"), ValueError),
    "plans_kw_requires_import_not_a_list": (_plans(_arch(lambda a: a.update(_kw_requires_import="nonlin")),
                                                   "architecture._kw_requires_import"), ValueError),
    "plans_absurd_features": (_plans(_kwargs(features_per_stage=[65536] * 3), "architecture.arch_kwargs describe a "
                                     "PlainConvUNet of", "above the limit"), ValueError),
    "plans_count_beyond_limit": (_plans(_kwargs(n_conv_per_stage=[2, 10**6, 2]), "arch_kwargs.n_conv_per_stage"),
                                 ValueError),
}


@pytest.mark.parametrize("name", WEIGHT_CASES)
def test_bad_weight_files_are_refused_in_one_line(name, tmp_path):
    build, kind = WEIGHT_CASES[name]
    model, action, expected = build(tmp_path)
    state = copy.deepcopy(model.state_dict())
    files = snapshot(tmp_path)
    with pytest.raises(kind) as info:
        action(model)
    message = one_line(str(info.value))
    for text in expected:
        assert text in message, (text, message)
    assert model.state_dict().keys() == state.keys(), "the model was changed"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert snapshot(tmp_path) == files


def test_other_base_weights_load_with_a_warning_when_not_strict(tmp_path):
    path = tiny_adapter(tmp_path, tiny_net(seed=0))
    model = tiny_net(seed=1)
    with pytest.warns(UserWarning, match="same modules and shapes but other weights.*loaded anyway"):
        load_adapter(model, path, strict=False)
    tensors = load_file(str(path))
    assert torch.equal(model.get_submodule("0").adapters["default"].lora_A, tensors["0.lora_A"])
    # and on its own base it loads without a word
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter(tiny_net(seed=0), path)


def test_an_adapter_file_without_a_weights_digest_loads_with_a_warning(tmp_path):
    """Files written before the digest existed: names and shapes are still checked, the weights cannot be."""
    base = tiny_net()
    old = rewrite(tiny_adapter(tmp_path, base), lambda t, m: (m.pop("base_weights_digest"),
                                                                m.pop("base_weights_digest_scheme")))
    with pytest.warns(UserWarning, match="records no digest of its base weights"):
        load_adapter(copy.deepcopy(base), old)


def test_the_weights_digest_ignores_buffers_and_injection_but_not_one_changed_layer(tmp_path):
    from segadapt.adapters.io import base_weights_digest

    base = tiny_net()
    digest = base_weights_digest(base)
    adapted = inject(copy.deepcopy(base), AdapterConfig(method="lora_c", rank=2, targets=["0", "3"]))
    adapted.train()(torch.randn(2, 3, 8, 8))  # BatchNorm running statistics move during adapter training
    assert base_weights_digest(adapted) == digest
    changed = copy.deepcopy(base)
    with torch.no_grad():
        changed[3].weight.mul_(1.01)  # one layer of the base retrained a little
    assert base_weights_digest(changed) != digest


UMASK_WRITERS = {
    "adapter file (save_adapter)": lambda d: tiny_adapter(d, tiny_net()),
    "safetensors (merged export, PEFT weights, disk cache)": lambda d: save_safetensors(d / "x.safetensors",
                                                                                         {"a": torch.zeros(2)}),
    "NIfTI (masks, phantoms)": lambda d: save_nifti(d / "x.nii.gz", np.zeros((2, 2, 2), np.uint8), np.eye(4)),
    "JSON": lambda d: write_json(d / "x.json", {"a": 1}),
}


@pytest.mark.parametrize("writer", UMASK_WRITERS)
def test_files_get_the_umask_permissions(writer, tmp_path):
    old = os.umask(0o022)
    try:
        path = UMASK_WRITERS[writer](tmp_path)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left


# ---- predict command line ------------------------------------------------------------------------
def _demo(demo_runs) -> dict[str, Path]:
    root = demo_runs[0].parents[3]
    return {"run": demo_runs[0], "adapter": demo_runs[0] / "adapter.safetensors",
            "scan": sorted((root / "data" / "sah" / "imagesTr").glob("*.nii.gz"))[0],
            "base": root / "runs" / "base" / "model.safetensors"}


def _run_with_metrics(run: Path, tmp: Path, edit) -> Path:
    """A copy of `run` whose metrics.json text is edit(text)."""
    copy = shutil.copytree(run, tmp / "run_copy")
    (copy / "metrics.json").write_text(edit((copy / "metrics.json").read_text(encoding="utf-8")), encoding="utf-8")
    return copy


def _two_classes(text: str) -> str:
    """metrics.json text with a postprocessing record for two classes."""
    metrics = json.loads(text)
    two = {"largest_component": [True, False], "dice_with": [0.5, 0.5], "dice_without": [0.4, 0.6]}
    return json.dumps({**metrics, "postprocessing": {**metrics["postprocessing"], **two}})


def _perturbed_base(tmp: Path, base: Path) -> Path:
    state = {k: v * 1.01 if v.is_floating_point() else v for k, v in load_file(str(base)).items()}
    path = tmp / "other_base.safetensors"
    save_file(state, str(path))
    return path


def _readonly(tmp: Path) -> Path:
    folder = tmp / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):
        pytest.skip("running as root: a read-only folder is still writable")
    return folder


def _dicom_input(tmp: Path, write_dicom_series) -> Path:
    return _series(tmp, write_dicom_series, _remove_slice)


def _unfinished(tmp: Path, run: Path) -> Path:
    """A copy of a trained run as a kill before its end leaves it: weights and config, no metrics.json."""
    copy_ = tmp / "killed_run"
    shutil.copytree(run, copy_)
    (copy_ / "metrics.json").unlink()
    return copy_


UNFINISHED = ["killed_run is unfinished (no metrics.json"]


def _ensemble(tmp: Path, members: list, text: str | None = None) -> Path:
    """An ensemble folder as segadapt auto writes it, its ensemble.json holding `text` (default: `members`)."""
    folder = tmp / "ensemble"
    folder.mkdir()
    (folder / "ensemble.json").write_text(text if text is not None else
                                          json.dumps({"format": "segadapt-ensemble/1", "members": members}))
    return folder


def _in_series(tmp: Path, write_dicom_series, dicom_seg=None, output=None) -> list:
    """argv for a readable DICOM series as input; `dicom_seg(series)` / `output(series)` give those paths."""
    series = _series(tmp, write_dicom_series)
    argv = ["--input", series]
    if dicom_seg is not None:
        argv += ["--dicom-seg", dicom_seg(series)]
    if output is not None:
        argv += ["--output", output(series)]
    return argv


def _link(link: Path, target: Path) -> Path:
    link.symlink_to(target)
    return link


def _file(path: Path, text: str = "{}") -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _folder_of_series(tmp: Path, write_dicom_series) -> Path:
    series = _series(tmp, write_dicom_series)
    (tmp / "scans").mkdir()
    return series.rename(tmp / "scans" / "series").parent


def _referable(without: str | None = None):
    """Series files with every header a DICOM-SEG reference needs (a Frame of Reference UID added), less
    `without` (e.g. PixelSpacing: no DICOM-SEG can describe the grid)."""
    def edit(files):
        import pydicom

        for f in files:
            ds = pydicom.dcmread(f)
            ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.2.1125.43"
            if without is not None:
                delattr(ds, without)
            ds.save_as(f)
    return edit


SERIES_SLICE = "series/1.2.826.0.1.3680043.2.1125.42-000.dcm"

PREDICT_CASES = {
    # name: (argv(d, tmp, out, w), texts); d: demo files; the default output folder is `out`
    "threshold_above_1": (lambda d, t, o, w: ["--run", d["run"], "--input", d["scan"], "--threshold", "5"],
                          ["threshold", "(0, 1)", "5"]),
    "threshold_0": (lambda d, t, o, w: ["--run", d["run"], "--input", d["scan"], "--threshold", "0"],
                    ["threshold", "(0, 1)", "got 0"]),
    "threshold_nan": (lambda d, t, o, w: ["--run", d["run"], "--input", d["scan"], "--threshold", "nan"],
                      ["threshold", "nan"]),
    "output_is_a_file": (lambda d, t, o, w: ["--run", d["run"], "--input", d["scan"], "--output", d["adapter"]],
                         ["adapter.safetensors is a file, not a folder"]),
    "output_under_a_file": (lambda d, t, o, w: ["--run", d["run"], "--input", d["scan"],
                                                "--output", d["adapter"] / "out"],
                            ["adapter.safetensors is a file, not a folder"]),
    "output_read_only": (lambda d, t, o, w: ["--run", d["run"], "--input", d["scan"], "--output", _readonly(t) / "x"],
                         ["readonly is not writable"]),
    "device_cuda_without_gpu": (lambda d, t, o, w: ["--run", d["run"], "--input", d["scan"], "--device",
                                                    "cuda" if not torch.cuda.is_available() else "cuda:99"],
                                ["device 'cuda", "CUDA GPU"]),
    "device_unknown": (lambda d, t, o, w: ["--run", d["run"], "--input", d["scan"], "--device", "tpu9"],
                       ["device 'tpu9' is not a torch device"]),
    "segment_code_malformed": (lambda d, t, o, w: ["--run", d["run"], "--input", d["scan"], "--segment-code", "spot=Brain"],
                               ["--segment-code 'spot=Brain'", "expected LABEL=CATEGORY/TYPE"]),
    "segment_code_for_no_label": (lambda d, t, o, w: ["--run", d["run"], "--input", _series(t, w), "--dicom-seg",
                                                      o / "seg.dcm", "--segment-code", "spot=AnatomicalStructure/Brain"],
                                  ["--segment-code spot: no such label", "1 haemorrhage"]),
    "segment_code_unknown_keyword": (lambda d, t, o, w: ["--run", d["run"], "--input", _series(t, w), "--dicom-seg",
                                                         o / "seg.dcm", "--segment-code", "1=AnatomicalStructure/Braim"],
                                     ["segment type 'Braim'", "SCHEME:VALUE:MEANING"]),
    "adapter_with_nan": (lambda d, t, o, w: ["--adapters", rewrite(d["adapter"], lambda ts, m: ts.update(
        {k: _nan_half(v) for k, v in ts.items()}), t / "nan.safetensors"), "--run-config", d["run"],
        "--input", d["scan"]], ["nan.safetensors", "NaN or infinite"]),
    "adapter_on_other_base_weights": (lambda d, t, o, w: ["--run", d["run"], "--base", _perturbed_base(t, d["base"]),
                                                          "--input", d["scan"]],
                                      ["adapter.safetensors", "other weights", "--force"]),
    "base_with_nan": (lambda d, t, o, w: ["--run", d["run"], "--base", rewrite(d["base"], lambda ts, m: ts.update(
        {k: torch.full_like(v, float("nan")) for k, v in ts.items() if v.is_floating_point()}), t / "nan_base.safetensors"),
        "--input", d["scan"]], ["nan_base.safetensors", "NaN or infinite"]),
    "dicom_input_missing_slice": (lambda d, t, o, w: ["--run", d["run"], "--input", _dicom_input(t, w)],
                                  ["series", "not evenly spaced"]),
    "nifti_input_huge_header": (lambda d, t, o, w: ["--run", d["run"], "--input", _huge_nifti(t)],
                                ["huge.nii", "(30000, 30000, 30000)"]),
    "unfinished_run": (lambda d, t, o, w: ["--run", _unfinished(t, d["run"]), "--input", d["scan"]], UNFINISHED),
    # never into an input series, over an input or model file, into a run folder (#19.3)
    "dicom_seg_over_a_slice_of_the_input": (
        lambda d, t, o, w: ["--run", d["run"], *_in_series(t, w, lambda s: t / SERIES_SLICE)],
        ["--dicom-seg", SERIES_SLICE, "is inside the input DICOM series", "joins the series"]),
    "dicom_seg_new_file_in_the_input_series": (
        lambda d, t, o, w: ["--run", d["run"], *_in_series(t, w, lambda s: s / "seg.dcm")],
        ["series/seg.dcm is inside the input DICOM series"]),
    "dicom_seg_symlink_to_a_slice": (
        lambda d, t, o, w: ["--run", d["run"], *_in_series(t, w, lambda s: _link(t / "seg.dcm", t / SERIES_SLICE))],
        ["seg.dcm is inside the input DICOM series"]),
    "dicom_seg_over_the_adapter": (lambda d, t, o, w: ["--run", d["run"], *_in_series(t, w, lambda s: d["adapter"])],
                                   ["fold0/adapter.safetensors is inside the run folder"]),
    "dicom_seg_over_the_base_file": (lambda d, t, o, w: [
        "--run", d["run"], "--base", (base := _perturbed_base(t, d["base"])), *_in_series(t, w, lambda s: base)],
        ["other_base.safetensors would replace an input, model or output file"]),
    "dicom_seg_over_its_own_mask": (
        lambda d, t, o, w: ["--run", d["run"], *_in_series(t, w, lambda s: o / "series_mask.nii.gz")],
        ["series_mask.nii.gz would replace an input, model or output file"]),
    "dicom_seg_over_volumes_csv": (lambda d, t, o, w: ["--run", d["run"], *_in_series(t, w, lambda s: o / CSV_FILE)],
                                   ["volumes.csv would replace an input, model or output file"]),
    "output_is_the_input_series": (lambda d, t, o, w: ["--run", d["run"], *_in_series(t, w, output=lambda s: s)],
                                   ["output folder", "is inside the input DICOM series"]),
    "output_inside_the_input_series": (
        lambda d, t, o, w: ["--run", d["run"], *_in_series(t, w, output=lambda s: s / "predictions")],
        ["series/predictions is inside the input DICOM series"]),
    "output_symlink_into_the_input_series": (
        lambda d, t, o, w: ["--run", d["run"],
                            *_in_series(t, w, output=lambda s: _link(t / "link", s) / "predictions")],
        ["link/predictions is inside the input DICOM series"]),
    "output_is_the_folder_of_the_input_series": (
        lambda d, t, o, w: ["--run", d["run"], "--input", _folder_of_series(t, w), "--output", t / "scans"],
        ["scans holds the inputs"]),
    "output_inside_the_run_folder": (lambda d, t, o, w: ["--run", d["run"], "--input", d["scan"],
                                                         "--output", d["run"] / "predictions"],
                                     ["fold0/predictions is inside the run folder"]),
    "output_in_the_base_run_folder": (lambda d, t, o, w: ["--adapters", d["adapter"], "--base", d["base"],
                                                          "--input", d["scan"], "--output", d["base"].parent],
                                      ["is inside the run folder", "runs/base"]),
    "input_is_the_run_folder": (lambda d, t, o, w: ["--run", d["run"], "--input", d["run"]],
                                ["no NIfTI, NRRD, MHA/MHD, PNG, JPEG, BMP or TIFF file or DICOM series folder in", "fold0"]),
    # DICOM-SEG feasibility, checked before any work (#19.6b)
    "dicom_seg_of_a_series_without_pixel_spacing": (
        lambda d, t, o, w: ["--run", d["run"], "--input", _series(t, w, _referable("PixelSpacing")),
                            "--dicom-seg", t / "seg.dcm"], ["has no PixelSpacing"]),
    "unfinished_run_in_an_ensemble": (lambda d, t, o, w: ["--run", d["run"], _unfinished(t, d["run"]),
                                                          "--input", d["scan"]], UNFINISHED),
    "unfinished_run_adapter_file": (lambda d, t, o, w: ["--adapters", _unfinished(t, d["run"]) / "adapter.safetensors",
                                                        "--input", d["scan"]], UNFINISHED),
    "metrics_not_json": (lambda d, t, o, w: ["--run", _run_with_metrics(d["run"], t, lambda text: text[:-20]),
                                             "--input", d["scan"]], ["run_copy", "metrics.json is not readable JSON"]),
    "postprocessing_for_other_classes": (lambda d, t, o, w: ["--run", _run_with_metrics(d["run"], t, _two_classes),
                                                             "--input", d["scan"]],
        ["postprocessing (metrics.json) is for 2 class(es)", "1 foreground class(es)"]),
    "ensemble_file_not_json": (lambda d, t, o, w: ["--run", _ensemble(t, [], "{"), "--input", d["scan"]],
                               ["cannot read", "ensemble/ensemble.json"]),
    "ensemble_member_not_a_run": (lambda d, t, o, w: ["--run", _ensemble(t, [str(d["run"]), "nowhere"]),
                                                      "--input", d["scan"]],
                                  ["ensemble.json: member", "ensemble/nowhere is not a run folder (no config.yaml)"]),
}


@pytest.mark.parametrize("name", PREDICT_CASES)
def test_predict_refuses_bad_input_with_exit_2_and_one_line(name, demo_runs, tmp_path, capsys, write_dicom_series):
    demo = _demo(demo_runs)
    argv, expected = PREDICT_CASES[name]
    out = tmp_path / "out"
    argv = [str(a) for a in argv(demo, tmp_path, out, write_dicom_series)]
    if "--output" not in argv:
        argv += ["--output", str(out)]
    watched = [tmp_path, demo_runs[0]]
    before = [snapshot(f) for f in watched]
    refused(predict_main, [*argv, "--no-progress"], "predict", expected, capsys)
    assert [snapshot(f) for f in watched] == before
    assert not out.exists()


def test_a_late_dicom_seg_refusal_leaves_no_mask_or_csv(demo_runs, tmp_path, write_dicom_series, monkeypatch, capsys):
    """What only the prediction can tell (its mask off the series' grid, ...) is refused before the mask and
    volumes.csv move into place: the DICOM-SEG is written first."""
    import segadapt.inference.writers

    def refuse(prediction, out, labels, **codes):
        assert prediction.mask.shape == (40, 40, 20)  # the series was predicted
        raise ValueError(f"the mask of {prediction.source} is not on the DICOM series' grid")

    monkeypatch.setattr(segadapt.inference.writers, "write_dicom_seg", refuse)
    series = tmp_path / "series"  # a phantom scan of the demo's target as a DICOM series
    write_dicom_series(series, sitk.Cast(sitk.ReadImage(str(_demo(demo_runs)["scan"])), sitk.sitkInt16), "1.2.3.4")
    _referable()(sorted(series.iterdir()))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        predict_main(["--run", str(demo_runs[0]), "--input", str(series), "--output", str(out),
                      "--dicom-seg", str(tmp_path / "seg.dcm"), "--no-progress"])
    assert info.value.code == 2 and "not on the DICOM series' grid" in one_line(capsys.readouterr().err)
    assert snapshot(out) == {} and not (tmp_path / "seg.dcm").exists()


def test_dicom_seg_needs_a_3d_network_before_any_work(tmp_path, write_dicom_series):
    from types import SimpleNamespace

    from segadapt.inference import predict_to_folder

    def never(scan):
        raise AssertionError("predicted before the request was checked")

    planar = SimpleNamespace(preprocess=PreprocessConfig(spatial_dims=2, orientation="RA", patch_size=[64, 64],
                                                         slice_size=[64, 64]),
                             adapters=[], base=tmp_path / "base.safetensors", predict=never, domain=None,
                             label_names={1: "lesion"})
    series = _series(tmp_path, write_dicom_series, _referable())
    with pytest.raises(ValueError, match="--dicom-seg needs a 3D network .* this run's is 2D"):
        predict_to_folder(planar, series, tmp_path / "out", progress=False, dicom_seg=tmp_path / "seg.dcm")
    assert not (tmp_path / "out").exists() and not (tmp_path / "seg.dcm").exists()


def test_predict_force_loads_an_adapter_made_on_other_base_weights(demo_runs, tmp_path, capsys):
    demo = _demo(demo_runs)
    argv = ["--run", str(demo["run"]), "--base", str(_perturbed_base(tmp_path, demo["base"])), "--input",
            str(demo["scan"]), "--output", str(tmp_path / "out"), "--no-progress", "--force"]
    with pytest.warns(UserWarning, match="other weights.*loaded anyway"):
        rows = predict_main(argv)
    assert len(rows) == 1 and Path(rows[0]["mask"]).is_file()


_KILL_AT_SECOND_MASK = """
import os, sys
real_replace = os.replace
masks = []
def replace(src, dst):
    if str(dst).endswith("_mask.nii.gz"):
        masks.append(dst)
        if len(masks) == 2:
            os._exit(9)  # like kill -9: no finally, no cleanup
    real_replace(src, dst)
os.replace = replace
from segadapt.inference.cli import main
main(sys.argv[1:])
"""


def test_kill_9_during_predict_leaves_no_unlisted_mask_and_the_next_run_cleans_up(demo_runs, tmp_path):
    demo = _demo(demo_runs)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for scan in sorted(demo["scan"].parent.glob("*.nii.gz"))[:3]:
        shutil.copy(scan, inputs)
    out = tmp_path / "out"
    argv = ["--run", str(demo["run"]), "--input", str(inputs), "--output", str(out), "--no-progress", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _KILL_AT_SECOND_MASK, *argv], env=env, capture_output=True, text=True, encoding="utf-8", errors="replace")
    assert done.returncode == 9, done.stderr[-2000:]
    import csv

    def listed() -> set[str]:
        with open(out / CSV_FILE, encoding="utf-8") as handle:
            return {Path(r["mask"]).name for r in csv.DictReader(handle)}

    masks = {p.name for p in out.glob("*_mask.nii.gz")}
    assert len(masks) == 1 and masks <= listed()  # the second mask was listed, then killed before its rename
    assert [p for p in out.iterdir() if p.name.startswith(".")], "the killed run's temporary file is there"
    rows = predict_main(argv)
    assert len(rows) == 3 and listed() == {p.name for p in out.glob("*_mask.nii.gz")} and len(listed()) == 3
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files were cleaned up"


def test_volumes_csv_keeps_the_masks_of_an_earlier_run(demo_runs, tmp_path):
    demo = _demo(demo_runs)
    scans = sorted(demo["scan"].parent.glob("*.nii.gz"))[:2]
    out = tmp_path / "out"
    for scan in scans:  # two runs into one folder, one scan each
        predict_main(["--run", str(demo["run"]), "--input", str(scan), "--output", str(out), "--no-progress"])
    import csv

    with open(out / CSV_FILE, encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [Path(r["input"]).name for r in rows] == [s.name for s in scans]
    assert {Path(r["mask"]).name for r in rows} == {p.name for p in out.glob("*_mask.nii.gz")}


# ---- export command line -------------------------------------------------------------------------
def _run_copy(tmp: Path, run: Path, edit=None) -> Path:
    copy_ = tmp / "run"
    shutil.copytree(run, copy_)
    if edit is not None:
        edit(copy_)
    return copy_


def _append(text: str):
    def edit(run: Path):
        with open(run / "config.yaml", "a", encoding="utf-8") as handle:
            handle.write(text)
    return edit


def _edit_module_lines(edit):
    def apply(run: Path):
        lines = (run / "config.yaml").read_text(encoding="utf-8").splitlines()
        edited = edit(lines)
        assert edited != lines
        (run / "config.yaml").write_text("\n".join(edited) + "\n", encoding="utf-8")
    return apply


_drop_model_key = _edit_module_lines(lambda lines: [line for line in lines if not line.startswith("  model: ")])
_unknown_module_key = _edit_module_lines(lambda lines: [*(f"{line}\n  no_such_option: 1" if line == "module:" else line
                                                         for line in lines)])


def _nan_adapter(run: Path):
    rewrite(run / "adapter.safetensors", lambda ts, m: ts.update({k: _nan_half(v) for k, v in ts.items()}),
            run / "adapter.safetensors")


def _existing(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"an earlier export")
    return path


def _hard_link(tmp: Path, target: Path) -> Path:
    os.link(target, tmp / "link.safetensors")
    return tmp / "link.safetensors"


EXPORT_CASES = {
    # name: (argv(run, tmp), texts)
    # 19.4: never over the run's own files, its base or its data (--force or not); an existing output only with --force
    "merged_over_the_base": (lambda r, t: [r, "--merged", r / ".." / ".." / ".." / "base" / "model.safetensors", "--force"],
                             ["is the run's base checkpoint", "an export never writes over it, --force or not"]),
    "merged_over_config_yaml": (lambda r, t: [r, "--merged", r / "config.yaml", "--force"],
                                ["config.yaml is a file of the run folder"]),
    "merged_over_the_adapter": (lambda r, t: [r, "--merged", r / "adapter.safetensors"], ["adapter.safetensors is a file of the run"]),
    "merged_over_the_fingerprint_by_a_hard_link": (lambda r, t: [r, "--merged", _hard_link(t, r / "fingerprint.json"), "--force"],
                                                   ["link.safetensors is a file of the run folder", "fingerprint.json"]),
    "merged_over_the_dataset_json": (lambda r, t: [r, "--merged", r.parents[2].parent / "data" / "sah" / "dataset.json", "--force"],
                                     ["is the run's dataset.json"]),
    "merged_exists": (lambda r, t: [r, "--merged", _existing(t / "old.safetensors")],
                      ["old.safetensors exists; give --force to overwrite it"]),
    "peft_file_exists": (lambda r, t: [r, "--merged", t / "m.safetensors", "--peft", _existing(t / "p" / "adapter_config.json").parent],
                         ["adapter_config.json exists; give --force"]),
    "peft_of_a_run_tuned_in_full": (lambda r, t: [r.parents[2] / "base", "--peft", t / "p"],
                                    ["the network has no adapter (a full / decoder / scratch run): use --merged"]),
    "nnunet_of_another_model": (lambda r, t: [r, "--merged", t / "m.safetensors", "--nnunet", t / "n"],
                                ["model 'multiview_unet'; only model=nnunet runs export to nnU-Net's format"]),
    "merged_is_a_folder": (lambda r, t: [r, "--merged", t], ["--merged file", "is a folder; give a file name"]),
    "merged_in_read_only_folder": (lambda r, t: [r, "--merged", _readonly(t) / "m.safetensors"],
                                   ["readonly is not writable"]),
    "merged_under_a_file": (lambda r, t: [r, "--merged", r / "config.yaml" / "m.safetensors"],
                            ["config.yaml is a file, not a folder"]),
    "peft_is_a_file": (lambda r, t: [r, "--peft", r / "config.yaml"], ["--peft folder", "is a file, not a folder"]),
    "config_not_yaml": (lambda r, t: [_run_copy(t, r, _append("module: [unclosed\n")), "--merged", t / "m.safetensors"],
                        ["config.yaml is not readable YAML"]),
    "config_without_model": (lambda r, t: [_run_copy(t, r, _drop_model_key), "--merged", t / "m.safetensors"],
                             ["config.yaml has no module.model"]),
    "config_unknown_module_key": (lambda r, t: [_run_copy(t, r, _unknown_module_key), "--merged", t / "m.safetensors"],
                                  ["config.yaml does not describe a run's network", "no_such_option"]),
    "adapter_with_nan": (lambda r, t: [_run_copy(t, r, _nan_adapter), "--merged", t / "m.safetensors"],
                         ["adapter.safetensors", "NaN or infinite"]),
    "not_a_run_folder": (lambda r, t: [t, "--merged", t / "m.safetensors"], ["no config.yaml"]),
    "unfinished_run_merged": (lambda r, t: [_unfinished(t, r), "--merged", t / "m.safetensors"], UNFINISHED),
    "unfinished_run_peft": (lambda r, t: [_unfinished(t, r), "--peft", t / "peft"], UNFINISHED),
    "unfinished_run_bundle": (lambda r, t: [_unfinished(t, r), "--bundle", t / "bundle"], UNFINISHED),
    "unfinished_run_nnunet": (lambda r, t: [_unfinished(t, r), "--nnunet", t / "nnunet"], UNFINISHED),
    "metrics_not_json": (lambda r, t: [_run_copy(t, r, lambda c: _file(c / "metrics.json", "{")),
                                       "--merged", t / "m.safetensors"], ["metrics.json is not readable JSON"]),
}


@pytest.mark.parametrize("name", EXPORT_CASES)
def test_export_refuses_bad_input_with_exit_2_and_one_line(name, demo_runs, tmp_path, capsys):
    argv, expected = EXPORT_CASES[name]
    argv = [str(a) for a in argv(demo_runs[0], tmp_path)]
    watched = [tmp_path, demo_runs[0].parents[2].parent]  # the runs (base included) and their data
    before = [snapshot(f) for f in watched]
    refused(export_main, argv, "export", expected, capsys)
    assert [snapshot(f) for f in watched] == before


# ---- plan command line ---------------------------------------------------------------------------
PLAN_CASES = {
    # name: (argv(dataset_json, tmp), texts); the dataset: phantom cases in data/imagesTr, data/labelsTr
    "out_is_the_dataset_json": (lambda d, t: [d, "--out", d], ["dataset.json is a file of the dataset"]),
    "out_is_the_dataset_json_even_with_overwrite": (lambda d, t: [d, "--out", d, "--overwrite"],
                                                    ["dataset.json is a file of the dataset"]),
    "out_over_an_image": (lambda d, t: [d, "--out", d.parent / "imagesTr" / "sah_000.nii.gz", "--overwrite"],
                          ["sah_000.nii.gz is a file of the dataset"]),
    "fingerprint_over_a_label": (lambda d, t: [d, "--out", t / "plan.json", "--fingerprint",
                                               d.parent / "labelsTr" / "sah_001.nii.gz"],
                                 ["labelsTr/sah_001.nii.gz is a file of the dataset"]),
    "out_symlink_to_the_dataset_json": (lambda d, t: [d, "--out", _link(t / "plan.json", d), "--overwrite"],
                                        ["plan.json is a file of the dataset"]),
    "out_new_file_in_images": (lambda d, t: [d, "--out", d.parent / "imagesTr" / "plan.json"],
                               ["is inside the dataset's case folder", "imagesTr"]),
    "fingerprint_default_in_labels": (lambda d, t: [d, "--out", d.parent / "labelsTr" / "plan.json"],
                                      ["is inside the dataset's case folder", "labelsTr"]),
    "out_named_as_a_splits_file": (lambda d, t: [d, "--out", d.parent / "splits_5fold_seed0.json"],
                                   ["splits_5fold_seed0.json is a file of the dataset"]),
    "fingerprint_over_nnunet_splits": (lambda d, t: [d, "--out", t / "plan.json", "--fingerprint",
                                                     _file(d.parent / "splits_final.json", "[]"), "--overwrite"],
                                       ["splits_final.json is a file of the dataset"]),
    "out_exists": (lambda d, t: [d, "--out", _file(t / "plan.json")], ["plan.json exists; give --overwrite"]),
    "fingerprint_exists": (lambda d, t: [d, "--out", t / "plan.json", "--fingerprint", _file(t / "fp.json")],
                           ["fp.json exists; give --overwrite"]),
    "out_and_fingerprint_one_file": (lambda d, t: [d, "--out", t / "p.json", "--fingerprint", t / "p.json"],
                                     ["--out and --fingerprint name one file"]),
    "out_is_a_folder": (lambda d, t: [d, "--out", t], ["is a folder; give a file name"]),
}


@pytest.fixture()
def plan_dataset(tmp_path) -> Path:
    from segadapt.data import make_phantom_dataset

    return make_phantom_dataset(tmp_path / "data", "sah", 2, shape=(40, 40, 20), spacing=(5.5, 5.5, 8.0))


@pytest.mark.parametrize("name", PLAN_CASES)
def test_plan_refuses_outputs_over_its_input_with_exit_2_and_one_line(name, plan_dataset, tmp_path, capsys):
    from segadapt.plan.cli import main as plan_main

    argv, expected = PLAN_CASES[name]
    argv = [str(a) for a in argv(plan_dataset, tmp_path)]
    before = snapshot(tmp_path)
    refused(plan_main, argv, "plan", expected, capsys)
    assert snapshot(tmp_path) == before


def test_plan_overwrite_replaces_its_own_outputs(plan_dataset, tmp_path, capsys):
    from segadapt.plan import Plan
    from segadapt.plan.cli import main as plan_main

    out, fp = _file(tmp_path / "plan.json", "old"), _file(tmp_path / "fingerprint.json", "old")
    data = snapshot(plan_dataset.parent)
    plan = plan_main([str(plan_dataset), "--out", str(out), "--overwrite"])
    assert Plan.from_json(out) == plan and json.loads(fp.read_text(encoding="utf-8"))["n_cases"] == 2
    assert snapshot(plan_dataset.parent) == data


# ---- an unfinished run in the other commands -----------------------------------------------------
def _diagnose_unfinished(runs: list[Path], tmp: Path) -> tuple[Path, list[str]]:
    from segadapt.inference.diagnose import main

    return main, [str(_unfinished(tmp, runs[0])), "--out", str(tmp / "diagnosis")]


def _report_unfinished(runs: list[Path], tmp: Path) -> tuple[Path, list[str]]:
    """An experiment folder of three folds, the second killed before its end (fold1/killed_run's name in the
    message is not asked for: the folder is fold1)."""
    from segadapt.cli import report_main

    experiment = tmp / "experiment"
    for k, run in enumerate(runs):
        shutil.copytree(run, experiment / "multiview_unet" / "cp_lora" / f"fold{k}")
    (experiment / "multiview_unet" / "cp_lora" / "fold1" / "metrics.json").unlink()
    return report_main, [str(experiment)]


@pytest.mark.parametrize("command", ["diagnose", "report"])
def test_an_unfinished_run_is_refused_by_diagnose_and_report(command, demo_runs, tmp_path, capsys):
    """A run killed after its adapter file appeared, before metrics.json (its adapter may be any step's):
    exit 2, one line naming the folder, nothing written."""
    main, argv = {"diagnose": _diagnose_unfinished, "report": _report_unfinished}[command](demo_runs, tmp_path)
    watched = [tmp_path, *demo_runs]
    before = [snapshot(f) for f in watched]
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    message = one_line(capsys.readouterr().err)
    folder = "killed_run" if command == "diagnose" else "cp_lora/fold1"
    assert message.startswith("error: ") and f"{folder} is unfinished (no metrics.json" in message, message
    assert [snapshot(f) for f in watched] == before


@pytest.mark.parametrize("cfg", [PreprocessConfig(cache="none"), PreprocessConfig(cache="none", intensity="mri"),
                                 PreprocessConfig(cache="none", intensity="mri", target_spacing=[1.0, 1.0, 1.0])],
                         ids=["ct", "mri", "mri_resampled_1mm"])
def test_very_anisotropic_case_loads(tmp_path, cfg):
    """A valid 0.1 x 0.1 x 20 mm case (an image with contrast) is not refused as blank: it loads, its grid kept
    (or resampled to 1 mm: ceil((n - 1) * spacing / 1) + 1 voxels between the first and last centre, 5 and 101)."""
    rng = np.random.default_rng(0)
    image = rng.normal(100, 20, (40, 40, 6)).astype(np.float32)
    affine = np.diag([0.1, 0.1, 20.0, 1.0])
    case = _case_files(tmp_path, image, image_affine=affine, label_affine=affine)
    out = val_transforms(cfg, (0, 1), 1)(case)
    expected = (40, 40, 6) if cfg.target_spacing is None else (5, 5, 101)
    assert tuple(out["image"].shape[1:]) == expected and tuple(out["label"].shape[1:]) == expected
    spacing = np.linalg.norm(np.asarray(out["image"].affine)[:3, :3], axis=0)
    assert spacing == pytest.approx([0.1, 0.1, 20.0] if cfg.target_spacing is None else [1.0, 1.0, 1.0])
