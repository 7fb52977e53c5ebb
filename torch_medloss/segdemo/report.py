"""The study's outputs: mean and spread over seeds, the markdown table, the JSON, the figure (matplotlib, Agg)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

# Foreground classes reported (background Dice is near 1 for every loss and HD95 is not defined for it).
REPORTED = (1, 2, 3, 4)
SHORT = {1: "CSF", 2: "GM", 3: "WM", 4: "lesion"}


def summarize(per_seed: list[dict]) -> dict:
    """Mean and sample standard deviation (ddof=1; None with one seed: no spread to report) over seeds of every
    metric of :func:`torch_medloss.segdemo.metrics.evaluate`."""

    def stats(values: list[float]) -> dict:
        arr = np.asarray(values, np.float64)
        return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else None,
                "values": [float(v) for v in arr]}

    out: dict = {"dice": {}, "hd95": {}}
    for c in REPORTED:
        out["dice"][SHORT[c]] = stats([r["dice"][c] for r in per_seed])
        out["hd95"][SHORT[c]] = stats([r["hd95"][c] for r in per_seed])
    for key in ("f1", "precision", "recall"):
        out[f"lesion_{key}"] = stats([r["lesion"][key] for r in per_seed])
    return out


def _fmt(s: dict, digits: int) -> str:
    if math.isnan(s["mean"]):
        return "-"
    if s["std"] is None:  # one seed
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def markdown_table(summary: dict[str, dict], names: dict[str, str]) -> str:
    """One row per loss: Dice per class, lesion F1 (precision / recall), HD95 per class in mm; mean ± std."""
    head = (["loss"] + [f"Dice {SHORT[c]}" for c in REPORTED] + ["lesion F1", "lesion P / R"]
            + [f"HD95 {SHORT[c]} (mm)" for c in REPORTED])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, s in summary.items():
        row = [names[key]] + [_fmt(s["dice"][SHORT[c]], 3) for c in REPORTED] + [_fmt(s["lesion_f1"], 3)]
        row.append(f"{s['lesion_precision']['mean']:.2f} / {s['lesion_recall']['mean']:.2f}")
        row += [_fmt(s["hd95"][SHORT[c]], 1) for c in REPORTED]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=1, default=float) + "\n")


def figure(path: Path, image: np.ndarray, target: np.ndarray, preds: dict[str, np.ndarray], title: str) -> bool:
    """PNG of one test slice: the image, the ground truth and each loss's prediction. Returns False (and writes
    nothing) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap(["black", "#3b75af", "#8fbc5a", "#f2f2f2", "#e3242b"])
    panels = [("image", image, "gray"), ("ground truth", target, cmap)] + [(k, v, cmap) for k, v in preds.items()]
    cols = min(6, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, arr, cm) in zip(axes.flat, panels, strict=False):
        kw = {"vmin": 0, "vmax": 4, "interpolation": "nearest"} if not isinstance(cm, str) else {}
        ax.imshow(arr, cmap=cm, **kw)
        ax.set_title(name, fontsize=9)
    fig.suptitle(title + "\nblue CSF, green grey matter, white white matter, red lesion", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
