"""DRIVE retinal vessels (Staal et al. 2004) -> 2D PNG pairs and dataset.json.

Expects ``<root>/{training,test}/images/NN_*.tif`` and ``<root>/{training,test}/1st_manual/NN_manual1.gif``.
Writes RGB images to ``<out>/imagesTr/drive_NN.png`` and vessel masks as 0/1 to ``<out>/labelsTr``; all
labelled images go into ``training`` (segadapt makes its own folds). Use with
``PreprocessConfig(intensity="rgb", spatial_dims=2, orientation="RA", ...)``.

    python datasets/prepare_drive.py --root ~/data/DRIVE --out data/drive
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from segadapt.data import write_dataset_json
from segadapt.data.files import save_png


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="folder holding training/ and test/")
    parser.add_argument("--out", type=Path, required=True, help="folder for dataset.json, imagesTr/, labelsTr/")
    parser.add_argument("--sets", nargs="+", default=["training", "test"], choices=["training", "test"])
    args = parser.parse_args(argv)
    cases = []
    for subset in args.sets:
        images = sorted((args.root / subset / "images").glob("*.tif"))
        if not images:
            raise FileNotFoundError(f"no DRIVE images in {args.root / subset / 'images'}")
        for tif in images:
            number = tif.name.split("_")[0]
            manual = args.root / subset / "1st_manual" / f"{number}_manual1.gif"
            if not manual.is_file():
                raise FileNotFoundError(f"DRIVE image {tif} has no manual segmentation {manual}")
            case_id = f"drive_{number}"
            vessels = (np.asarray(Image.open(manual).convert("L")) > 127).astype(np.uint8)
            cases.append({
                "image": save_png(args.out / "imagesTr" / f"{case_id}.png", np.asarray(Image.open(tif).convert("RGB"))),
                "label": save_png(args.out / "labelsTr" / f"{case_id}.png", vessels),
                "case_id": case_id,
            })
    path = write_dataset_json(args.out / "dataset.json", "drive", cases, {0: "background", 1: "vessel"},
                              {0: "red", 1: "green", 2: "blue"}, reference="https://drive.grand-challenge.org/")
    print(f"wrote {path} ({len(cases)} cases)")
    return path


if __name__ == "__main__":
    main()
