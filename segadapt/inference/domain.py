"""The training data's domain (a run's ``fingerprint.json``) and the checks ``segadapt predict`` makes against it.

A run folder holds the :func:`segadapt.plan.fingerprint.fingerprint` of the dataset it was trained on (one source of
truth, written by :func:`segadapt.training.fit_run`). :class:`TrainingDomain` summarises it:

* modality of each channel (``dataset.json`` ``modality`` / ``channel_names``);
* spacing: median, min and max per axis over the cases (on the grid the pipeline reads: reoriented);
* intensity range per channel: [min over cases of the whole-image 0.5 percentile, max over cases of the
  whole-image 99.5 percentile].

:meth:`TrainingDomain.check` compares one input, read and reoriented as the pipeline reads it, and returns one
message per finding (predict logs each as one warning line):

* modality: the input's DICOM ``Modality`` when it is a DICOM series and it differs from the training
  modality; otherwise, whatever the tag says, a CT model's input must hold air in Hounsfield units (its 0.5
  percentile below -500 HU; no MR image, and no CT stored without its rescale to HU, goes there) and a
  non-CT model's input must not;
* spacing: an axis whose spacing is more than 2x (or less than 1/2 of) the training median;
* intensities: the input's whole-image 0.5 / 99.5 percentiles outside the training range: the 1st percentile
  over cases of their 0.5 percentiles to the 99th percentile over cases of their 99.5 percentiles (robust to
  a few cases at another scale, as in MSD hippocampus where a few reach 6 x 10^5), widened on each side by
  10% of a typical case's range (median 99.5 minus median 0.5 percentile); a non-CT image (arbitrary units)
  may also reach 2x the training's upper end;
* body region / kind of image (:meth:`TrainingDomain.histogram_distance`): the shape of the input's intensity histogram
  against the nearest training case's. Each image's quantile function at the fingerprint's
  ``QUANTILE_LEVELS`` (1st, 2nd, ... 99th percentile) is rescaled to [0, 1] between its 1st and 99th percentile
  (so scale and offset do not count: an MRI's units are arbitrary), and

      d = min over training cases k of  mean over levels l of |q_in(l) - q_k(l)|

  (the 1-Wasserstein distance between the rescaled intensity distributions, on the quantile grid). d above
  ``HISTOGRAM_DISTANCE`` (0.07) is reported. Calibration (tests/test_domain_calibration.py, each held-out scan
  against the rest of its dataset): the shipped datasets' scans score at most 0.043 (DRIVE; phantom SAH/TBI
  0.022, hippocampus 0.022; new phantom heads against a 2-case demo model 0.042), the mismatched pairs at least
  0.101 (the abdominal CT series into the head-CT phantom model; its NIfTI 0.37, MRI into the phantom model
  0.38, the phantom into the hippocampus model 0.29, the abdominal CT into the hippocampus model 0.12).
  A fingerprint from before the quantiles were stored skips this check.

:meth:`TrainingDomain.resample_spacing` says where predict resamples: a run trained on its native grid
(``target_spacing: null``, every case at one spacing) gets inputs at another spacing resampled to the
training median spacing (and the prediction mapped back onto the input's grid).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from segadapt.plan.fingerprint import FINGERPRINT_VERSION, IMAGE_SAMPLES, image_quantiles, intensity_statistics

HU_AIR_THRESHOLD = -500.0   # a CT in HU has its 0.5 percentile below this (air); an MR image never does
SPACING_FACTOR = 2.0        # an axis more than this factor off the training spacing is reported
INTENSITY_SLACK = 0.1       # share of a typical case's intensity range allowed beyond the training range
RANGE_PERCENTILES = (1.0, 99.0)  # over the cases: the training range's ends (robust to a few odd cases)
SCALE_FACTOR = 2.0          # a non-CT image (arbitrary units) may reach this x the training range's upper end
HISTOGRAM_DISTANCE = 0.07   # intensity-histogram distance to the nearest training case that is reported
SPACING_TOLERANCE = 1e-3    # relative: spacings closer than this are the same grid
DICOM_MODALITIES = {"MR": "MRI", "CT": "CT", "PT": "PET", "US": "US"}  # DICOM Modality -> dataset.json's names


def is_ct(modality: Optional[str]) -> bool:
    return modality is not None and modality.strip().casefold() == "ct"


def scan_modality(image: np.ndarray, dicom_modality: Optional[str] = None) -> Optional[str]:
    """A scan's modality in ``dataset.json``'s words: its DICOM Modality when given (MR -> MRI), else 'CT' when
    it holds air in HU (0.5 percentile at or below -500), else None (unknown)."""
    if dicom_modality:
        return DICOM_MODALITIES.get(dicom_modality.strip().upper(), dicom_modality)
    return "CT" if image_percentiles(np.asarray(image)[0])[0] <= HU_AIR_THRESHOLD else None


def image_percentiles(channel: np.ndarray) -> tuple[float, float]:
    """The 0.5 and 99.5 percentiles of one channel, sampled as the fingerprint samples it."""
    values = np.asarray(channel).ravel()
    stats = intensity_statistics(values[:: max(1, values.size // IMAGE_SAMPLES)])
    return float(stats["percentile_00_5"]), float(stats["percentile_99_5"])


@dataclass
class TrainingDomain:
    """What a run's training data looked like (see the module docstring)."""

    dataset: str
    n_cases: int
    modality: dict[str, str]
    labels: dict[str, str]
    spacing_median: list[float]
    spacing_min: list[float]
    spacing_max: list[float]
    intensity_range: list[list[float]]
    """Per channel [low, high]: 1st percentile of the cases' 0.5 percentiles, 99th percentile of their 99.5 percentiles."""
    intensity_slack: list[float]
    """Per channel: INTENSITY_SLACK x (median of the cases' 99.5 percentiles - median of their 0.5 percentiles)."""
    quantiles: Optional[list[list[list[float]]]] = None
    """Per case and channel, the whole image's quantile function (``image_quantiles``); None in older fingerprints."""
    quantile_levels: Optional[list[float]] = None
    """The percentiles of :attr:`quantiles`."""

    @classmethod
    def from_fingerprint(cls, fp: Mapping[str, Any]) -> TrainingDomain:
        if fp.get("version") != FINGERPRINT_VERSION:
            raise ValueError(f"fingerprint version {fp.get('version')} is not {FINGERPRINT_VERSION}")
        cases = fp["cases"]
        spacings = np.array([c["spacing"] for c in cases], dtype=np.float64)
        channels = len(cases[0]["image_intensity"])
        low = np.array([[c["image_intensity"][k]["percentile_00_5"] for k in range(channels)] for c in cases])
        high = np.array([[c["image_intensity"][k]["percentile_99_5"] for k in range(channels)] for c in cases])
        slack = INTENSITY_SLACK * (np.median(high, 0) - np.median(low, 0))
        bounds = [np.percentile(low, RANGE_PERCENTILES[0], 0), np.percentile(high, RANGE_PERCENTILES[1], 0)]
        levels = fp.get("quantile_levels")
        quantiles = [c["image_quantiles"] for c in cases] if levels and all("image_quantiles" in c for c in cases) else None
        return cls(dataset=fp["dataset"], n_cases=len(cases), modality=dict(fp["modality"]), labels=dict(fp["labels"]),
                   spacing_median=np.median(spacings, 0).tolist(), spacing_min=spacings.min(0).tolist(),
                   spacing_max=spacings.max(0).tolist(), intensity_range=np.stack(bounds, 1).tolist(),
                   intensity_slack=slack.tolist(), quantiles=quantiles, quantile_levels=levels)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> TrainingDomain:
        """From a ``fingerprint.json``; ValueError naming the file when it is not one of this version."""
        try:
            return cls.from_fingerprint(json.loads(Path(path).read_text(encoding="utf-8")))
        except (json.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: not a usable fingerprint ({error}); train the run again or write it with "
                             "segadapt plan DATASET_JSON --out /tmp/plan.json --fingerprint RUN_DIR/fingerprint.json") from error

    @property
    def foreground_labels(self) -> dict[int, str]:
        """Label value -> name, background (0) left out."""
        return {int(k): v for k, v in sorted(self.labels.items(), key=lambda kv: int(kv[0])) if int(k) != 0}

    def resample_spacing(self, spacing: Sequence[float]) -> Optional[list[float]]:
        """The training median spacing when an input at `spacing` lies outside the training cases' spacings
        on some axis (predict resamples it there), else None (the input is used on its own grid, as training was)."""
        low = np.asarray(self.spacing_min) * (1 - SPACING_TOLERANCE)
        high = np.asarray(self.spacing_max) * (1 + SPACING_TOLERANCE)
        spacing = np.asarray(spacing, dtype=np.float64)
        return None if np.all((spacing >= low) & (spacing <= high)) else list(self.spacing_median)

    def check(self, image: np.ndarray, spacing: Sequence[float], dicom_modality: Optional[str] = None) -> list[str]:
        """Messages on how input `image` (C, *spatial), at `spacing` mm, differs from the training data."""
        found = []
        trained = self.modality.get("0")
        low, high = image_percentiles(image[0])
        given = DICOM_MODALITIES.get(dicom_modality.strip().upper(), dicom_modality) if dicom_modality else None
        if given is not None and trained is not None and given.casefold() != trained.casefold():
            found.append(f"modality mismatch: the input's DICOM Modality is {dicom_modality}, the model was "
                         f"trained on {trained} ({self.dataset})")
        elif trained is not None and is_ct(trained) and low > HU_AIR_THRESHOLD:  # whatever the DICOM tag says
            tagged = " (DICOM Modality CT: stored values without RescaleSlope/RescaleIntercept?)" if given else ""
            found.append(f"modality mismatch? the model was trained on CT ({self.dataset}) but the input's 0.5 "
                         f"percentile is {low:.4g}, above {HU_AIR_THRESHOLD:g} HU (no air): not a CT in HU?{tagged}")
        elif trained is not None and not is_ct(trained) and low <= HU_AIR_THRESHOLD:
            found.append(f"modality mismatch? the model was trained on {trained} ({self.dataset}) but the input's "
                         f"0.5 percentile is {low:.4g}, at or below {HU_AIR_THRESHOLD:g}: a CT in HU?")
        median = np.asarray(self.spacing_median)
        ratio = np.asarray(spacing, dtype=np.float64) / median
        off = [i for i, r in enumerate(ratio) if r > SPACING_FACTOR or r < 1 / SPACING_FACTOR]
        if off:
            found.append(f"spacing {format_mm(spacing)} mm is more than {SPACING_FACTOR:g}x off the training spacing "
                         f"{format_mm(median)} mm on axis {', '.join(map(str, off))}")
        for c, ((train_low, train_high), slack) in enumerate(zip(self.intensity_range[: len(image)], self.intensity_slack)):
            c_low, c_high = (low, high) if c == 0 else image_percentiles(image[c])
            upper = train_high + slack if is_ct(trained) else max(train_high + slack, SCALE_FACTOR * train_high)
            if c_low < train_low - slack or c_high > upper:
                found.append(f"intensities outside the training range: channel {c} 0.5-99.5 percentiles "
                             f"[{c_low:.4g}, {c_high:.4g}], training [{train_low:.4g}, {train_high:.4g}] (1st-99th "
                             "percentile over the cases)")
        distance = self.histogram_distance(image)
        if distance is not None and distance > HISTOGRAM_DISTANCE:
            found.append(f"intensity histogram unlike the training scans' (distance {distance:.3f} to the nearest of "
                         f"{self.n_cases}, above {HISTOGRAM_DISTANCE:g}): another body region or kind of image than "
                         f"{self.dataset}?")
        return found

    def histogram_distance(self, image: np.ndarray) -> Optional[float]:
        """d of the module docstring for input `image` (C, *spatial): the largest over channels of the distance
        between its rescaled quantile function and the nearest training case's; None without stored quantiles."""
        if not self.quantiles:
            return None
        distances = []
        for c in range(min(len(image), len(self.quantiles[0]))):
            training = _rescaled([case[c] for case in self.quantiles])
            found = image_quantiles(image[c], self.quantile_levels)
            distances.append(float(np.abs(training - _rescaled([found])).mean(1).min()))
        return max(distances)


def _rescaled(quantiles: Sequence[Sequence[float]]) -> np.ndarray:
    """Quantile functions (rows) mapped linearly so that the first level is 0 and the last 1."""
    q = np.asarray(quantiles, dtype=np.float64)
    return (q - q[:, :1]) / np.maximum(q[:, -1:] - q[:, :1], 1e-12)


def format_mm(values: Sequence[float]) -> str:
    return "x".join(f"{float(v):.3g}" for v in values)
