"""Dataset builders: the three cache modes agree, the disk cache is keyed by config and file state."""

from __future__ import annotations

import os
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from monai.data import DataLoader, MetaTensor

from segadapt.data import (
    CaseError,
    PreprocessConfig,
    build_dataset,
    disk_cache_dir,
    fold_datasets,
    load_dataset_json,
    make_phantom_dataset,
    val_transforms,
)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    return make_phantom_dataset(root / "sah", "sah", n=6, seed=3, shape=(40, 40, 12), spacing=(5.5, 5.5, 13.0))


def _cfg(tmp_path, **kw):
    kw = {"patch_size": [16, 16, 8], "slice_size": [24, 24], **kw}
    return PreprocessConfig(cache_dir=str(tmp_path / "cache"), samples_per_volume=2, **kw)


def test_cache_modes_give_the_same_validation_volumes(phantom, tmp_path):
    outputs = {}
    for mode in ("none", "memory", "disk"):
        train, val = fold_datasets(phantom, 1, _cfg(tmp_path, cache=mode), n_folds=3, seed=0)
        assert len(train) == 4 and len(val) == 2
        outputs[mode] = [val[i] for i in range(len(val))]
    for a, b, c in zip(outputs["none"], outputs["memory"], outputs["disk"]):
        assert a["case_id"] == b["case_id"] == c["case_id"]
        for key in ("image", "label"):
            torch.testing.assert_close(a[key].as_tensor(), b[key].as_tensor())
            torch.testing.assert_close(a[key].as_tensor(), c[key].as_tensor())
        torch.testing.assert_close(a["image"].affine, c["image"].affine)
    train_ids = {d["case_id"] for d in train.data}
    assert not train_ids & {d["case_id"] for d in val.data}
    assert train_ids | {d["case_id"] for d in val.data} == {c.case_id for c in load_dataset_json(phantom).cases}


@pytest.mark.parametrize(("sampling", "shape"), [("patch", (3, 16, 16, 8)), ("slice", (3, 24, 24))])
def test_training_batches(phantom, tmp_path, sampling, shape):
    train, _ = fold_datasets(phantom, 0, _cfg(tmp_path, cache="memory"), n_folds=3, sampling=sampling)
    batch = next(iter(DataLoader(train, batch_size=2)))  # 2 volumes x 2 samples, flattened
    assert batch["image"].shape == (4, *shape) and batch["label"].shape == (4, 1, *shape[1:])
    assert set(torch.unique(batch["label"]).tolist()) <= {0.0, 1.0}


def test_disk_cache_is_keyed_by_config_and_file_state(phantom, tmp_path):
    cfg = _cfg(tmp_path, cache="disk")
    _, val = fold_datasets(phantom, 0, cfg, n_folds=3)
    first = val[0]
    folder = disk_cache_dir(cfg, "phantom_sah")
    assert folder.name == f"phantom_sah-{cfg.cache_key()}" and len(list(folder.iterdir())) == 1
    other = _cfg(tmp_path, cache="disk", windows=[[40, 80]])
    _, val_other = fold_datasets(phantom, 0, other, n_folds=3)
    assert val_other[0]["image"].shape[0] == 1 and disk_cache_dir(other, "phantom_sah") != folder
    # Replacing a file's content (new mtime) makes a new cache entry holding the new content.
    image = val.data[0]["image"]
    stat = os.stat(image)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    again = val[0]
    assert len(list(folder.iterdir())) == 2
    np.testing.assert_array_equal(again["image"].numpy(), first["image"].numpy())


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_cached_reads_keep_values_and_meta(phantom, tmp_path, mode):
    """Every read (first and cache hit) is the uncached MetaTensor: same values, shape and affine."""
    cfg = _cfg(tmp_path, cache=mode)
    train, val = fold_datasets(phantom, 0, cfg, n_folds=3)
    _, plain = fold_datasets(phantom, 0, replace(cfg, cache="none"), n_folds=3)
    for i in range(len(val)):
        reads = [val[i], val[i]]
        if mode == "disk":  # the second read is a hit: the cache file is not rewritten
            files = {f: f.stat().st_mtime_ns for f in disk_cache_dir(cfg, "phantom_sah").iterdir()}
            reads.append(val[i])
            assert files == {f: f.stat().st_mtime_ns for f in disk_cache_dir(cfg, "phantom_sah").iterdir()}
        expected = plain[i]
        for item in reads:
            for key in ("image", "label"):
                assert isinstance(item[key], MetaTensor), (mode, i, key, type(item[key]))
                assert item[key].shape == expected[key].shape
                torch.testing.assert_close(item[key].as_tensor(), expected[key].as_tensor())
                torch.testing.assert_close(item[key].affine, expected[key].affine)
    for i in range(len(train)):
        for _ in range(2):
            assert all(isinstance(patch["image"], MetaTensor) for patch in train[i])


@pytest.mark.parametrize("sampling", ["patch", "slice"])
def test_training_cases_are_not_cached_with_training_only_steps(phantom, tmp_path, sampling):
    """A case read for training (fold 0), then for validation (fold 1), validates on the unpadded volume."""
    cfg = _cfg(tmp_path, cache="disk", patch_size=[64, 64, 32], slice_size=[64, 64])
    train, _ = fold_datasets(phantom, 0, cfg, n_folds=3, sampling=sampling)
    for i in range(len(train)):
        patches = train[i]
        size = (64, 64, 32) if sampling == "patch" else (64, 64)
        assert all(p["image"].shape == (3, *size) for p in patches)
    for fold in (1, 2):
        _, val = fold_datasets(phantom, fold, cfg, n_folds=3)
        _, plain = fold_datasets(phantom, fold, replace(cfg, cache="none"), n_folds=3)
        for i in range(len(val)):
            assert val[i]["image"].shape == plain[i]["image"].shape, val.data[i]["case_id"]


def test_disk_cache_reruns_the_case_checks_when_they_change(phantom, tmp_path):
    """The case checks (label values, channels, affine tolerance) key the cache files too."""
    cfg = _cfg(tmp_path, cache="disk")
    case = load_dataset_json(phantom).cases[0]
    folder = disk_cache_dir(cfg, "p")
    build_dataset([case], val_transforms(cfg, (0, 1), 1), cfg, "p")[0]
    build_dataset([case], val_transforms(cfg, (0, 1), 1), cfg, "p")[0]
    assert len(list(folder.iterdir())) == 1
    with pytest.raises(RuntimeError) as info:  # the lesion label 1 is no longer allowed: checked, not a cache hit
        build_dataset([case], val_transforms(cfg, (0,), 1), cfg, "p")[0]
    assert isinstance(info.value.__cause__, CaseError) and case.case_id in str(info.value.__cause__)
    build_dataset([case], val_transforms(cfg, (0, 1, 2), 1), cfg, "p")[0]
    build_dataset([case], val_transforms(replace(cfg, affine_tolerance=0.5), (0, 1), 1), cfg, "p")[0]
    assert len(list(folder.iterdir())) == 3
    with pytest.raises(RuntimeError) as info:
        build_dataset([case], val_transforms(cfg, (0, 1), 2), cfg, "p")[0]
    assert isinstance(info.value.__cause__, CaseError) and "expected 2 channel(s)" in str(info.value.__cause__)


class _Marker:
    """A pickle that, when unpickled, creates the file `path` (stands for arbitrary code)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _same(a, b, where=""):
    """Equal trees: dicts, lists/tuples (type kept), arrays/tensors by value, transform ids left out."""
    if isinstance(a, (torch.Tensor, np.ndarray)):
        assert type(a) is type(b) or (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)), where
        assert a.shape == b.shape and a.dtype == b.dtype, (where, a.shape, b.shape, a.dtype, b.dtype)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=where)
        return
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            if k != "id":
                _same(a[k], b[k], f"{where}.{k}")
        return
    if isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
        return
    assert a == b or (a != a and b != b), (where, a, b)  # NaN == NaN here


def test_disk_cache_never_unpickles_and_rebuilds_a_tampered_file(phantom, tmp_path):
    cfg = _cfg(tmp_path, cache="disk", target_spacing=[6.0, 6.0, 10.0])
    _, val = fold_datasets(phantom, 0, cfg, n_folds=3)
    _, plain = fold_datasets(phantom, 0, replace(cfg, cache="none"), n_folds=3)
    first = val[0]
    (cached,) = disk_cache_dir(cfg, "phantom_sah").iterdir()
    hit = val[0]  # a cache hit is the first read: values, affine, meta and the transform trace (Invertd needs it)
    for key in ("image", "label"):
        torch.testing.assert_close(hit[key].as_tensor(), plain[0][key].as_tensor(), rtol=0, atol=0)
        _same(dict(hit[key].meta), dict(first[key].meta), key)
        _same(list(hit[key].applied_operations), list(first[key].applied_operations), key)
    marker = tmp_path / "pwned"
    for name in (cached, cached.with_suffix(".pt")):  # our file name, and MONAI's pickle name for the same key
        torch.save({"image": _Marker(marker)}, name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, again = fold_datasets(phantom, 0, cfg, n_folds=3)  # a new setup()
        item = again[0]
    assert not marker.exists(), "the planted pickle ran"
    assert any(f"{cached.name} is unreadable" in str(w.message) and "rebuilding" in str(w.message) for w in caught)
    torch.testing.assert_close(item["image"].as_tensor(), plain[0]["image"].as_tensor())
    torch.testing.assert_close(item["label"].affine, plain[0]["label"].affine)
    from segadapt.data.cache import load_item

    torch.testing.assert_close(load_item(cached)["image"].as_tensor(), plain[0]["image"].as_tensor())  # rebuilt


def test_disk_cache_item_of_another_case_is_rebuilt(phantom, tmp_path):
    """A valid cache file copied over another case's file (a validation case's item under a training case's
    name) is not used: the item names its case and files' digests; the mismatch is rebuilt with a warning."""
    cfg = _cfg(tmp_path, cache="disk")
    _, val = fold_datasets(phantom, 0, cfg, n_folds=3)
    _, plain = fold_datasets(phantom, 0, replace(cfg, cache="none"), n_folds=3)
    assert len(val) >= 2
    folder = disk_cache_dir(cfg, "phantom_sah")
    first = set(folder.iterdir())
    val[0]
    (item0,) = set(folder.iterdir()) - first
    val[1]
    (item1,) = set(folder.iterdir()) - first - {item0}
    item1.write_bytes(item0.read_bytes())  # case 0's item under case 1's name
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = val[1]
    assert got["case_id"] == val.data[1]["case_id"]
    torch.testing.assert_close(got["image"].as_tensor(), plain[1]["image"].as_tensor(), rtol=0, atol=0)
    warned = [str(w.message) for w in caught if "disk cache file" in str(w.message)]
    assert len(warned) == 1 and item1.name in warned[0] and repr(val.data[0]["case_id"]) in warned[0] \
        and repr(val.data[1]["case_id"]) in warned[0] and "rebuilding" in warned[0], warned
    from segadapt.data.cache import load_item

    assert load_item(item1)["case_id"] == val.data[1]["case_id"]  # the file was rebuilt for its own case
