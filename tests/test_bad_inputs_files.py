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
from segadapt.data import CaseError, PreprocessConfig, make_loader, val_transforms
from segadapt.data.files import save_nifti, save_safetensors, write_json
from segadapt.data.loading import LoadCased
from segadapt.data.readers import read_dicom_series
from segadapt.export import main as export_main
from segadapt.inference import CSV_FILE
from segadapt.inference import main as predict_main
from segadapt.models.pretrained import load_pretrained

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
    "metrics_not_json": (lambda d, t, o, w: ["--run", _run_with_metrics(d["run"], t, lambda text: text[:-20]),
                                             "--input", d["scan"]], ["cannot read", "run_copy/metrics.json"]),
    "postprocessing_for_other_classes": (lambda d, t, o, w: ["--run", _run_with_metrics(d["run"], t, _two_classes),
                                                             "--input", d["scan"]],
        ["postprocessing (metrics.json) is for 2 class(es)", "1 foreground class(es)"]),
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
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        predict_main([*argv, "--no-progress"])
    assert info.value.code == 2
    message = one_line(capsys.readouterr().err)
    assert message.startswith("segadapt predict: error: ")
    for text in expected:
        assert text in message, (text, message)
    assert [snapshot(f) for f in watched] == before
    assert not out.exists()


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
from segadapt.inference import main
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
    done = subprocess.run([sys.executable, "-c", _KILL_AT_SECOND_MASK, *argv], env=env, capture_output=True, text=True)
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


EXPORT_CASES = {
    # name: (argv(run, tmp), texts)
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
}


@pytest.mark.parametrize("name", EXPORT_CASES)
def test_export_refuses_bad_input_with_exit_2_and_one_line(name, demo_runs, tmp_path, capsys):
    argv, expected = EXPORT_CASES[name]
    argv = [str(a) for a in argv(demo_runs[0], tmp_path)]
    watched = [tmp_path, demo_runs[0]]
    before = [snapshot(f) for f in watched]
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        export_main(argv)
    assert info.value.code == 2
    message = one_line(capsys.readouterr().err)
    assert message.startswith("segadapt export: error: ")
    for text in expected:
        assert text in message, (text, message)
    assert [snapshot(f) for f in watched] == before
