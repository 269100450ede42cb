"""``segadapt predict``: segment scans with a run's fold ensemble (or ``python scripts/predict.py``).

::

    segadapt predict --run runs/phantom_sah/multiview_unet/cp_lora/fold0 runs/phantom_sah/multiview_unet/cp_lora/fold1 \\
        --input ct.nii.gz --output predictions/
    segadapt predict --adapters fold0.safetensors fold1.safetensors --run-config runs/.../fold0 \\
        --base base.safetensors --input scans/ --output predictions/ --probabilities

The parser is :func:`segadapt.parsers.predict_parser` (``--help`` imports no torch). Every check that needs no
network (inputs, outputs, DICOM-SEG request, threshold, device) runs before the network is built; bad input exits
with status 2 and one line ``segadapt predict: error: ...``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from segadapt.io import check_output_file, check_output_folder
from segadapt.parsers import predict_parser

from .dicom_seg import check_dicom_seg_request, parse_segment_code
from .inputs import check_threshold, find_inputs, resolve_device
from .predictor import Predictor
from .writers import CSV_FILE, check_outputs_spare_inputs, predict_to_folder


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
    """``segadapt predict --run ... --input ...``; bad inputs exit with status 2 and a one-line error."""
    parser = predict_parser()
    args = parser.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    strict = not args.force
    try:
        # bad inputs, output folder, threshold or device fail before the network is built
        scans = find_inputs(args.input)
        check_output_folder(args.output)
        check_outputs_spare_inputs(args.input, args.output, args.dicom_seg,
                                   [*(args.run or args.adapters), args.run_config, args.base])
        codes = dict(parse_segment_code(text) for text in args.segment_code)
        if args.dicom_seg is not None:
            check_output_file(check_dicom_seg_request(scans, args.dicom_seg), "DICOM-SEG file")
        if args.threshold is not None:
            check_threshold(args.threshold)
        resolve_device(args.device)
        if args.run:
            predictor = Predictor.from_runs(args.run, args.base, args.device, args.threshold, strict)
        else:
            predictor = Predictor.from_adapter_files(args.adapters, args.run_config, args.base, args.device,
                                                     args.threshold, strict)
        print(f"segadapt predict: {predictor.description}")
        rows = predict_to_folder(predictor, args.input, args.output, args.probabilities, not args.no_progress,
                                 dicom_seg=args.dicom_seg, dicom_seg_codes=codes)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"segadapt predict: error: {error}\n")
    except KeyboardInterrupt:  # temporary files are already removed; finished scans are listed in volumes.csv
        parser.exit(130, f"segadapt predict: interrupted; complete outputs are listed in {Path(args.output) / CSV_FILE}\n")
    key, what, unit = next(((k, w, u) for k, w, u in (("lesion_area_px", "area", "px"), ("lesion_area_mm2", "area", "mm^2"))
                            if rows and rows[0][k] != ""), ("lesion_volume_ml", "volume", "mL"))
    total = sum(float(r[key]) for r in rows)
    print(f"{len(rows)} scan(s), total lesion {what} {total:.2f} {unit} -> {Path(args.output) / CSV_FILE}")
    return rows


if __name__ == "__main__":
    main()
