"""An extra alone is enough for its module backend (`torch`, or `litert` as the second argument): search a tiny
nn.Sequential (made here, random clusters as in tiny_model.py) with it, and check the front's points executed as
assigned."""

import sys
from pathlib import Path

import numpy as np
import torch

import autoq

if __name__ == "__main__":
    out, backend = Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "torch"
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (4, 32))
    labels = rng.integers(0, 4, 256)
    x = (centres[labels] + rng.normal(0, 0.5, (256, 32))).astype(np.float32)
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4)).eval()
    result = autoq.search(module, (torch.zeros(1, 32),), {"input": x}, labels=labels, backend=backend, trials=4,
                          out=out, progress=False, recipes="none")
    assert len(result.front) >= 1 and result.front["val_executed_ok"].all(), result.front
    print(f"{backend} extra: {len(result.front)} front points, executed as assigned")
