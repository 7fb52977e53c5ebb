"""The comparison table of the denoising study: markdown and JSON."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
from pathlib import Path

import torch


def environment(device: torch.device) -> dict:
    """Date, machine, versions: recorded with every table."""
    import skimage

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}",
        "torch": torch.__version__,
        "scikit-image": skimage.__version__,
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def row(model: str, scores: dict[str, dict[str, float]], params: int | None = None,
        train_seconds: float | None = None, steps: int | None = None) -> dict:
    """One table row: per-image scores plus their means."""
    psnrs = [s["psnr"] for s in scores.values()]
    return {"model": model, "params": params, "train_seconds": train_seconds, "steps": steps, "images": scores,
            "mean_psnr": sum(psnrs) / len(psnrs), "mean_ssim": sum(s["ssim"] for s in scores.values()) / len(scores)}


def _cell(psnr: float, ssim: float) -> str:
    return f"{'inf' if math.isinf(psnr) else f'{psnr:.2f}'} / {ssim:.4f}"


def markdown(tables: list[dict], env: dict, title: str) -> str:
    """tables: [{"sigma", "image_sizes": {name: [H, W]}, "rows": [row, ...]}] -> one markdown table per sigma."""
    lines = [f"## {title}", ""]
    lines.append(", ".join(f"{k}: {v}" for k, v in env.items()))
    lines.append("")
    for table in tables:
        names = list(table["image_sizes"])
        sizes = ", ".join(f"{n} {h}x{w}" for n, (h, w) in table["image_sizes"].items())
        lines += [f"### sigma = {table['sigma']:g} (on [0, 255])", "",
                  f"PSNR (dB) / SSIM of outputs clipped to [0, 1] on the held-out images ({sizes}). SSIM: "
                  "scikit-image's structural_similarity with its 7x7 uniform window, not the 11x11 Gaussian "
                  "window (sigma 1.5) of most papers: not directly comparable with published SSIMs.", "",
                  "| model | params | steps | train time (s) | " + " | ".join(names) + " | mean |",
                  "|---|---:|---:|---:|" + "---:|" * (len(names) + 1)]
        for r in table["rows"]:
            params = "" if r["params"] is None else f"{r['params']:,}"
            steps = "" if r["steps"] is None else str(r["steps"])
            seconds = "" if r["train_seconds"] is None else f"{r['train_seconds']:.1f}"
            cells = [_cell(r["images"][n]["psnr"], r["images"][n]["ssim"]) for n in names]
            lines.append(f"| {r['model']} | {params} | {steps} | {seconds} | " + " | ".join(cells)
                         + f" | **{_cell(r['mean_psnr'], r['mean_ssim'])}** |")
        lines.append("")
    return "\n".join(lines)


def write(out: Path, stem: str, tables: list[dict], env: dict, args: dict, text: str) -> tuple[Path, Path]:
    """Write <out>/<stem>.md and .json; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / f"{stem}.md", out / f"{stem}.json"
    md.write_text(text + "\n")
    js.write_text(json.dumps({"environment": env, "args": args, "tables": tables}, indent=2,
                             default=str) + "\n")
    return md, js
