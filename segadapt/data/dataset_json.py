"""Dataset description: a Medical-Segmentation-Decathlon-style ``dataset.json``, validated.

Format (paths relative to the folder holding the file)::

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
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .files import write_json

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
    image: Path
    label: Path
    patient_id: str

    def as_dict(self) -> dict[str, str]:
        """The MONAI data dict: {'image', 'label', 'case_id', 'patient_id'} with string paths."""
        return {"image": str(self.image), "label": str(self.label), "case_id": self.case_id,
                "patient_id": self.patient_id}


@dataclass(frozen=True)
class DatasetDescription:
    """A validated ``dataset.json``: every file exists, case ids are unique, labels are integers."""

    path: Path
    name: str
    modality: dict[int, str]
    labels: dict[int, str]
    cases: tuple[CaseEntry, ...]

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


def load_dataset_json(path: str | os.PathLike) -> DatasetDescription:
    """Read and validate a ``dataset.json``; errors name the file and the entry at fault.

    Raises:
        FileNotFoundError: the json, or an image/label it lists, does not exist.
        ValueError: bad JSON, missing fields, an empty ``training`` list, duplicate ``case_id``.
    """
    path = Path(path).expanduser().absolute()
    if not path.is_file():
        raise FileNotFoundError(f"dataset description not found: {path}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path}: top level must be an object")
    labels = _int_keyed(raw.get("labels"), "labels", path)
    modality = _int_keyed(raw.get("modality", raw.get("channel_names", {"0": "CT"})), "modality", path)
    training = raw.get("training")
    if not isinstance(training, list):
        raise ValueError(f"{path}: 'training' must be a list of {{image, label, case_id}} entries")
    if not training:
        raise ValueError(f"{path}: empty dataset ('training' lists no cases)")

    cases = _case_entries(training, "training", path)
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
    training = {c.case_id for c in description.cases} | {c.image for c in description.cases}
    for case in cases:
        if case.case_id in training or case.image in training:
            raise ValueError(f"{description.path}: test case {case.case_id!r} ({case.image.name}) is also a training case")
    return tuple(cases)
