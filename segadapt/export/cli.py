"""``segadapt export RUN_DIR [--merged FILE] [--peft FOLDER] [--bundle FOLDER] [--nnunet FOLDER] [--force]``
(or ``python -m segadapt.export``).

Outputs that are folders / files / not writable, an output file that exists (without ``--force``), one that is a
file of the run or one it reads (:func:`segadapt.export.common.run_files`: config.yaml, the weights, plan,
fingerprint, the base checkpoint, dataset.json; ``--force`` or not), and a broken ``config.yaml``, exit 2 with one
line before any work. A full / decoder / scratch run exports its ``model.safetensors`` network.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from segadapt.io import check_output_file, check_output_folder
from segadapt.export.bundle import BUNDLE_FILES, export_bundle, inference_config
from segadapt.export.common import check_targets, load_run_for_export, read_export_config
from segadapt.export.merged import PEFT_FILES, export_merged, export_peft
from segadapt.export.nnunet import export_nnunet, nnunet_targets
from segadapt.parsers import export_parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = export_parser()  # in segadapt.parsers: `segadapt export --help` imports no torch
    args = parser.parse_args(argv)
    if not (args.merged or args.peft or args.bundle or args.nnunet):
        parser.error("give --merged FILE, --peft FOLDER, --bundle FOLDER and/or --nnunet FOLDER")
    try:  # every output is checked before any work, so a bad one leaves nothing half done
        config = read_export_config(args.run_dir)
        targets = [check_output_file(args.merged, "--merged file")] if args.merged else []
        if args.peft:
            targets += [check_output_folder(args.peft, "--peft folder") / f for f in PEFT_FILES]
        if args.bundle:
            targets += [check_output_folder(args.bundle, "--bundle folder") / f for f in BUNDLE_FILES]
            inference_config(config)  # no roi_size, a network the bundle cannot build: refused here
        if args.nnunet:
            targets += nnunet_targets(config, check_output_folder(args.nnunet, "--nnunet folder"))
        check_targets(args.run_dir, config, targets, force=args.force)
        if args.peft or args.merged:
            net, config = load_run_for_export(args.run_dir, strict=not args.force)
        if args.peft:  # first: its checks (method, layer types) all come before it writes
            folder = export_peft(net, args.peft, architecture=config["module"],
                                 source=config["module"].get("base_checkpoint"))
            print(f"PEFT adapter: {folder}")
        if args.merged:
            print(f"merged model: {export_merged(net, args.merged, architecture=config['module'])}")
        if args.bundle:
            print(f"MONAI bundle: {export_bundle(args.run_dir, args.bundle, strict=not args.force, force=args.force)}")
        if args.nnunet:
            print(f"nnU-Net trained-model folder: {export_nnunet(args.run_dir, args.nnunet, overwrite=args.force)}")
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"segadapt export: error: {error}\n")
