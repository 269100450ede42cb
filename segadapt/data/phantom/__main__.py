"""Command line: ``python -m segadapt.data.phantom --domain {tbi,sah} --n N --out DIR`` (see the package doc)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import nibabel as nib
import numpy as np

from ..dataset_json import load_dataset_json
from ..files import save_png
from . import DEFAULT_SHAPE, DEFAULT_SPACING, DOMAINS, __doc__ as package_doc, make_phantom_dataset, preview_slice


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m segadapt.data.phantom", description=package_doc.split("\n\n")[0])
    parser.add_argument("--domain", choices=DOMAINS, required=True)
    parser.add_argument("--n", type=int, required=True, help="number of cases")
    parser.add_argument("--out", required=True, help="output folder (dataset.json, imagesTr/, labelsTr/)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", type=int, nargs=3, default=list(DEFAULT_SHAPE), metavar=("X", "Y", "Z"))
    parser.add_argument("--spacing", type=float, nargs=3, default=list(DEFAULT_SPACING), metavar=("SX", "SY", "SZ"))
    parser.add_argument("--preview", help="also write a PNG of case 0 (brain window, lesion overlay)")
    args = parser.parse_args(argv)
    path = make_phantom_dataset(args.out, args.domain, args.n, args.seed, args.shape, args.spacing)
    print(f"wrote {args.n} {args.domain} cases and {path}")
    if args.preview:
        case = load_dataset_json(path).cases[0]
        image, mask = (np.asarray(nib.load(f).dataobj) for f in (case.image, case.label))
        zoom = max(1, round(256 / image.shape[0]))
        picture = np.kron(preview_slice(image, mask), np.ones((zoom, zoom, 1), np.uint8))
        print(f"wrote {save_png(args.preview, picture)}")


if __name__ == "__main__":
    main()
