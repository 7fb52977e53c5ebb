"""The study's metrics on integer label maps (numpy), with their conventions. scipy is imported inside functions.

Dice per class (:func:`dice_counts`, :func:`dice_from_counts`): 2 TP / (2 TP + FP + FN). Over a test set the
counts are summed over all images before dividing (pooled Dice), so an image without a class counts neither as
0 nor as 1. Empty convention: no voxel of the class in prediction and target gives 1.0.

Lesion-wise detection (:func:`lesion_counts`, :func:`f1_from_counts`): lesions are the connected components of
the lesion class with full connectivity (8-neighbours in 2D, 26 in 3D). A true lesion is *detected* when at least
one voxel of it is predicted as lesion; a predicted component is a *hit* when it overlaps at least one true lesion
(one voxel is enough), otherwise a false positive. Precision = hits / predicted components, recall = detected /
true lesions, F1 = 2 P R / (P + R). Counts are summed over a test set. Empty conventions: no true and no predicted
lesion gives F1 = 1; exactly one side empty gives F1 = 0 (P or R is 0/0, taken as 0); P = R = 0 gives 0.

HD95 (:func:`hd95`): the symmetric 95th-percentile Hausdorff distance between the class surfaces, in mm (the voxel
``spacing``; spacing 1 gives voxels). The surface of a mask is the mask minus its erosion by the face-connected
cross (border voxels of the array count as surface). For each surface voxel of A the Euclidean distance to the
nearest surface voxel of B (exact distance transform), and vice versa; HD95 = max(95th percentile A->B, 95th
percentile B->A) (numpy's linear interpolation), as MONAI's ``compute_hausdorff_distance(percentile=95)``, which
it matches. medpy's ``hd95`` differs: it pools the distances of both directions before taking one 95th
percentile, so its value (about between the two directed percentiles) can be smaller than this one. Empty
conventions: both empty gives 0; exactly one empty gives the diagonal of the image grid in mm (the largest distance
possible in the image), a finite worst-case penalty, so that means over a test set stay finite and a missed class is
penalised.
Over a test set (:func:`evaluate`), HD95 of a class is the mean over the images where the class is present in the
prediction or the target: an image without the class on either side (HD95 0 by the convention above) is left out
rather than counted as a perfect 0, which would pull the mean down for classes missing from some images; NaN when
no image has the class on either side (shown as "-" in the tables).
"""

from __future__ import annotations

import numpy as np


def dice_counts(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, 3) array of TP, FP, FN per class for integer label maps of the same shape."""
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {pred.shape} and {target.shape}")
    out = np.zeros((num_classes, 3), np.int64)
    for c in range(num_classes):
        p, t = pred == c, target == c
        out[c] = (np.count_nonzero(p & t), np.count_nonzero(p & ~t), np.count_nonzero(~p & t))
    return out


def dice_from_counts(counts: np.ndarray) -> np.ndarray:
    """Dice per class from (C, 3) TP/FP/FN counts; 1.0 where the class is absent from both."""
    tp, fp, fn = (counts[..., i].astype(np.float64) for i in range(3))
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 1.0)


def lesion_counts(pred_mask: np.ndarray, true_mask: np.ndarray) -> dict[str, int]:
    """Counts for lesion-wise detection on boolean masks: true lesions, detected ones, predicted components, hits."""
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(true_mask.ndim, true_mask.ndim)
    true_cc, n_true = ndimage.label(true_mask, structure)
    pred_cc, n_pred = ndimage.label(pred_mask, structure)
    detected = np.unique(true_cc[pred_mask & (true_cc > 0)]).size
    hits = np.unique(pred_cc[true_mask & (pred_cc > 0)]).size
    return {"true": int(n_true), "detected": int(detected), "pred": int(n_pred), "hits": int(hits)}


def f1_from_counts(counts: dict[str, int]) -> dict[str, float]:
    """Precision, recall and F1 from :func:`lesion_counts` (possibly summed), with the module's empty conventions."""
    n_true, n_pred = counts["true"], counts["pred"]
    if n_true == 0 and n_pred == 0:
        return {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    precision = counts["hits"] / n_pred if n_pred else 0.0
    recall = counts["detected"] / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def surface(mask: np.ndarray) -> np.ndarray:
    """Boolean surface of a mask: voxels of the mask with a face neighbour outside it (or on the array border)."""
    from scipy import ndimage

    cross = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, cross, border_value=0)


def hd95(pred_mask: np.ndarray, true_mask: np.ndarray, spacing: tuple[float, ...] | None = None) -> float:
    """Symmetric 95th-percentile Hausdorff distance between two boolean masks, in units of ``spacing``."""
    from scipy import ndimage

    if pred_mask.shape != true_mask.shape:
        raise ValueError(f"masks must have the same shape, got {pred_mask.shape} and {true_mask.shape}")
    spacing = tuple(float(s) for s in (spacing or (1.0,) * pred_mask.ndim))
    a, b = pred_mask.any(), true_mask.any()
    if not a and not b:
        return 0.0
    if not (a and b):
        return float(np.sqrt(sum(((n - 1) * s) ** 2 for n, s in zip(pred_mask.shape, spacing, strict=True))))
    sa, sb = surface(pred_mask.astype(bool)), surface(true_mask.astype(bool))
    d_to_b = ndimage.distance_transform_edt(~sb, sampling=spacing)
    d_to_a = ndimage.distance_transform_edt(~sa, sampling=spacing)
    return float(max(np.percentile(d_to_b[sa], 95), np.percentile(d_to_a[sb], 95)))


def evaluate(pred: np.ndarray, target: np.ndarray, num_classes: int, lesion_class: int,
             spacing: tuple[float, ...]) -> dict:
    """All metrics over a test set of label maps (N, *S): pooled Dice per class, pooled lesion detection counts and
    F1, and HD95 per class averaged over the images where the class is in the prediction or the target (NaN if in
    none; foreground classes only, background's entry is NaN: it is the complement)."""
    counts = np.zeros((num_classes, 3), np.int64)
    det = {"true": 0, "detected": 0, "pred": 0, "hits": 0}
    hd_sum = np.zeros(num_classes)
    hd_images = np.zeros(num_classes, np.int64)
    for p, t in zip(pred, target, strict=True):
        counts += dice_counts(p, t, num_classes)
        for k, v in lesion_counts(p == lesion_class, t == lesion_class).items():
            det[k] += v
        for c in range(1, num_classes):
            p_c, t_c = p == c, t == c
            if p_c.any() or t_c.any():
                hd_sum[c] += hd95(p_c, t_c, spacing)
                hd_images[c] += 1
    hd = [float(hd_sum[c] / hd_images[c]) if c and hd_images[c] else float("nan") for c in range(num_classes)]
    return {"dice": dice_from_counts(counts).tolist(), "lesion": {**det, **f1_from_counts(det)}, "hd95": hd}
