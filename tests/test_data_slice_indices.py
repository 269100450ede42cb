"""RandSliced computes the crop centres on the volume before padding: the same slices, bit for bit, as MONAI's
RandCropByPosNegLabeld computing them on the padded volume (what it did before), from a scan of the smaller volume."""

from __future__ import annotations

import pytest
import torch

from segadapt.data.transforms import _BG, _FG, RandSliced


def _volume(seed: int, channels: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(channels, 21, 70, 15, generator=g)  # Y longer than a slice: crops move along it
    image[:, :3] = 0.0  # outside the body: no background centre there
    label = torch.zeros(1, 21, 70, 15)
    label[0, 8:12, 30:45, 5:9] = 1.0
    return {"image": image, "label": label}


def _slices(transform: RandSliced, data: dict, seed: int, monai_indices: bool) -> list[dict]:
    transform.set_random_state(seed=seed)
    if not monai_indices:
        return transform(data)
    transform.randomize()  # as RandSliced did before: MONAI computes the centres on the padded volume
    pad, crop, squeeze = transform.views[transform._axis]
    return [{**squeeze(s), "view": transform._axis} for s in crop(pad(data))]


@pytest.mark.parametrize("image_key", ["image", None])
def test_slices_equal_those_with_centres_from_the_padded_volume(image_key):
    transform = RandSliced(["image", "label"], "label", ["axial", "coronal", "sagittal"], [32, 32], pos=1.0,
                           neg=1.0, num_samples=6, image_key=image_key)
    for seed in range(12):
        data = _volume(seed)
        new, old = _slices(transform, data, seed, False), _slices(transform, data, seed, True)
        assert len(new) == len(old) == 6
        for a, b in zip(new, old):
            assert a["view"] == b["view"] and set(a) == set(b) and _FG not in a and _BG not in a
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_centres_are_scanned_on_the_volume_before_padding(monkeypatch):
    """The foreground / background index scan, the transform's costly step, runs once per call on the unpadded
    volume (21x70x15), never on the padded one (its speed is a benchmark's matter, not a timed test's)."""
    from monai.transforms.utils import map_binary_to_indices

    import segadapt.data.transforms as transforms
    scanned = []

    def recording(label, image=None, threshold=0.0):
        scanned.append(tuple(label.shape))
        return map_binary_to_indices(label, image, threshold)

    monkeypatch.setattr(transforms, "map_binary_to_indices", recording)
    transform = RandSliced(["image", "label"], "label", ["axial"], [256, 256], num_samples=8, image_key="image")
    for seed in range(3):
        transform.set_random_state(seed=seed)
        assert len(transform(_volume(seed))) == 8
    assert scanned == [(1, 21, 70, 15)] * 3
