"""Synthetic head-CT phantom: NIfTI volumes in Hounsfield units with haemorrhage masks.

Two lesion domains share one anatomy model, so that transfer from one to the other can be measured:

* ``tbi`` (source): intraparenchymal haematoma (irregular blob with an oedema rim), subdural haematoma
  (crescent along the inner table, one hemisphere) and epidural haematoma (biconvex lens), 55-90 HU.
* ``sah`` (target): thin hyperdense blood (50-70 HU) filling basal cisterns, Sylvian fissures, the
  interhemispheric fissure and cortical sulci around a bleeding point.

Anatomy (head frame in mm, x right, y anterior, z superior, origin at the thalamic level): scalp with a
fat layer, skull (dense tables and diploe), skull base with sinuses and orbits, grey-matter cortex with
sulci (zero sets of a random Fourier field), white matter, deep grey nuclei, lateral/third/fourth
ventricles, basal cisterns, Sylvian and interhemispheric fissures with the falx, cerebellum with folia.
Each case draws head size, position, rotation, tissue densities, atrophy and lesions from a generator
seeded by (seed, case index, domain), then blurs (partial volume) and adds noise. The label marks the
voxels the lesion dominates (over half of the voxel, and not outshone by the skull beside it), so labelled
voxels read as blood. Lesion sizes cycle through small, medium and large.

Command line::

    python -m segadapt.data.phantom --domain sah --n 12 --out data/phantom_sah [--seed 0]
        [--shape 96 96 40] [--spacing 2.3 2.3 4.0] [--preview sah.png]

writes ``imagesTr/<domain>_NNN.nii.gz`` (int16 HU), ``labelsTr/<domain>_NNN.nii.gz`` (uint8 0/1) and
``dataset.json``. The default grid is a downsampled head (220 x 220 x 160 mm field of view) so a few
dozen cases take seconds; ``--shape 256 256 36 --spacing 0.9 0.9 5`` gives clinical resolution.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..dataset_json import write_dataset_json
from ..files import save_nifti

DOMAINS = ("tbi", "sah")
SIZES = ("small", "medium", "large")
DEFAULT_SHAPE = (96, 96, 40)
DEFAULT_SPACING = (2.3, 2.3, 4.0)

AIR, FAT, CSF, WHITE, GREY, DEEP_GREY, SCALP, BONE, DIPLOE = -1000.0, -90.0, 5.0, 27.0, 38.0, 36.0, 35.0, 1500.0, 750.0


class _Field:
    """Smooth random field f(p) = sqrt(2/n) * sum_k cos(w_k . p + phi_k), |w_k| ~ 2 pi / wavelength; std ~ 1."""

    def __init__(self, rng: np.random.Generator, wavelength: float, n_modes: int = 12) -> None:
        directions = rng.normal(size=(n_modes, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        self.w = (directions * (2 * np.pi / wavelength) * rng.uniform(0.8, 1.25, (n_modes, 1))).astype(np.float32)
        self.phase = rng.uniform(0, 2 * np.pi, n_modes).astype(np.float32)
        self.amp = np.float32(np.sqrt(2.0 / n_modes))

    def _phase(self, p: np.ndarray) -> np.ndarray:
        w = self.w  # (n, 3); broadcasting beats a matmul with an inner dimension of 3
        return w[:, 0:1] * p[0] + w[:, 1:2] * p[1] + w[:, 2:3] * p[2] + self.phase[:, None]

    def __call__(self, p: np.ndarray) -> np.ndarray:
        """p: (3, N) points in mm -> (N,) values."""
        return self.amp * np.cos(self._phase(p)).sum(axis=0)

    def distance_to_zero(self, p: np.ndarray) -> np.ndarray:
        """First-order distance (mm) from each point to the zero set: |f| / |grad f|."""
        phase = self._phase(p)
        value = np.cos(phase).sum(axis=0)
        sine = np.sin(phase)
        gradient = [(self.w[:, i : i + 1] * sine).sum(axis=0) for i in range(3)]  # up to the factor -amp
        return np.abs(value) / (np.sqrt(gradient[0] ** 2 + gradient[1] ** 2 + gradient[2] ** 2) + 1e-3)


def _ellipsoid(p: np.ndarray, center: Sequence[float], axes: Sequence[float]) -> np.ndarray:
    """Squared normalised radius sum(((p - c) / a)^2): < 1 inside."""
    return sum(np.square((p[i] - np.float32(center[i])) * np.float32(1.0 / axes[i])) for i in range(3))


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    cz, sz, cx, sx, cy, sy = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    return rz @ rx @ ry


@dataclass
class _Cavity:
    """The cranial cavity's voxels: flat indices into the volume and per-voxel anatomy (head frame, mm)."""

    index: np.ndarray
    p: np.ndarray  # (3, N) positions
    inner: np.ndarray  # depth below the inner table
    brain_depth: np.ndarray  # depth below the brain surface
    cerebrum: np.ndarray
    ventricles: np.ndarray
    csf_spaces: np.ndarray  # cisterns, fissures, sulci, convexity CSF (where SAH collects), not ventricles


def _build_head(p: np.ndarray, rng: np.random.Generator, min_spacing: float) -> tuple[np.ndarray, _Cavity]:
    """HU of every voxel (flat) of a head at head-frame positions `p` (3, N), and its cranial cavity."""
    hu = np.full(p.shape[1], AIR, np.float32)
    # Outer surface: an ellipsoid with a low-frequency bulge; depth ~ (1 - rho) / |grad rho|.
    axes = (np.array([74.0, 92.0, 95.0]) * rng.uniform(0.96, 1.04, 3)).astype(np.float32)[:, None]
    centre = np.array([[0.0], [0.0], [-10.0]], np.float32)
    head = np.flatnonzero((((p - centre) / (axes * 1.03)) ** 2).sum(axis=0) < 1)
    p = p[:, head]
    x, y, z = p
    q = p - centre
    rho_ellipsoid = np.sqrt(((q / axes) ** 2).sum(axis=0))
    rho = rho_ellipsoid + 0.012 * _Field(rng, 140.0, 6)(p)
    grad = np.sqrt(((q / axes**2) ** 2).sum(axis=0)) / np.maximum(rho_ellipsoid, 1e-3)
    depth = (1.0 - rho) / np.maximum(grad, 1e-4)

    temporalis = 4.0 * np.clip(np.abs(x) / 70.0, 0, 1) ** 6 * (z < 20)
    scalp = rng.uniform(4.0, 6.0) + temporalis
    skull = rng.uniform(6.0, 8.0) + 1.2 * _Field(rng, 90.0, 6)(p)
    inner = depth - scalp - skull
    atrophy = rng.uniform(0.0, 1.0)  # 0 young, 1 elderly: wider sulci, fissures and ventricles

    tissue = np.full(p.shape[1], AIR, np.float32)
    tissue[depth >= 0] = SCALP
    tissue[(depth >= 0.35 * scalp) & (depth < 0.6 * scalp) & (temporalis < 1)] = FAT
    bone = (depth >= scalp) & (inner < 0)
    tissue[bone] = np.where(((depth - scalp)[bone] < 1.8) | (inner[bone] > -1.8), BONE, DIPLOE)

    floor = _skull_base(tissue, p, depth, inner, scalp)
    hu[head] = tissue

    cavity = np.flatnonzero((inner >= 0) & (z > floor))
    index = head[cavity]
    brain_depth = inner[cavity] - (1.0 + 1.5 * atrophy)  # under the convexity CSF
    tissue, cerebrum, ventricles, csf_spaces = _brain(p[:, cavity], q[:, cavity], rho_ellipsoid[cavity], brain_depth,
                                                      atrophy, rng, min_spacing)
    hu[index] = tissue
    return hu, _Cavity(index, p[:, cavity], inner[cavity], brain_depth, cerebrum, ventricles, csf_spaces)


def _skull_base(
    tissue: np.ndarray, p: np.ndarray, depth: np.ndarray, inner: np.ndarray, scalp: np.ndarray
) -> np.ndarray:
    """Paint the skull base and face into `tissue`; return the cranial cavity's floor height z(x, y) (mm)."""
    x, y, z = p
    # The cavity floor steps from the anterior fossa (orbital roofs, -31..-23) across the
    # sphenoid ridges to the middle fossa (-50, sella -38) and the posterior fossa (-76), over a 5 mm bony
    # plate; below it the face and neck: soft tissue with air sinuses, fatty orbits with globes, petrous
    # ridges and the clivus.
    anterior = np.clip((y - 18.0 - 0.35 * np.abs(x)) / 8.0, 0, 1)  # behind the sphenoid ridges
    posterior = np.clip((-14.0 - y) / 8.0, 0, 1)
    middle = np.where(np.abs(x) < 16.0, -38.0, -50.0)
    orbital_roofs = -31.0 + 8.0 * np.exp(-(((np.abs(x) - 28.0) / 14.0) ** 2))
    floor = middle + anterior * (orbital_roofs - middle) + posterior * (-76.0 - middle)
    below = np.flatnonzero((depth >= scalp) & (z <= floor))
    tissue[below] = np.where((z > floor - 5.0)[below] | (inner[below] < 0), 900.0, SCALP + 5.0)
    pb = p[:, below]
    structures = []  # (centre, semi-axes, HU), painted in order
    for side in (-1, 1):
        structures += [((side * 30, 56, -42), (18, 23, 16), 900.0),  # orbital walls
                       ((side * 30, 57, -42), (15, 20, 13), FAT),  # orbit
                       ((side * 30, 63, -42), (11, 11, 11), 12.0),  # globe
                       ((side * 26, 42, -72), (14, 16, 16), AIR)]  # maxillary sinus
    structures += [((0, 18, -50), (12, 10, 8), AIR), ((0, 44, -42), (8, 16, 10), AIR),  # sphenoid, ethmoid
                   ((0, 56, -66), (5, 18, 14), AIR), ((0, -2, -62), (8, 8, 14), 1100.0)]  # nasal cavity, clivus
    for centre_, size, value in structures:
        tissue[below[_ellipsoid(pb, centre_, size) < 1]] = value
    for side in (-1, 1):
        petrous = _ellipsoid(_rotate_xy(pb, side * 0.7, (side * 32, -16)), (side * 32, -16, -56), (24, 6, 8)) < 1
        tissue[below[petrous]] = BONE
    return floor


def _brain(
    p: np.ndarray, q: np.ndarray, rho: np.ndarray, brain_depth: np.ndarray, atrophy: float,
    rng: np.random.Generator, min_spacing: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(HU, cerebrum, ventricles, CSF spaces) of cranial-cavity points `p` (q: from the head centre, rho: its
    normalised radius, brain_depth: mm under the brain surface; negative = convexity CSF)."""
    x, y, z = p
    tissue = np.full(p.shape[1], CSF, np.float32)
    # Brain: cortex grey matter with sulci running in from the surface, white matter inside; cerebellum
    # with folia in the posterior fossa. Sulci are the zero set of a random field evaluated on (almost)
    # radial projections, so they run roughly perpendicular to the surface.
    brain = brain_depth >= 0
    cerebellum = brain & (y < -12) & (z < -44)
    cerebrum = brain & ~cerebellum
    csf_spaces = ~brain
    shrink = rho[cerebrum] ** 0.8
    pc = q[:, cerebrum] / shrink
    sulcus_distance = _Field(rng, 30.0, 24).distance_to_zero(pc) * shrink
    sulcus_depth = rng.uniform(12.0, 20.0) + 3.0 * _Field(rng, 60.0, 6)(pc)
    width = max(1.4 + 1.8 * atrophy, 0.9 * min_spacing) * (1.0 + 0.3 * _Field(rng, 40.0, 6)(pc))
    bd = brain_depth[cerebrum]
    in_sulcus = (sulcus_distance < width / 2) & (bd < sulcus_depth)
    grey = (bd < 3.0) | ((sulcus_distance < width / 2 + 2.5) & (bd < sulcus_depth + 2.5))
    grey_hu, white_hu = GREY + rng.uniform(-1.5, 2.5), WHITE + rng.uniform(-2.5, 1.5)
    tissue[cerebrum] = np.where(in_sulcus, CSF, np.where(grey, grey_hu, white_hu))
    csf_spaces[np.flatnonzero(cerebrum)[in_sulcus]] = True

    folia = _Field(rng, 10.0, 16).distance_to_zero(p[:, cerebellum]) < 0.3 * max(min_spacing, 1.0)
    tissue[cerebellum] = np.where(folia, grey_hu - 12.0, grey_hu + 1.0)
    tissue[cerebellum & (_ellipsoid(p, (0, -40, -62), (24, 14, 10)) < 1)] = white_hu + 3.0
    tissue[brain & (_ellipsoid(p, (0, -20, -54), (12, 11, 24)) < 1)] = white_hu + 4.0  # pons and medulla
    midbrain = _ellipsoid(p, (0, -10, -28), (12, 10, 30))
    tissue[brain & (midbrain < 1)] = white_hu + 5.0

    # Fissures: interhemispheric (with the denser falx) and Sylvian; basal cisterns round the midbrain.
    midline = np.abs(x - 1.5 * _Field(rng, 50.0, 6)(p))
    fissure = (midline < 1.5 + 0.8 * atrophy) & (z > -28) & ((z > 26) | (y > 34) | (y < -40))
    bend = 2.5 * _Field(rng, 30.0, 6)(p)
    stem = np.abs(y - 8.0 - 0.2 * (np.abs(x) - 12.0) + bend)
    insula = np.abs(np.abs(x) - 36.0 - 0.1 * z + bend)
    sylvian = (
        ((stem < 1.2 + atrophy) & (np.abs(x) > 12) & (np.abs(x) < 44) & (z > -36) & (z < -24))
        | ((insula < 1.0 + atrophy) & (np.abs(y) < 16) & (z > -28) & (z < 4))
    )
    ring = (np.sqrt(midbrain) - 1.0) * 11.0 + 1.2 * _Field(rng, 20.0, 6)(p)
    theta = np.arctan2(y - 8.0, x)
    cisterns = (
        ((ring > 0) & (ring < 2.5 + 2.0 * atrophy) & (z > -40) & (z < -20) & (y < 2))  # ambient, quadrigeminal
        | ((_ellipsoid(p, (0, 8, -30), (13, 9, 6)) < (1 + 0.25 * np.cos(5 * theta)) ** 2) & (y > -6))  # suprasellar
        | (_ellipsoid(p, (0, -4, -52), (9, 4, 12)) < 1)  # prepontine
    )
    for mask in (fissure, sylvian, cisterns):
        tissue[mask] = CSF
        csf_spaces |= mask
    tissue[fissure & (midline < 0.6)] = 48.0  # falx

    # Deep grey nuclei and ventricles (scaled by atrophy); the septum is the gap between the bodies.
    v = 1.0 + 0.5 * atrophy
    for side in (-1, 1):
        for centre_, size in (((22, 4, 0), (6, 15, 10)), ((9, -8, 2), (8, 11, 9)), ((8 + 5 * v, 20, 12), (5, 9, 9))):
            nucleus = cerebrum & (_ellipsoid(p, (side * centre_[0], *centre_[1:]), size) < 1)
            tissue[nucleus] = DEEP_GREY + rng.uniform(0, 3)
    ventricles = np.zeros(p.shape[1], bool)
    for side in (-1, 1):
        for centre_, size in (((1.5 + 5 * v, 0, 18), (5 * v, 26, 8 * v)), ((1.5 + 5 * v, 22, 10), (5 * v, 12, 9 * v)),
                              ((6 + 6 * v, -24, 12), (6 * v, 12, 8 * v)), ((30, -2, -22), (2.5 * v, 10, 3.5))):
            ventricles |= _ellipsoid(p, (side * centre_[0], *centre_[1:]), size) < 1
    ventricles |= _ellipsoid(p, (0, -2, -5), (1.5 * v, 14, 10)) < 1
    ventricles |= _ellipsoid(p, (0, -30, -56), (6, 4, 7)) < 1
    tissue[ventricles] = CSF
    return tissue, cerebrum, ventricles, csf_spaces & ~ventricles


def _rotate_xy(p: np.ndarray, angle: float, center: Sequence[float]) -> np.ndarray:
    """Points rotated by `angle` about the vertical axis through `center` (x, y)."""
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = p[0] - center[0], p[1] - center[1]
    return np.stack([center[0] + c * dx - s * dy, center[1] + s * dx + c * dy, p[2]])


def _convexity_direction(rng: np.random.Generator) -> np.ndarray:
    """A unit direction towards the cerebral convexity (not the skull base)."""
    while True:
        u = rng.normal(size=3)
        u /= np.linalg.norm(u)
        if 0.0 < u[2] < 0.75:
            return u


def _angle_to(p: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Angle (rad) between each point's direction from the head centre and `u`."""
    q = p - np.array([[0.0], [0.0], [-10.0]], np.float32)
    return np.arccos(np.clip((u[:, None] * q).sum(axis=0) / (np.linalg.norm(q, axis=0) + 1e-3), -1, 1))


def _extra_axial(cavity: _Cavity, rng: np.random.Generator, kind: str, size: str) -> np.ndarray:
    """Subdural crescent (thin, wide) or epidural lens (thick, short) hugging the inner table."""
    u = _convexity_direction(rng)
    if kind == "subdural":
        thickness = {"small": (3, 5), "medium": (6, 10), "large": (11, 16)}[size]
        extent = {"small": (0.35, 0.5), "medium": (0.5, 0.7), "large": (0.7, 0.9)}[size]
    else:
        thickness = {"small": (5, 8), "medium": (9, 15), "large": (16, 24)}[size]
        extent = {"small": (0.22, 0.3), "medium": (0.3, 0.4), "large": (0.4, 0.5)}[size]
    t_max, theta_max = rng.uniform(*thickness), rng.uniform(*extent)
    profile = np.clip(1.0 - (_angle_to(cavity.p, u) / theta_max) ** 2, 0.0, None)
    profile = profile if kind == "subdural" else np.sqrt(profile)
    same_side = np.sign(cavity.p[0]) == np.sign(u[0])  # the falx stops a subdural at the midline
    return ~cavity.ventricles & (cavity.inner < t_max * profile) & (same_side | (kind == "epidural"))


def _intraparenchymal(cavity: _Cavity, rng: np.random.Generator, size: str) -> tuple[np.ndarray, np.ndarray]:
    """Irregular haematoma deep in the cerebrum, and its oedema rim."""
    candidates = np.flatnonzero(cavity.cerebrum & ~cavity.ventricles & (cavity.brain_depth > 10))
    center = cavity.p[:, rng.choice(candidates)]
    radius = rng.uniform(*{"small": (3.5, 6), "medium": (7, 12), "large": (13, 19)}[size])
    e = _ellipsoid(cavity.p, center, radius * rng.uniform(0.7, 1.3, 3))
    e += 0.35 * _Field(rng, max(radius, 6.0), 8)(cavity.p)
    return ~cavity.ventricles & (e < 1), cavity.cerebrum & (e >= 1) & (e < 2.2)


def _subarachnoid(cavity: _Cavity, rng: np.random.Generator, size: str) -> np.ndarray:
    """Blood in the CSF spaces near a bleeding point: basal cisterns (aneurysm) or a convexity."""
    if size == "small":
        source = _convexity_direction(rng) * 60.0 + np.array([0, 0, -10.0])
        reach = rng.uniform(12, 20)
    else:
        source = np.array([rng.uniform(-8, 8), rng.uniform(4, 14), rng.uniform(-32, -24)])
        reach = rng.uniform(26, 34) if size == "medium" else rng.uniform(40, 55)
    spaces = np.flatnonzero(cavity.csf_spaces)
    p = cavity.p[:, spaces]
    density = np.exp(-np.sqrt(_ellipsoid(p, source, (1, 1, 1))) / reach) * (1 + 0.4 * _Field(rng, 25.0, 8)(p))
    blood = np.zeros_like(cavity.csf_spaces)
    blood[spaces[density > np.exp(-1.0)]] = True
    return blood


def make_case(
    domain: str,
    rng: np.random.Generator,
    shape: Sequence[int] = DEFAULT_SHAPE,
    spacing: Sequence[float] = DEFAULT_SPACING,
    size: str = "medium",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One phantom case: (image int16 HU (X, Y, Z), mask uint8 (X, Y, Z), RAS affine (4, 4)).

    The volume's centre is the world origin; the head is placed with a random scale (0.9-1.05), shift
    (+-8 mm in-plane) and rotation (yaw +-10, pitch +-6, roll +-4 degrees).
    """
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    shape, spacing = tuple(int(s) for s in shape), np.asarray(spacing, np.float64)
    if len(shape) != 3 or len(spacing) != 3 or min(shape) < 8 or (spacing <= 0).any():
        raise ValueError(f"need a 3D shape of at least 8 voxels per axis and positive spacing, got {shape}, {spacing}")
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2 * spacing
    # Head frame from world: p_head = R^T (p_world - t) / scale.
    scale = rng.uniform(0.9, 1.05)
    shift = np.array([rng.uniform(-8, 8), rng.uniform(-8, 8), rng.uniform(-10, 0)])
    rotation = _rotation(*np.deg2rad([rng.uniform(-10, 10), rng.uniform(-6, 6), rng.uniform(-4, 4)]))
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")).reshape(3, -1)
    world = affine[:3, :3].astype(np.float32) @ grid + affine[:3, 3:].astype(np.float32)
    p = ((rotation.T / scale).astype(np.float32) @ (world - shift[:, None].astype(np.float32)))
    hu, cavity = _build_head(p, rng, float(spacing.min()) / scale)

    blood = np.zeros(cavity.index.shape, bool)  # over the cavity's voxels
    if domain == "tbi":
        kinds = ["intraparenchymal", "subdural", "epidural"]
        first = kinds[rng.integers(3)]
        lesions = [(first, size)]
        if rng.uniform() < 0.4:
            lesions.append((kinds[(kinds.index(first) + rng.integers(1, 3)) % 3], "small"))
        for kind, lesion_size in lesions:
            if kind == "intraparenchymal":
                lesion, oedema = _intraparenchymal(cavity, rng, lesion_size)
                hu[cavity.index[oedema & ~blood]] -= 10.0
            else:
                lesion = _extra_axial(cavity, rng, kind, lesion_size)
            hu[cavity.index[lesion]] = rng.uniform(58, 85) + 6.0 * _Field(rng, 20.0, 6)(cavity.p[:, lesion])
            blood |= lesion
    else:
        blood = _subarachnoid(cavity, rng, size)
        hu[cavity.index[blood]] = rng.uniform(52, 68) + 4.0 * _Field(rng, 20.0, 6)(cavity.p[:, blood])
    lesion = np.zeros(hu.shape, np.float32)
    lesion[cavity.index[blood]] = 1.0

    # Partial volume: Gaussian blur of sd sqrt(voxel^2 / 12 + 0.6^2) mm (a voxel box plus the scanner's
    # point spread). Noise: 3-4.5 HU at a 0.9 x 0.9 x 5 mm voxel, falling as 1/sqrt(voxel volume) on
    # coarser grids; drawn before the blur and scaled by the share of its sd that survives it.
    sigma = np.sqrt(spacing**2 / 12 + 0.36) / spacing
    survival = np.prod(np.minimum(1.0, (2 * np.sqrt(np.pi) * sigma) ** -0.5))
    noise_sd = rng.uniform(3.0, 4.5) * np.sqrt(0.9 * 0.9 * 5.0 / np.prod(spacing))
    noise = rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(noise_sd / survival)

    def blur(values: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(values.reshape(shape), sigma=sigma, truncate=3.0)

    image = np.clip(np.rint(blur(hu + noise)), -1024, 3071).astype(np.int16)
    # Label where the lesion dominates the voxel, as a reader of the image would: the point-spread-weighted
    # share of lesion in it above one half, and bone (>= 300 HU) adding less to its value than half of
    # what the lesion adds (else the voxel reads as skull: above ~150 HU, far over acute blood).
    bone_hu = np.where(hu >= 300.0, hu, 0.0).astype(np.float32)
    mask = (blur(lesion) > 0.5) & (blur(bone_hu) < 0.5 * blur(lesion * hu))
    return image, mask.astype(np.uint8), affine


def case_rng(seed: int, index: int, domain: str) -> np.random.Generator:
    """The generator of case `index`: independent of how many cases are made."""
    return np.random.default_rng([seed, index, DOMAINS.index(domain)])


def make_phantom_dataset(
    out_dir: str | os.PathLike,
    domain: str,
    n: int,
    seed: int = 0,
    shape: Sequence[int] = DEFAULT_SHAPE,
    spacing: Sequence[float] = DEFAULT_SPACING,
) -> Path:
    """Write `n` phantom cases of `domain` and their ``dataset.json`` under `out_dir`; return the json path.

    Case i is ``<domain>_<i:03d>`` with lesion size SIZES[(i + seed) % 3]; the same (seed, i, domain,
    shape, spacing) always gives the same voxels.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    out = Path(out_dir)
    cases = []
    for i in range(n):
        case_id = f"{domain}_{i:03d}"
        image, mask, affine = make_case(domain, case_rng(seed, i, domain), shape, spacing, SIZES[(i + seed) % 3])
        cases.append({
            "image": save_nifti(out / "imagesTr" / f"{case_id}.nii.gz", image, affine),
            "label": save_nifti(out / "labelsTr" / f"{case_id}.nii.gz", mask, affine),
            "case_id": case_id,
        })
    return write_dataset_json(
        out / "dataset.json", f"phantom_{domain}", cases, labels={0: "background", 1: "haemorrhage"},
        modality={0: "CT"}, description=f"segadapt synthetic head CT, {domain} lesions, seed {seed}",
        reference="segadapt.data.phantom", licence="CC0",
    )


def preview_slice(image: np.ndarray, mask: np.ndarray, window: Sequence[float] = (40.0, 80.0)) -> np.ndarray:
    """RGB uint8 picture of the axial slice with the most lesion: windowed CT | same with lesion in red.

    Radiological convention: patient right on the left, anterior at the top.
    """
    z = int(np.argmax(mask.reshape(-1, mask.shape[2]).sum(axis=0))) if mask.any() else mask.shape[2] // 2
    level, width = window
    grey = np.clip((image[:, :, z].astype(np.float32) - level + width / 2) / width, 0, 1)
    grey = (grey.T[::-1, ::-1] * 255).astype(np.uint8)
    lesion = mask[:, :, z].T[::-1, ::-1] > 0
    overlay = np.repeat(grey[..., None], 3, axis=2)
    overlay[lesion] = (0.45 * overlay[lesion] + [140, 0, 0]).astype(np.uint8)
    return np.concatenate([np.repeat(grey[..., None], 3, axis=2), overlay], axis=1)
