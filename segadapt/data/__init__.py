"""segadapt.data: datasets, readers, preprocessing pipelines, k-fold splits and a head-CT phantom.

Public API (everything below is importable from ``segadapt.data``)::

    # dataset description (dataset_json.py)
    load_dataset_json(path) -> DatasetDescription            # validated; absolute paths
    load_test_cases(path) -> tuple[CaseEntry, ...]           # labelled 'test' entries, or imagesTs/ + labelsTs/
    DatasetDescription(path, name, modality, labels, cases)  # .root .channels .label_values .case(id)
    CaseEntry(case_id, image, label, patient_id)             # .as_dict() -> MONAI data dict
    write_dataset_json(path, name, cases, labels, modality=None, **extra) -> Path
    pair_cases_by_name(images_dir, labels_dir, prefix="") -> list[dict]   # for prepare scripts
    remap_label_file(src, dst, mapping=None) -> Path                      # binarise / select label values

    # reading (readers.py, loading.py)
    SimpleITKReader()                   # MONAI ImageReader: .nrrd/.mha/.mhd and DICOM series folders
    make_loader(keys) -> LoadImaged     # NIfTI (nibabel), NRRD/MHA/MHD/DICOM (SimpleITK), PNG; channel first
    LoadCased(keys, label_values, channels, spatial_dims, affine_tolerance)  # read + check_case
    check_case(data, label_values, channels, spatial_dims, affine_tolerance)
    CaseError(ValueError)               # a case that cannot be used; names the case and file

    # preprocessing (config.py; pipelines.py: the one preprocessing spec; transforms.py: array/dict pairs)
    SLICE_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}   # view -> RAS array axis normal to it
    AXIS_VIEWS = {0: "sagittal", 1: "coronal", 2: "axial"}   # the inverse (RandSliced's 'view' -> name)
    PreprocessConfig(intensity, windows, target_spacing, orientation, spatial_dims, crop_foreground,
                     foreground_threshold, clip_range, norm_mean, norm_std, background_value, patch_size,
                     slice_size, slice_axes, samples_per_volume, positive_fraction, augment, cache, cache_dir,
                     affine_tolerance)   # intensity: 'ct' | 'ct_zscore' | 'zscore' | 'mri' | 'rgb'
        .cache_key() -> str   .in_channels -> int   .to_dict() / .from_dict(d)
    patch_train_transforms(cfg, label_values=None, channels=1) -> Compose   # 3D (or 2D-image) patches
    slice_train_transforms(cfg, label_values=None, channels=1) -> Compose   # multi-view 2D slices + 'view'
    val_transforms(cfg, label_values=None, channels=1) -> Compose           # whole volume + label
    inference_transforms(cfg, channels=1) -> Compose                        # whole volume, image only
    invert_transform(pipeline, keys="pred", nearest=False) -> Invertd       # back to the input grid
    preprocessing_spec(cfg, keys, label_values, channels, checked=True) -> [{"_target_": ..., **args}]  # MONAI config
    CTWindow(windows), CTZScore(clip_range, mean, std), ZScore(background)  # array transforms; +d: dict (keys, ...)
    RandSliced(...)

    # the dataset fingerprint and plan (nnU-Net's rules) are the layer above: segadapt.plan

    # datasets and splits (datasets.py, splits.py)
    build_dataset(cases, transform, cfg, name="dataset", cache_workers=1) -> Dataset
    fold_datasets(dataset_json, fold, cfg, n_folds=5, seed=0, sampling="patch"|"slice",
                  splits_path=None, cache_workers=1) -> (train Dataset, val Dataset)
    fold_datasets_with_inner(..., inner_fraction=0.0, max_train_cases=None) -> FoldDatasets(train, val, inner)
    build_test_set(dataset_json, cfg) -> Dataset   # labelled test split (load_test_cases); ValueError without one
    disk_cache_dir(cfg, name) -> Path
    load_or_create_splits(dataset_json, n_folds=5, seed=0, path=None) -> Splits  # .val_ids(f) .train_ids(f)
    make_splits(cases, volumes_ml, n_folds, seed) -> list[list[str]]
    fold_cases(description, splits, fold) -> (train cases, val cases)
    inner_split(train_cases, fraction, seed, fold) -> (rest, inner)   # model selection, patient-grouped
    subset_cases(cases, n, seed, fold) -> first n of a seeded permutation (learning curves)
    lesion_volume_ml(label_path) -> float

    # phantom (phantom/; also `python -m segadapt.data.phantom --domain tbi --n 24 --out DIR`)
    make_phantom_dataset(out_dir, domain, n, seed=0, shape=(96, 96, 40), spacing=(2.3, 2.3, 4.0)) -> Path
    make_case(domain, rng, shape, spacing, size) -> (image int16 HU, mask uint8, affine)
    segadapt.data.phantom.case_rng(seed, index, domain) -> np.random.Generator   # case i's generator

Typical use (training)::

    cfg = PreprocessConfig(patch_size=[64, 64, 32], cache="memory")
    train_ds, val_ds = fold_datasets("data/phantom_sah/dataset.json", 0, cfg, n_folds=3)  # fold 0 of 3
    loader = monai.data.DataLoader(train_ds, batch_size=2, shuffle=True)  # list_data_collate flattens

Labels: a case's declared label values reach the pipelines as class indices (the i-th sorted value becomes i:
``{0: background, 2: lesion}`` gives 0 / 1; :func:`~segadapt.data.loading.label_classes`). Two cases reading one
image (same resolved path, a link, or identical bytes) are refused by :func:`load_dataset_json` and
:func:`load_test_cases`, naming both case ids.

Errors: a bad ``dataset.json`` raises at :func:`load_dataset_json`; a bad case raises :class:`CaseError`
(or ``FileNotFoundError``) when first read, before anything is cached; inside a MONAI ``Compose`` it
arrives as the cause of MONAI's ``RuntimeError("applying transform ...")``.
"""

from .config import AXIS_VIEWS, CACHE_MODES, INTENSITY_MODES, SLICE_AXES, PreprocessConfig
from .dataset_json import CaseEntry, DatasetDescription, load_dataset_json, load_test_cases, pair_cases_by_name, write_dataset_json
from .datasets import FoldDatasets, build_dataset, build_test_set, disk_cache_dir, fold_datasets, fold_datasets_with_inner
from .files import remap_label_file
from .loading import CaseError, LoadCased, check_case
from .phantom import make_case, make_phantom_dataset
from .readers import SimpleITKReader, make_loader
from .splits import Splits, fold_cases, inner_split, lesion_volume_ml, load_or_create_splits, make_splits, subset_cases
from .pipelines import (
    inference_transforms,
    invert_transform,
    patch_train_transforms,
    preprocessing_spec,
    slice_train_transforms,
    val_transforms,
)
from .transforms import CTWindow, CTWindowd, CTZScore, CTZScored, RandSliced, ZScore, ZScored

__all__ = [
    "AXIS_VIEWS",
    "CACHE_MODES",
    "INTENSITY_MODES",
    "SLICE_AXES",
    "CTWindow",
    "CTWindowd",
    "CTZScore",
    "CTZScored",
    "CaseEntry",
    "CaseError",
    "DatasetDescription",
    "FoldDatasets",
    "LoadCased",
    "PreprocessConfig",
    "RandSliced",
    "SimpleITKReader",
    "Splits",
    "ZScore",
    "ZScored",
    "build_dataset",
    "build_test_set",
    "check_case",
    "disk_cache_dir",
    "fold_cases",
    "fold_datasets",
    "fold_datasets_with_inner",
    "inference_transforms",
    "inner_split",
    "invert_transform",
    "lesion_volume_ml",
    "load_dataset_json",
    "load_test_cases",
    "load_or_create_splits",
    "make_case",
    "make_loader",
    "make_phantom_dataset",
    "make_splits",
    "pair_cases_by_name",
    "patch_train_transforms",
    "preprocessing_spec",
    "remap_label_file",
    "slice_train_transforms",
    "subset_cases",
    "val_transforms",
    "write_dataset_json",
]
