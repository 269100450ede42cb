"""Dataset description: a Medical-Segmentation-Decathlon-style or an nnU-Net v2 ``dataset.json``, validated.

Decathlon / segadapt format (paths relative to the folder holding the file)::

    {
      "name": "phantom_sah",
      "modality": {"0": "CT"},                       # one entry per image channel (or nnU-Net's "channel_names")
      "labels": {"0": "background", "1": "haemorrhage"},
      "training": [
        {"image": "imagesTr/sah_000.nii.gz", "label": "labelsTr/sah_000.nii.gz",
         "case_id": "sah_000", "patient_id": "p000"},  # patient_id optional (defaults to case_id)
        ...
      ]
    }

``case_id`` names one scan and must be unique; ``patient_id`` names the patient, so several scans of one
patient share it and k-fold splits keep them together. A Decathlon file without ``case_id`` gets the image
file name (without extension) as its id. ``image`` may also be a DICOM series folder.

nnU-Net v2 raw dataset (read as it is; recognised by ``file_ending``, or name -> int ``labels`` without a
``training`` list)::

    {"channel_names": {"0": "T2", "1": "ADC"}, "labels": {"background": 0, "lesion": 1},
     "numTraining": 32, "file_ending": ".nii.gz"}
    imagesTr/<case>_0000.nii.gz, imagesTr/<case>_0001.nii.gz, ...  labelsTr/<case>.nii.gz   [imagesTs/...]

Cases are the label files of ``labelsTr`` (or nnU-Net's optional ``dataset`` mapping
``{case: {"images": [...], "label": ...}}``); each needs one image per channel, and ``numTraining`` must
equal their number. A region label (``"lesion": [1, 2]``) is taken when it names one value; a region of
several values (nnU-Net region training) is refused, as segadapt trains one class per label value.
Multi-channel cases list one image file per channel (:attr:`CaseEntry.images`), stacked when read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from segadapt.io import file_digest, file_signature, read_json_object, write_json

_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".mha", ".mhd", ".png", ".jpg", ".jpeg", ".bmp")


def strip_image_suffix(name: str) -> str:
    """'ct_001.nii.gz' -> 'ct_001' (known medical/image suffixes only)."""
    for suffix in sorted(_IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


@dataclass(frozen=True)
class CaseEntry:
    """One labelled scan with absolute paths."""

    case_id: str
    image: Path | tuple[Path, ...]
    """One image file (or DICOM folder, or a 4D file holding every channel), or one file per channel."""
    label: Path
    patient_id: str

    @property
    def images(self) -> tuple[Path, ...]:
        """The image files, one per channel (one for a single file)."""
        return self.image if isinstance(self.image, tuple) else (self.image,)

    def as_dict(self) -> dict[str, object]:
        """The MONAI data dict: {'image', 'label', 'case_id', 'patient_id'} with string paths ('image' a list
        of paths, one per channel, for an nnU-Net multi-channel case)."""
        image = [str(p) for p in self.image] if isinstance(self.image, tuple) else str(self.image)
        return {"image": image, "label": str(self.label), "case_id": self.case_id, "patient_id": self.patient_id}


@dataclass(frozen=True)
class DatasetDescription:
    """A validated ``dataset.json``: every file exists, case ids are unique, labels are integers."""

    path: Path
    name: str
    modality: dict[int, str]
    labels: dict[int, str]
    cases: tuple[CaseEntry, ...]
    test_images: tuple[tuple[str, tuple[Path, ...]], ...] = ()
    """nnU-Net ``imagesTs``: (case id, one file per channel) of the unlabelled test cases."""
    file_ending: str | None = None
    """nnU-Net's ``file_ending`` (None for a Decathlon-style file)."""

    @property
    def root(self) -> Path:
        return self.path.parent

    @property
    def channels(self) -> int:
        """Number of image channels (one per modality entry)."""
        return len(self.modality)

    @property
    def label_values(self) -> tuple[int, ...]:
        return tuple(sorted(self.labels))

    def case(self, case_id: str) -> CaseEntry:
        for entry in self.cases:
            if entry.case_id == case_id:
                return entry
        raise KeyError(f"{self.path}: no case {case_id!r}")


def _int_keyed(raw: object, field: str, path: Path) -> dict[int, str]:
    if not isinstance(raw, Mapping) or not raw:
        raise ValueError(f"{path}: {field!r} must be a non-empty mapping like {{'0': 'background'}}, got {raw!r}")
    try:
        return {int(k): str(v) for k, v in raw.items()}
    except ValueError as e:
        raise ValueError(f"{path}: {field!r} keys must be integers, got {list(raw)}") from e


def is_nnunet_v2(raw: Mapping) -> bool:
    """True for an nnU-Net v2 ``dataset.json``: a ``file_ending``, or ``labels`` mapping names to values and no
    Decathlon ``training`` list."""
    labels = raw.get("labels")
    return "file_ending" in raw or ("training" not in raw and isinstance(labels, Mapping) and bool(labels)
                                    and all(not isinstance(v, str) for v in labels.values()))


def _v2_labels(raw: object, path: Path) -> dict[int, str]:
    """nnU-Net's name -> value labels as value -> name; a one-value region counts as that value."""
    if not isinstance(raw, Mapping) or not raw:
        raise ValueError(f"{path}: 'labels' must be a non-empty mapping like {{'background': 0, 'lesion': 1}}")
    labels: dict[int, str] = {}
    for name, value in raw.items():
        if isinstance(value, (list, tuple)) and len(value) == 1:
            value = value[0]
        if isinstance(value, (list, tuple)):
            raise ValueError(f"{path}: label {name!r} is the region {list(value)} (nnU-Net region training); segadapt "
                             "trains one class per label value: remap the label files to one value per class "
                             "(segadapt.data.remap_label_file) and list them as name -> int")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{path}: label {name!r} has value {value!r}; expected a non-negative integer")
        if value in labels:
            raise ValueError(f"{path}: labels {labels[value]!r} and {name!r} share the value {value}")
        labels[value] = str(name)
    if 0 not in labels:
        raise ValueError(f"{path}: 'labels' has no background (value 0): {dict(raw)}")
    return labels


def _channel_files(folder: Path, ending: str, channels: int, path: Path) -> dict[str, tuple[Path, ...]]:
    """``<case>_<channel:04d><ending>`` files of `folder` grouped by case; every case needs every channel."""
    found: dict[str, dict[int, Path]] = {}
    for file in sorted(folder.iterdir()):
        name = file.name
        if not name.endswith(ending) or len(name) < len(ending) + 5 or name[-len(ending) - 5] != "_" \
                or not name[-len(ending) - 4:-len(ending)].isdigit():
            continue
        case, channel = name[:-len(ending) - 5], int(name[-len(ending) - 4:-len(ending)])
        found.setdefault(case, {})[channel] = file.resolve()
    for case, files in found.items():
        if sorted(files) != list(range(channels)):
            raise ValueError(f"{path}: case {case!r} in {folder} has channel files {sorted(files)}; channel_names "
                             f"declares {channels} ({case}_0000{ending} .. {case}_{channels - 1:04d}{ending})")
    return {case: tuple(files[c] for c in range(channels)) for case, files in found.items()}


def _load_v2(path: Path, raw: Mapping) -> DatasetDescription:
    """An nnU-Net v2 raw dataset (see the module docstring)."""
    labels = _v2_labels(raw.get("labels"), path)
    modality = _int_keyed(raw.get("channel_names", raw.get("modality")), "channel_names", path)
    ending = raw.get("file_ending")
    if not isinstance(ending, str) or not ending:
        raise ValueError(f"{path}: nnU-Net v2 dataset.json needs 'file_ending' (e.g. '.nii.gz')")
    channels = len(modality)
    root = path.parent
    cases: list[CaseEntry] = []
    if isinstance(raw.get("dataset"), Mapping):  # nnU-Net's explicit file list, paths relative to the folder
        for case, item in raw["dataset"].items():
            images = tuple((root / p).resolve() for p in item.get("images", []))
            label = (root / str(item.get("label", ""))).resolve()
            if len(images) != channels:
                raise ValueError(f"{path}: case {case!r} lists {len(images)} images for {channels} channel(s)")
            for file in (*images, label):
                if not file.is_file():
                    raise FileNotFoundError(f"{path}: case {case!r}: file not found: {file}")
            cases.append(CaseEntry(str(case), images if channels > 1 else images[0], label, str(case)))
    else:
        images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
        for folder in (images_dir, labels_dir):
            if not folder.is_dir():
                raise FileNotFoundError(f"{path}: nnU-Net folder not found: {folder}")
        images = _channel_files(images_dir, ending, channels, path)
        label_files = sorted(f for f in labels_dir.iterdir() if f.name.endswith(ending))
        for label in label_files:
            case = label.name[:-len(ending)]
            if case not in images:
                raise FileNotFoundError(f"{path}: case {case!r}: no image {images_dir / (case + '_0000' + ending)}")
            files = images[case]
            cases.append(CaseEntry(case, files if channels > 1 else files[0], label.resolve(), case))
        unlabelled = sorted(set(images) - {c.case_id for c in cases})
        if unlabelled:
            raise ValueError(f"{path}: images without a label in {labels_dir}: {unlabelled[:10]}")
    if not cases:
        raise ValueError(f"{path}: empty dataset (no labelled case)")
    refuse_duplicate_images(cases, path)
    if "numTraining" in raw and int(raw["numTraining"]) != len(cases):
        raise ValueError(f"{path}: numTraining is {raw['numTraining']} but {len(cases)} labelled cases were found")
    tests = root / "imagesTs"
    test_images = tuple(sorted(_channel_files(tests, ending, channels, path).items())) if tests.is_dir() else ()
    name = str(raw.get("name", root.name))
    return DatasetDescription(path, name, modality, labels, tuple(cases), test_images, ending)


def load_dataset_json(path: str | os.PathLike) -> DatasetDescription:
    """Read and validate a ``dataset.json`` (Decathlon style or nnU-Net v2); errors name the file and entry at fault.

    Raises:
        FileNotFoundError: the json, or an image/label it lists, does not exist.
        ValueError: bad JSON, missing fields, an empty ``training`` list, duplicate ``case_id``.
    """
    path = Path(path).expanduser().absolute()
    raw = read_json_object(path, "dataset description")
    if is_nnunet_v2(raw):
        return _load_v2(path, raw)
    labels = _int_keyed(raw.get("labels"), "labels", path)
    modality = _int_keyed(raw.get("modality", raw.get("channel_names", {"0": "CT"})), "modality", path)
    training = raw.get("training")
    if not isinstance(training, list):
        raise ValueError(f"{path}: 'training' must be a list of {{image, label, case_id}} entries")
    if not training:
        raise ValueError(f"{path}: empty dataset ('training' lists no cases)")

    cases = _case_entries(training, "training", path)
    refuse_duplicate_images(cases, path)
    return DatasetDescription(path, str(raw.get("name", path.parent.name)), modality, labels, tuple(cases))


def pair_cases_by_name(
    images_dir: str | os.PathLike, labels_dir: str | os.PathLike, prefix: str = ""
) -> list[dict[str, object]]:
    """Cases {image, label, case_id} from two folders whose files share names (``ct_01.nii.gz`` in both).

    ``case_id`` is `prefix` + the file name without its image suffix. Raises ``FileNotFoundError`` for
    a missing folder and ``ValueError`` listing images without a label (or an empty folder).
    """
    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"folder not found: {folder}")
    labels = {strip_image_suffix(p.name): p for p in labels_dir.iterdir() if not p.name.startswith(".")}
    images = sorted(p for p in images_dir.iterdir() if not p.name.startswith("."))
    unmatched = [p.name for p in images if strip_image_suffix(p.name) not in labels]
    if unmatched or not images:
        raise ValueError(f"{images_dir}: {len(images)} images, no label in {labels_dir} for {unmatched[:10]}")
    return [{"image": p, "label": labels[strip_image_suffix(p.name)], "case_id": prefix + strip_image_suffix(p.name)}
            for p in images]


def write_dataset_json(
    path: str | os.PathLike,
    name: str,
    cases: Sequence[Mapping[str, object]],
    labels: Mapping[int, str],
    modality: Mapping[int, str] | None = None,
    **extra: object,
) -> Path:
    """Write a ``dataset.json`` (atomically) whose image/label paths are relative to its folder.

    Args:
        cases: dicts with absolute or cwd-relative ``image`` and ``label`` paths, ``case_id`` and
            optionally ``patient_id``.
        extra: further top-level fields (``description``, ``licence``, ...).
    """
    path = Path(path).absolute()

    def rel(p: object) -> str:
        return os.path.relpath(Path(str(p)).absolute(), path.parent)

    training = []
    for case in cases:
        entry = {"image": rel(case["image"]), "label": rel(case["label"]), "case_id": str(case["case_id"])}
        if case.get("patient_id") is not None:
            entry["patient_id"] = str(case["patient_id"])
        training.append(entry)
    doc = {
        "name": name,
        **extra,
        "modality": {str(k): v for k, v in (modality or {0: "CT"}).items()},
        "labels": {str(k): v for k, v in sorted(labels.items())},
        "numTraining": len(training),
        "training": training,
    }
    return write_json(path, doc)


def _case_entries(items: Sequence[object], field: str, path: Path) -> list[CaseEntry]:
    """The ``{image, label, case_id, patient_id}`` entries of list `field` as CaseEntry items (absolute paths)."""
    cases: list[CaseEntry] = []
    first_index: dict[str, int] = {}
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise ValueError(f"{path}: {field} entry {i} is not an object: {item!r}")
        for key in ("image", "label"):
            if not isinstance(item.get(key), str) or not item[key]:
                raise ValueError(f"{path}: {field} entry {i} has no {key!r} path: {dict(item)}")
        case_id = str(item.get("case_id") or strip_image_suffix(Path(item["image"]).name))
        if case_id in first_index:
            raise ValueError(
                f"{path}: duplicate case_id {case_id!r} in {field} entries {first_index[case_id]} and {i}"
            )
        first_index[case_id] = i
        files = {key: (path.parent / item[key]).resolve() for key in ("image", "label")}
        for key, file in files.items():
            if not file.exists():
                raise FileNotFoundError(f"{path}: case {case_id!r} (entry {i}): {key} not found: {file}")
        cases.append(CaseEntry(case_id, files["image"], files["label"], str(item.get("patient_id") or case_id)))
    return cases


def load_test_cases(path: str | os.PathLike) -> tuple[CaseEntry, ...]:
    """The labelled test split of a ``dataset.json``: its ``test`` entries that have a ``label`` (Decathlon
    ``test`` lists of bare image paths have none), else ``imagesTs/`` paired by file name with ``labelsTs/``
    beside it; ``()`` when there is neither. A test case that is also a training case (same case_id or image
    file) is refused: its score would not be a test score."""
    description = load_dataset_json(path)
    raw = json.loads(description.path.read_text(encoding="utf-8"))
    labelled = [item for item in raw.get("test") or [] if isinstance(item, Mapping) and item.get("label")]
    if labelled:
        cases = _case_entries(labelled, "test", description.path)
    elif (description.root / "imagesTs").is_dir() and (description.root / "labelsTs").is_dir():
        pairs = pair_cases_by_name(description.root / "imagesTs", description.root / "labelsTs")
        cases = [CaseEntry(str(c["case_id"]), Path(c["image"]).resolve(), Path(c["label"]).resolve(), str(c["case_id"]))
                 for c in pairs]
    else:
        return ()
    training = {c.case_id for c in description.cases}
    for case in cases:
        if case.case_id in training:
            raise ValueError(f"{description.path}: test case {case.case_id!r} ({case.image.name}) is also a training case")
    refuse_duplicate_images(cases, description.path, training=description.cases)
    return tuple(cases)


def refuse_duplicate_images(cases: Sequence[CaseEntry], path: Path, training: Sequence[CaseEntry] = ()) -> None:
    """Raise ValueError naming both case ids when two of `cases` (or a test case of `cases` and one of
    `training`) read the same image: the same file once links are resolved, or files of identical bytes
    (SHA-256; only files of equal size are hashed). A copy would land in two folds (trained on in one,
    validated on in the other) or score as a test case what was trained on."""
    owner: dict[Path, str] = {}
    by_size: dict[object, list[tuple[str, Path]]] = {}
    for case in [*training, *cases]:
        name = f"test case {case.case_id!r}" if training and case in cases else f"case {case.case_id!r}"
        for image in (image.resolve() for image in case.images):
            if owner.setdefault(image, name) != name:
                _refuse_duplicate(path, name, owner[image], f"both read {image} (the same path, or links to it)")
            signature = file_signature(image)
            size = tuple(entry[1] for entry in signature) if image.is_dir() else signature[0]
            by_size.setdefault(size, []).append((name, image))
    for group in by_size.values():
        first: dict[str, tuple[str, Path]] = {}
        for name, image in group if len({image for _, image in group}) > 1 else []:
            earlier = first.setdefault(file_digest(image), (name, image))
            if earlier[0] != name:
                _refuse_duplicate(path, name, earlier[0], f"{image} is a byte-identical copy of {earlier[1]}")


def _refuse_duplicate(path: Path, name: str, other: str, how: str) -> None:
    also = " (a training case)" if name.startswith("test") and not other.startswith("test") else ""
    raise ValueError(f"{path}: {name} and {other}{also} are one image: {how}; a duplicate would train on one copy and "
                     "validate (or test) on the other: remove one")


# ----------------------------------------------------------------------------------------- 2D or 3D, units

PIXEL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")  # 2D image files without a physical pixel size


def dataset_spatial_dims(description: DatasetDescription) -> int:
    """2 when the dataset's images are 2D image files (PNG, JPEG, BMP: e.g. DRIVE), else 3 (NIfTI, NRRD, DICOM)."""
    suffixes = {case.image.suffix.lower() in PIXEL_SUFFIXES for case in description.cases}
    if len(suffixes) > 1:
        raise ValueError(f"{description.path}: mixes 2D image files ({', '.join(PIXEL_SUFFIXES)}) and volumes")
    return 2 if suffixes == {True} else 3


def size_unit(description: DatasetDescription, spatial_dims: int) -> str:
    """The unit of lesion sizes (:func:`segadapt.training.metrics.mask_volume_ml`): 'mL' for volumes,
    'mm^2' for 2D images with a pixel spacing, 'px' for 2D image files without one (PNG, JPEG, BMP)."""
    if spatial_dims == 3:
        return "mL"
    return "px" if dataset_spatial_dims(description) == 2 else "mm^2"
