"""Inference: a run's fold ensemble on new scans -> masks on each input's own grid, lesion volumes, DICOM-SEG.

One concern per module (each imports only those listed before it, and the layers below: training, data, ...):

* :mod:`~segadapt.inference.inputs` -- the scans asked for (files, DICOM series folders), threshold, device;
* :mod:`~segadapt.inference.domain` -- the training data's fingerprint: warnings on unlike inputs, resampling;
* :mod:`~segadapt.inference.predictor` -- :class:`Predictor`, the K fold adapters on one base, p = 1/K sum_k p_k;
* :mod:`~segadapt.inference.dicom_seg` -- a prediction of a DICOM series as a DICOM-SEG object (highdicom);
* :mod:`~segadapt.inference.writers` -- :func:`predict_to_folder`: masks, probabilities, ``volumes.csv``;
* :mod:`~segadapt.inference.cli` -- ``segadapt predict``;
* :mod:`~segadapt.inference.diagnose` -- ``segadapt diagnose``: spectral statistics of what a tuning changed.

Adapter folding is :mod:`segadapt.adapters.fold`; the tiny demo runs that train are
:mod:`segadapt.training.demo`.

Python::

    predictor = Predictor.from_runs(["runs/phantom_sah/multiview_unet/cp_lora/fold0", ".../fold1", ".../fold2"])
    prediction = predictor.predict("ct.nii.gz")   # .probabilities (C, *shape) .mask .affine .volume_ml
    rows = predict_to_folder(predictor, "scans/", "predictions/", probabilities=True)
"""

from .predictor import Prediction, Predictor
from .writers import predict_to_folder

__all__ = ["Prediction", "Predictor", "predict_to_folder"]
