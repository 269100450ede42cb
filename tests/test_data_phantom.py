"""Head-CT phantom: deterministic, Hounsfield-unit anatomy, lesion character per domain, command line."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from segadapt.data import load_dataset_json, make_case, make_phantom_dataset
from segadapt.data.phantom import SIZES, case_rng
from segadapt.data.phantom.__main__ import main

VOXEL_ML = 2.3 * 2.3 * 4.0 / 1000


@pytest.fixture(scope="module")
def cases():
    """Three cases of each domain and size at the default grid."""
    return {(domain, size): [make_case(domain, case_rng(11, i, domain), size=size) for i in range(3)]
            for domain in ("tbi", "sah") for size in SIZES}


def test_deterministic_by_seed():
    a = make_case("sah", case_rng(0, 4, "sah"), shape=(48, 48, 20), spacing=(4.6, 4.6, 8.0))
    b = make_case("sah", case_rng(0, 4, "sah"), shape=(48, 48, 20), spacing=(4.6, 4.6, 8.0))
    c = make_case("sah", case_rng(1, 4, "sah"), shape=(48, 48, 20), spacing=(4.6, 4.6, 8.0))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])


def test_hounsfield_anatomy(cases):
    image, mask, affine = cases[("tbi", "medium")][0]
    assert image.dtype == np.int16 and mask.dtype == np.uint8 and image.shape == (96, 96, 40)
    np.testing.assert_allclose(np.diag(affine), [2.3, 2.3, 4.0, 1.0])
    assert np.all(np.abs(image[:4, :4, :].astype(float) + 1000) < 40)  # air in the corners
    assert 0.02 < (image > 700).mean() < 0.15 and image.max() > 1300  # skull
    soft = image[(image > 0) & (image < 100) & (mask == 0)]
    assert 26 <= np.median(soft) <= 40  # brain parenchyma
    assert ((image > -20) & (image < 15)).sum() > 2000  # CSF: ventricles, sulci, cisterns
    assert (image < -50).sum() - (image < -500).sum() > 500  # scalp fat and sinus walls


def test_lesions_by_domain_and_size(cases):
    for domain in ("tbi", "sah"):
        volumes = [np.mean([m.sum() * VOXEL_ML for _, m, _ in cases[(domain, size)]]) for size in SIZES]
        assert volumes[0] < volumes[1] < volumes[2], (domain, volumes)
        for image, mask, _ in cases[(domain, "medium")]:
            assert 45 < np.median(image[mask > 0]) < 130  # hyperdense blood (blurred into its surroundings)
    # SAH is thin (few voxels with all six neighbours in the mask); TBI haematomas are compact.
    def interior(m):
        return ndimage.binary_erosion(m > 0).sum() / m.sum()
    sah = np.mean([interior(m) for size in SIZES for _, m, _ in cases[("sah", size)]])
    tbi = np.mean([interior(m) for size in ("medium", "large") for _, m, _ in cases[("tbi", size)]])
    assert sah < 0.08 and tbi > 0.25, (sah, tbi)


def test_lesion_labels_cover_blood_not_the_skull_it_touches(cases):
    """A voxel is lesion where the lesion dominates it: its HU reads as acute blood (50-100 HU, blurred a
    little into its surroundings), never as bone. The unblurred labels covered the skull's partial-volume
    voxels of extra-axial bleeds: up to half of a case's lesion voxels above 150 HU."""
    for (domain, size), group in cases.items():
        for image, mask, _ in group:
            hu = image[mask > 0].astype(float)
            assert hu.size > 0, (domain, size)
            assert hu.max() <= 150, (domain, size, hu.max())  # no bone-bright lesion voxel
            assert np.percentile(hu, 99) <= 115 and np.percentile(hu, 1) >= 30, (domain, size)
            assert 45 <= hu.mean() <= 100, (domain, size, hu.mean())


def test_bad_arguments():
    with pytest.raises(ValueError, match="domain must be one of"):
        make_case("stroke", case_rng(0, 0, "tbi"))
    with pytest.raises(ValueError, match="need a 3D shape"):
        make_case("tbi", case_rng(0, 0, "tbi"), shape=(4, 4, 4))
    with pytest.raises(ValueError, match="n must be at least 1"):
        make_phantom_dataset("unused", "tbi", 0)


def test_command_line_writes_a_loadable_dataset(tmp_path, capsys):
    main(["--domain", "tbi", "--n", "2", "--out", str(tmp_path / "tbi"), "--seed", "5", "--shape", "48", "48", "16",
          "--spacing", "4.6", "4.6", "10", "--preview", str(tmp_path / "tbi.png")])
    assert "wrote 2 tbi cases" in capsys.readouterr().out
    description = load_dataset_json(tmp_path / "tbi" / "dataset.json")
    assert description.name == "phantom_tbi" and description.labels == {0: "background", 1: "haemorrhage"}
    assert [c.case_id for c in description.cases] == ["tbi_000", "tbi_001"]
    image = nib.load(description.cases[1].image)
    expected = make_case("tbi", case_rng(5, 1, "tbi"), (48, 48, 16), (4.6, 4.6, 10.0), SIZES[(1 + 5) % 3])
    np.testing.assert_array_equal(np.asarray(image.dataobj), expected[0])
    np.testing.assert_allclose(image.affine, expected[2])
    np.testing.assert_array_equal(np.asarray(nib.load(description.cases[1].label).dataobj), expected[1])
    assert Image.open(tmp_path / "tbi.png").size[0] == 2 * Image.open(tmp_path / "tbi.png").size[1]
