"""HAWQ-V2 sensitivity for torch models: the Hutchinson estimate of each layer's Hessian trace (E[v^T H v] over
Rademacher vectors v, by double backpropagation) times the squared weight perturbation its precision causes,
divided by the layer's parameter count: Tr(H)/n * ||Q(W) - W||^2.

The loss is the squared distance of the outputs to the FP32 outputs, what every autoq metric compares against.
At the FP32 point its gradient is zero and its Hessian is the Gauss-Newton matrix 2 J^T J, positive
semi-definite: each Hutchinson sample v^T H v = 2 |J v|^2 >= 0 (a task loss such as the cross-entropy of a
trained ReLU network has an indefinite Hessian, and its trace estimates can come out negative).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from autoq.errors import AutoqError
from autoq.evaluate import Evaluator
from autoq.graph import Layer
from autoq.precision import Precision
from autoq.quantsim import round_weight

if TYPE_CHECKING:
    import torch

SAMPLES = 8  # Rademacher vectors per estimate
MAX_BATCH = 16  # samples of the search split in the loss


def _perturbation(weight: np.ndarray, precision: Precision) -> float:
    """||Q(W) - W||^2 for the way `precision` rounds this weight (output channels on axis 0, as torch stores)."""
    flat = weight.reshape(weight.shape[0], -1)
    return float(np.sum((flat - round_weight(flat, 0, precision)) ** 2))


def hessian_rows(evaluator: Evaluator, pairs: list[tuple[Layer, str]]) -> list[dict]:
    """One row per (layer, precision): `hessian_trace` (per parameter) and `score` (HAWQ-V2 sensitivity)."""
    import torch

    module = evaluator.model.module
    if not isinstance(module, torch.nn.Module):
        msg = ("--method hessian needs a torch nn.Module (HAWQ-V2 Hutchinson trace): pass it to the API as "
               "analyse_sensitivity(module, example_inputs, data); use measured or sqnr for ONNX or .pt2 input")
        raise AutoqError(msg)
    split = evaluator.splits.search
    count = min(MAX_BATCH, len(split))
    feeds = [torch.from_numpy(split.arrays[spec.name][:count]) for spec in evaluator.model.inputs]
    module = module.eval()
    with torch.no_grad():
        reference = module(*feeds)
    layers = sorted({layer.name for layer, _ in pairs})
    weights: dict[str, torch.Tensor] = {name: _weight(module.get_submodule(name.split("#")[0])) for name in layers}
    params = list(dict.fromkeys(weights.values()))  # a module called twice has one weight
    loss = ((module(*feeds) - reference) ** 2).sum(dim=-1).mean()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    generator = torch.Generator().manual_seed(0)
    traces = {id(p): 0.0 for p in params}
    for _ in range(SAMPLES):  # each layer's own block H_ii: a joint v would add cross terms of either sign
        for p, grad in zip(params, grads, strict=True):
            v = torch.randint(0, 2, p.shape, generator=generator).float() * 2 - 1
            (hv,) = torch.autograd.grad(grad, p, grad_outputs=v, retain_graph=True)
            traces[id(p)] += float((v * hv).sum()) / SAMPLES
    rows = []
    for layer, precision in pairs:
        weight = weights[layer.name]
        per_param = traces[id(weight)] / weight.numel()
        delta = _perturbation(weight.detach().float().numpy(), Precision.parse(precision))
        rows.append({"layer": layer.name, "op_type": layer.op_type, "params": layer.params, "macs": layer.macs,
                     "precision": precision, "hessian_trace": per_param, "score": per_param * delta})
    return rows


def _weight(module: object) -> torch.Tensor:
    import torch

    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        msg = f"module {type(module).__name__} has no weight tensor for the Hessian trace"
        raise AutoqError(msg)
    return weight
