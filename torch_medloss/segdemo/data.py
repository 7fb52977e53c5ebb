"""The data of the segmentation study: the MNI152 template that nilearn ships, its tissue classes, synthetic lesions.

Source: nilearn's copy of the ICBM 2009a nonlinear symmetric MNI152 template (T1, grey- and white-matter
probability maps; no download). The T1 is already brain-extracted (zero outside the brain).

Labels (``CLASSES``), from the maps, documented thresholds:
    brain = fill_holes(T1 > ``BRAIN_T1_THRESHOLD``) (3D hole filling keeps the ventricles inside);
    outside the brain: 0 background;
    inside, where gm + wm < ``TISSUE_THRESHOLD``: 1 CSF (ventricles, sulci);
    otherwise 2 grey matter where gm >= wm, else 3 white matter;
    4 lesion: synthetic, inserted into the white matter of each sample (see :func:`insert_lesions`).

Volumes are stored axial-first, (Z, Y, X) with anterior up, cropped in-plane to a fixed box around the brain.
Training and test regions are disjoint slabs of axial slices: the test slab is ``TEST_SLICES`` slices starting at
``TEST_START_FRACTION`` of the brain's axial extent (at the level of the lateral ventricles); ``GAP`` slices on
each side belong to neither. The brain slices below and above those form the two training slabs, each trimmed at
its ends to run from its first to its last slice with enough white matter for lesions (``MIN_WM_VOXELS``); 2D
training uses every slice of the training slabs (``Brain.train_slices``). A 3D training patch lies entirely inside
one training slab.

Every sample (training crop, test slice or test volume) gets its own lesions: small ellipsoids (radii drawn per
axis in [``r_min``, ``r_max``] voxels, random orientation) centred on white-matter voxels, cut to the white matter
so that every lesion voxel lies in the white-matter mask, darker or brighter than the tissue with a soft edge,
the small-lesion imbalance of MS lesion tasks. nilearn and nibabel are imported only when the template is loaded.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

CLASSES = ("background", "CSF", "grey matter", "white matter", "lesion")
BACKGROUND, CSF, GM, WM, LESION = range(5)
BRAIN_T1_THRESHOLD = 0.05
TISSUE_THRESHOLD = 0.5
TEST_START_FRACTION = 0.5
TEST_SLICES = 12
GAP = 2
MIN_WM_VOXELS = 100
R_MIN, R_MAX = 1.0, 6.0


@dataclass
class Brain:
    """The template at one resolution: ``image`` (Z, Y, X) float32 in [0, 1], ``labels`` (Z, Y, X) int64 with
    classes 0..3, ``spacing`` in mm per axis, and the axial slice indices of the test slab and of the training
    slices (``train_slabs``: (start, stop) ranges)."""

    image: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    test_slab: tuple[int, int]
    train_slabs: list[tuple[int, int]]

    @property
    def train_slices(self) -> list[int]:
        return [z for a, b in self.train_slabs for z in range(a, b)]


def tissue_labels(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """Classes 0..3 (background, CSF, GM, WM) from the T1 and the probability maps, with the module's thresholds."""
    from scipy import ndimage

    brain = ndimage.binary_fill_holes(t1 > BRAIN_T1_THRESHOLD)
    labels = np.zeros(t1.shape, np.int64)
    tissue = (gm + wm) >= TISSUE_THRESHOLD
    labels[brain] = CSF
    labels[brain & tissue & (gm >= wm)] = GM
    labels[brain & tissue & (gm < wm)] = WM
    return labels


def _crop_box(mask: np.ndarray, multiple: int) -> tuple[slice, slice]:
    """An in-plane (Y, X) box around the brain, each side a multiple of ``multiple``, centred and clipped."""
    box = []
    for axis, n in ((1, mask.shape[1]), (2, mask.shape[2])):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        size = min(n, -(-(hi - lo) // multiple) * multiple)
        start = max(0, min(n - size, (lo + hi - size) // 2))
        box.append(slice(start, start + size))
    return box[0], box[1]


@functools.lru_cache(maxsize=2)
def load_brain(resolution: int = 2) -> Brain:
    """Load nilearn's MNI152 template and maps at ``resolution`` mm (1 or 2), label it and split it into slabs."""
    if resolution not in (1, 2):
        raise ValueError(f"resolution must be 1 or 2 (mm), got {resolution!r}")
    from nilearn import datasets

    images = [datasets.load_mni152_template(resolution=resolution),
              datasets.load_mni152_gm_template(resolution=resolution),
              datasets.load_mni152_wm_template(resolution=resolution)]
    # nibabel arrays are (X, Y, Z) in RAS; store (Z, Y, X) with Y flipped so that a slice shows anterior up.
    t1, gm, wm = (np.ascontiguousarray(np.asarray(im.get_fdata(), np.float32).transpose(2, 1, 0)[:, ::-1])
                  for im in images)
    t1 = np.clip(t1, 0.0, 1.0)
    labels = tissue_labels(t1, gm, wm)
    zooms = images[0].header.get_zooms()[:3]
    spacing = (float(zooms[2]), float(zooms[1]), float(zooms[0]))
    brain = labels > 0
    ys, xs = _crop_box(brain, 16)
    t1, labels = t1[:, ys, xs].copy(), labels[:, ys, xs].copy()
    # The slabs, in slices at this resolution (the constants are for 2 mm; scale for 1 mm).
    scale = 2 // resolution
    z_brain = np.flatnonzero(brain.any(axis=(1, 2)))
    z0, z1 = int(z_brain[0]), int(z_brain[-1]) + 1
    n_test, gap = TEST_SLICES * scale, GAP * scale
    t0 = z0 + int(round(TEST_START_FRACTION * (z1 - z0)))
    test = (t0, t0 + n_test)
    enough_wm = (labels == WM).sum(axis=(1, 2)) >= MIN_WM_VOXELS * scale * scale
    slabs = []
    for a, b in ((z0, t0 - gap), (t0 + n_test + gap, z1)):
        ok = [z for z in range(a, b) if enough_wm[z]]
        if ok:
            slabs.append((ok[0], ok[-1] + 1))
    return Brain(t1, labels, spacing, test, slabs)


def _rotation(rng: np.random.Generator, ndim: int) -> np.ndarray:
    """A random rotation matrix (2D: uniform angle; 3D: QR of a Gaussian matrix, sign-fixed)."""
    if ndim == 2:
        a = rng.uniform(0, np.pi)
        return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    q, r = np.linalg.qr(rng.normal(size=(ndim, ndim)))
    return q * np.sign(np.diag(r))


def insert_lesions(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, count: tuple[int, int] = (1, 4),
                   r_min: float = R_MIN, r_max: float = R_MAX, contrast: tuple[float, float] = (0.2, 0.4),
                   edge: float = 0.15) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Insert small ellipsoidal lesions into the white matter of one 2D or 3D sample; returns new arrays.

    The number of lesions is drawn uniformly in ``count`` (inclusive). Each lesion: a centre drawn uniformly among
    the white-matter voxels (rejected up to 30 times if closer than the two radii plus 2 voxels to an earlier
    lesion, so lesions rarely merge), radii drawn per axis uniformly in [r_min, r_max] voxels, a random rotation.
    With d the ellipsoid's normalised radius at a voxel (d <= 1 inside), the label becomes ``LESION`` where d <= 1
    and the voxel was white matter; the intensity is multiplied by 1 -/+ a * s(d) with a in ``contrast`` (darker
    or brighter, even odds) and s(d) = sigmoid((1 - d) / edge) restricted to white matter, a soft edge about one
    voxel wide. Returns (image, labels, lesions), each lesion a dict with "center", "radii", "rotation", "sign".
    """
    image, labels = image.copy(), labels.copy()
    wm = np.argwhere(labels == WM)
    lesions: list[dict] = []
    if len(wm) == 0:
        return image, labels, lesions
    ndim = image.ndim
    n = int(rng.integers(count[0], count[1] + 1))
    for _ in range(n):
        radii = rng.uniform(r_min, r_max, size=ndim)
        for _try in range(30):
            center = wm[rng.integers(len(wm))].astype(np.float64)
            if all(np.linalg.norm(center - les["center"]) > radii.max() + les["radii"].max() + 2 for les in lesions):
                break
        rot = _rotation(rng, ndim)
        # Coordinates in the lesion's frame, scaled by the radii; only a box around the centre is evaluated.
        reach = int(np.ceil(radii.max())) + 2
        lo = np.maximum(center.astype(int) - reach, 0)
        hi = np.minimum(center.astype(int) + reach + 1, image.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        pts = np.indices(hi - lo).reshape(ndim, -1).T + lo
        local = (pts - center) @ rot / radii
        d = np.sqrt((local**2).sum(axis=1)).reshape(hi - lo)
        in_wm = labels[box] == WM
        inside = (d <= 1.0) & in_wm
        if not inside.any():
            continue
        sign = float(rng.choice([-1.0, 1.0]))
        a = rng.uniform(*contrast)
        soft = 1.0 / (1.0 + np.exp(-(1.0 - d) / edge)) * (in_wm | (labels[box] == LESION))
        image[box] = image[box] * (1.0 + sign * a * soft).astype(np.float32)
        labels[box][inside] = LESION
        lesions.append({"center": center, "radii": radii, "rotation": rot, "sign": sign})
    return image, labels, lesions


def augment(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Training augmentation: a flip per in-plane axis (even odds), intensity x U(0.9, 1.1) + U(-0.05, 0.05),
    Gaussian noise with sigma U(0, 0.04)."""
    for axis in range(image.ndim - 2, image.ndim):
        if rng.random() < 0.5:
            image, labels = np.flip(image, axis), np.flip(labels, axis)
    image = image * rng.uniform(0.9, 1.1) + rng.uniform(-0.05, 0.05)
    image = image + rng.normal(0.0, rng.uniform(0.0, 0.04), size=image.shape)
    return np.ascontiguousarray(image, np.float32), np.ascontiguousarray(labels)


def training_batch(brain: Brain, rng: np.random.Generator, batch_size: int, dim: int,
                   patch: int) -> tuple[np.ndarray, np.ndarray]:
    """One training batch: images (B, 1, *P) float32 and labels (B, 1, *P) int64, P = patch^dim (in-plane clipped
    to the slice size). 2D: a random crop of a random training slice; 3D: a random patch inside one training slab
    (depth min(patch, slab thickness)). Lesions are inserted after cropping, then augmented."""
    _, h, w = brain.image.shape
    ph, pw = min(patch, h), min(patch, w)
    images, labels = [], []
    for _ in range(batch_size):
        y0, x0 = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
        if dim == 2:
            z = int(rng.choice(brain.train_slices))
            img, lab = brain.image[z, y0:y0 + ph, x0:x0 + pw], brain.labels[z, y0:y0 + ph, x0:x0 + pw]
        else:
            thick = [s for s in brain.train_slabs if s[1] - s[0] >= patch]
            slabs = thick or [max(brain.train_slabs, key=lambda s: s[1] - s[0])]
            a, b = slabs[int(rng.integers(len(slabs)))]
            pd = min(patch, b - a)
            z0 = int(rng.integers(a, b - pd + 1))
            img = brain.image[z0:z0 + pd, y0:y0 + ph, x0:x0 + pw]
            lab = brain.labels[z0:z0 + pd, y0:y0 + ph, x0:x0 + pw]
        img, lab, _ = insert_lesions(img, lab, rng)
        img, lab = augment(img, lab, rng)
        images.append(img[None])
        labels.append(lab[None])
    return np.stack(images), np.stack(labels)


def training_batches(brain: Brain, seed: int, steps: int, batch_size: int, dim: int,
                     patch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``steps`` training batches (:func:`training_batch`) drawn lazily from ``np.random.default_rng(seed)``: only one
    batch is in memory at a time, and every call with the same arguments yields the same batches."""
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        yield training_batch(brain, rng, batch_size, dim, patch)


def test_set(brain: Brain, dim: int, repeats: int = 2, seed: int = 12345,
             noise: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
    """The fixed test set (same for every loss and training seed): images (N, 1, *S) and labels (N, 1, *S).

    2D: every slice of the test slab, ``repeats`` times with different lesions (1 to 4 per slice). 3D: the whole
    test slab as one volume, ``repeats`` times with different lesions (6 to 12 per volume). Gaussian noise of
    sigma ``noise``; no other augmentation. Drawn from ``np.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    a, b = brain.test_slab
    images, labels = [], []
    for _ in range(repeats):
        if dim == 2:
            samples = [(brain.image[z], brain.labels[z], (1, 4)) for z in range(a, b)]
        else:
            samples = [(brain.image[a:b], brain.labels[a:b], (6, 12))]
        for img, lab, count in samples:
            img, lab, _ = insert_lesions(img, lab, rng, count=count)
            img = img + rng.normal(0.0, noise, size=img.shape)
            images.append(img.astype(np.float32)[None])
            labels.append(lab[None])
    return np.stack(images), np.stack(labels)
