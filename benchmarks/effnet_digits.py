"""An EfficientNet-class CNN (MBConv blocks: depthwise convolutions, squeeze-and-excitation, SiLU) trained on
scikit-learn's digits upscaled to 64x64, searched on ONNX Runtime, OpenVINO and LiteRT in one union run: the
stand-in for the held-out EfficientNet-class targets (#26: a plain ORT search at top-1 agreement >= 0.94 within
1.05x `quantize_static`; #29: a LiteRT point at >= 0.90 within 1.1x `static_wi8_ai8`). Agreement is top-1 with
FP32 on digits the model was not trained on.

    python benchmarks/effnet_digits.py --trials 36 --out reports/benchmarks/effnet_digits.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

import autoq
from autoq.measure import fingerprint

SIZE = 64


def digits(size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Digits upscaled (bilinear) to `size` x `size`, three channels normalised as an ImageNet model takes them."""
    from sklearn.datasets import load_digits

    found = load_digits()
    images = torch.from_numpy((found.images / 16.0).astype(np.float32)[:, None])
    images = nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = ((images - 0.45) / 0.25).repeat(1, 3, 1, 1)
    return images.numpy(), found.target.astype(np.int64)


class MBConv(nn.Module):
    """EfficientNet's block: 1x1 expansion, depthwise k x k, squeeze-and-excitation, 1x1 projection (+ skip)."""

    def __init__(self, inputs: int, outputs: int, expand: int, kernel: int, stride: int) -> None:
        super().__init__()
        hidden = inputs * expand
        self.expand = nn.Sequential(nn.Conv2d(inputs, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.SiLU())
        self.depthwise = nn.Sequential(nn.Conv2d(hidden, hidden, kernel, stride, kernel // 2, groups=hidden,
                                                 bias=False), nn.BatchNorm2d(hidden), nn.SiLU())
        squeezed = max(1, inputs // 4)
        self.squeeze = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(hidden, squeezed, 1), nn.SiLU(),
                                     nn.Conv2d(squeezed, hidden, 1), nn.Sigmoid())
        self.project = nn.Sequential(nn.Conv2d(hidden, outputs, 1, bias=False), nn.BatchNorm2d(outputs))
        self.skip = stride == 1 and inputs == outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.depthwise(self.expand(x))
        h = self.project(h * self.squeeze(h))
        return x + h if self.skip else h


class EfficientDigits(nn.Module):
    """Stem, seven MBConv blocks (16 to 112 channels), a 1x1 head, pooling and a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 24, 3, 2, 1, bias=False), nn.BatchNorm2d(24), nn.SiLU())
        settings = [(24, 16, 1, 3, 1), (16, 24, 4, 3, 2), (24, 24, 4, 3, 1), (24, 40, 4, 5, 2), (40, 40, 4, 5, 1),
                    (40, 80, 4, 3, 2), (80, 112, 4, 5, 1)]
        self.blocks = nn.Sequential(*(MBConv(*s) for s in settings))
        self.head = nn.Sequential(nn.Conv2d(112, 320, 1, bias=False), nn.BatchNorm2d(320), nn.SiLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(320, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head(self.blocks(self.stem(image))))


def trained(epochs: int = 12, seed: int = 0) -> tuple[nn.Module, np.ndarray, np.ndarray]:
    """The CNN trained on digits 0-1199 (shifted by up to 4 pixels); returns it and the other 597 digits."""
    torch.manual_seed(seed)
    images, labels = digits()
    model = EfficientDigits()
    x, y = torch.from_numpy(images[:1200]), torch.from_numpy(labels[:1200])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for start in range(0, len(x), 32):
            shift = [int(v) for v in torch.randint(-4, 5, (2,), generator=generator)]
            batch = torch.roll(x[start:start + 32], shifts=shift, dims=(2, 3))
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(batch), y[start:start + 32]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(torch.from_numpy(images[1200:])).argmax(1).numpy() == labels[1200:]).mean())
    print(f"accuracy on the held-out digits: {accuracy:.3f}", flush=True)
    return model, images[1200:], labels[1200:]


TARGETS = [("onnxruntime", "quantize_static", 1.05, 0.94), ("litert", "static_wi8_ai8", 1.1, 0.90)]  # the issues'


def targets(run: Path) -> pd.DataFrame:
    """Per target: the recipe, and the best point of the same backend (every backend's front point, as the union's
    rounds timed them) within the latency factor of it."""
    points = pd.read_csv(run / "candidates.csv")
    recipes = pd.read_csv(run / "recipes.csv", keep_default_na=False)
    rows = []
    for backend, name, factor, floor in TARGETS:
        for recipe in recipes[(recipes["backend"] == backend) & recipes["recipe"].str.contains(name)].itertuples():
            if not isinstance(recipe.val_latency_ms, float) or np.isnan(recipe.val_latency_ms):
                continue
            fast = points[(points["backend"] == backend) & (points["latency_ms"] <= factor * recipe.val_latency_ms)]
            best = fast.loc[fast["val_quality"].idxmax()] if len(fast) else None
            rows.append({"recipe": recipe.recipe, "recipe agreement": round(float(recipe.val_quality), 4),
                         "recipe ms": round(float(recipe.val_latency_ms), 3), "target": f">= {floor} within {factor}x",
                         "best point agreement": None if best is None else round(float(best["val_quality"]), 4),
                         "its ms": None if best is None else round(float(best["latency_ms"]), 3),
                         "its precisions": None if best is None else best["summary"],
                         "met": best is not None and float(best["val_quality"]) >= floor})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=36, help="in all, split over the three backends")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--run", type=Path, default=Path("reports/effnet-digits"))
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/effnet_digits.md"))
    args = parser.parse_args()
    model, images, _ = trained()
    result = autoq.search(model, (torch.from_numpy(images[:1]),), {"image": images}, metric="top1",
                          backend="onnxruntime,openvino,litert", trials=args.trials, threads=args.threads,
                          out=args.run)
    front = result.front.sort_values("val_latency_ms")
    recipes = pd.read_csv(args.run / "recipes.csv", keep_default_na=False)
    machine = fingerprint(args.threads)
    table = pd.DataFrame({"point": front["point"], "backend": front["backend"],
                          "agreement": front["val_quality"].round(4), "latency ms": front["val_latency_ms"].round(3),
                          "size KB": (front["size_bytes"] / 1e3).round(1), "precisions": front["summary"]})
    kept = [c for c in ("recipe", "val_quality", "val_latency_ms", "verdict") if c in recipes]
    lines = ["# An EfficientNet-class CNN on digits: one front across ONNX Runtime, OpenVINO and LiteRT", "",
             f"CPU: {machine['cpu']}; flags: {' '.join(machine['cpu_flags'])}; {args.threads} threads, batch 1.",
             "Libraries: " + ", ".join(f"{k} {v}" for k, v in machine["libraries"].items()) + ".", "",
             f"`python benchmarks/effnet_digits.py --trials {args.trials}` (run `{args.run}`): every backend's front "
             "points, FP32 models and recipes timed together in alternating rounds; agreement is top-1 with FP32 "
             "on the validation digits.", "",
             "## The held-out CNN's targets, on this stand-in", "", targets(args.run).to_markdown(index=False), "",
             "## Union front", "", table.to_markdown(index=False), "",
             "## Recipes against the union front", "", recipes[kept].to_markdown(index=False), ""]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
