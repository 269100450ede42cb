"""The hippocampus transfer benchmark: MSD Task04 Hippocampus -> a source and a target dataset.json.

The MSD labels are 0 background, 1 anterior, 2 posterior hippocampus (T2 MRI, 1 mm, ~35x50x35 voxels).
Patients are split once, with a fixed seed, into

* ``<out>/source``: the anterior hippocampus (label 1 -> 1) of all but ``--n-target`` patients; the base
  network is pretrained on it;
* ``<out>/target``: the posterior hippocampus (label 2 -> 1) of the other ``--n-target`` patients (30):
  the small labelled set of the new task that the adapters are trained and cross-validated on.

Binary label maps are written under ``<out>/{source,target}/labelsTr``; the images stay where they are.
Images without a label (and labels without an image) are skipped and listed.

    python datasets/prepare_hippocampus.py                       # ../shared/data/hippocampus_msd -> data/hippocampus
    python datasets/prepare_hippocampus.py --root DIR --out data/hippocampus   # or SEGADAPT_HIPPOCAMPUS=DIR
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from segadapt.data import remap_label_file, write_dataset_json
from segadapt.data.dataset_json import strip_image_suffix

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = REPO.parent / "shared" / "data" / "hippocampus_msd"
STRUCTURES = {"source": (1, "anterior"), "target": (2, "posterior")}
REFERENCE = "Medical Segmentation Decathlon, Task04 Hippocampus (Vanderbilt University Medical Center), CC BY-SA 4.0"


def paired_cases(root: Path) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """(case id, image, label) for every image with a label, sorted by id; and the names left unpaired."""
    folders = [root / "imagesTr", root / "labelsTr"]
    for folder in folders:
        if not folder.is_dir():
            raise FileNotFoundError(f"folder not found: {folder} (give --root, the hippocampus_msd folder)")
    images, labels = ({strip_image_suffix(p.name): p for p in f.iterdir() if p.name.endswith(".nii.gz")}
                      for f in folders)
    both = sorted(images.keys() & labels.keys())
    if not both:
        raise ValueError(f"{root}: no image in imagesTr has a label of the same name in labelsTr")
    return [(cid, images[cid], labels[cid]) for cid in both], sorted(images.keys() ^ labels.keys())


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path(os.environ.get("SEGADAPT_HIPPOCAMPUS", DEFAULT_ROOT)),
                        help="the hippocampus_msd folder (imagesTr/, labelsTr/); default $SEGADAPT_HIPPOCAMPUS or "
                             f"{DEFAULT_ROOT}")
    parser.add_argument("--out", type=Path, default=Path("data/hippocampus"), help="writes <out>/source and <out>/target")
    parser.add_argument("--n-target", type=int, default=30, help="patients of the target task")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient draw")
    args = parser.parse_args(argv)
    cases, unpaired = paired_cases(args.root)
    if not 1 <= args.n_target < len(cases):
        raise ValueError(f"--n-target must be in [1, {len(cases) - 1}] for {len(cases)} cases, got {args.n_target}")
    order = np.random.default_rng(args.seed).permutation(len(cases))
    target_ids = {cases[i][0] for i in order[: args.n_target]}
    written = {}
    for domain, (value, structure) in STRUCTURES.items():
        folder = args.out / domain
        chosen = [c for c in cases if (c[0] in target_ids) == (domain == "target")]
        entries = [{"image": image, "case_id": cid, "patient_id": cid,
                    "label": remap_label_file(label, folder / "labelsTr" / f"{cid}.nii.gz", {value: 1})}
                   for cid, image, label in chosen]
        written[domain] = write_dataset_json(
            folder / "dataset.json", f"hippocampus_{structure}", entries, {0: "background", 1: structure}, {0: "MRI"},
            description=f"{structure} hippocampus (MSD label {value}) of {len(entries)} patients, {domain} of the "
                        f"segadapt transfer benchmark (seed {args.seed})", reference=REFERENCE)
        print(f"wrote {written[domain]} ({len(entries)} cases, {structure} hippocampus)")
    if unpaired:
        print(f"skipped {len(unpaired)} files without a partner: {', '.join(unpaired)}")
    return written


if __name__ == "__main__":
    main()
