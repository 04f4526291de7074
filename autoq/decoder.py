"""Decoder language models with a KV cache, as ONNX Runtime GenAI's model builder and Optimum export them (inputs
`input_ids`, `attention_mask`, `past_key_values.N.key|value`; outputs `logits`, `present.N.key|value`).

What such a model is deployed for is generation, one token at a time: its latency is one decode step after a
prompt (memory-bound: every weight is read once per token), not the prompt's prefill (compute-bound). The step
is built from a real prefill of the first sample by the FP32 model, so the cache holds real keys and values.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

from autoq.graph import InputSpec, Layer

PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)")
BLOCK = re.compile(r"layers\.(\d+)[./]")
Feeds = dict[str, np.ndarray]


def is_decoder(inputs: list[InputSpec]) -> bool:
    """Whether the model takes token ids and a KV cache."""
    names = {spec.name for spec in inputs}
    return "input_ids" in names and any(PAST.fullmatch(name) for name in names)


def lm_head(layers: list[Layer]) -> str | None:
    """The LM head: the model's last MatMul layer (what NNCF calls its last layer)."""
    return next((layer.name for layer in reversed(layers) if layer.op_type == "MatMul"), None)


def block_of(name: str) -> int | None:
    """The decoder block a layer is in, from its name (`/model/layers.12/mlp/down_proj/MatMul` -> 12)."""
    found = BLOCK.search(name)
    return int(found.group(1)) if found else None


def decode_step(run: Callable[[Feeds], list[np.ndarray]], prompt: Feeds, outputs: list[str]) -> Feeds:
    """The feeds of the step that generates the token after `prompt` (one sample, empty cache): the cache of
    `run`'s prefill, the greedy next token, the mask (and positions) one longer."""
    values = dict(zip(outputs, run(prompt), strict=True))
    length = prompt["input_ids"].shape[1] + next(
        (v.shape[2] for k, v in prompt.items() if PAST.fullmatch(k)), 0)
    step: Feeds = {}
    for name in prompt:
        found = PAST.fullmatch(name)
        if found:
            step[name] = values[f"present.{found.group(1)}.{found.group(2)}"]
    step["input_ids"] = values["logits"][:, -1:].argmax(-1).astype(prompt["input_ids"].dtype)
    if "attention_mask" in prompt:
        step["attention_mask"] = np.ones((1, length + 1), prompt["attention_mask"].dtype)
    if "position_ids" in prompt:
        step["position_ids"] = np.full((1, 1), length, prompt["position_ids"].dtype)
    return step


def timing_feeds(run: Callable[[Feeds], list[np.ndarray]], sample: Feeds, inputs: list[InputSpec],
                 outputs: list[str]) -> Feeds:
    """What a model's latency is timed on: a decoder's decode step after `sample`, else `sample` itself."""
    return decode_step(run, sample, outputs) if is_decoder(inputs) else sample


def describe_timing(inputs: list[InputSpec], sample: Feeds) -> str:
    """What `timing_feeds` times, in words for the report."""
    if is_decoder(inputs):
        return (f"one decode step after a {sample['input_ids'].shape[1]}-token prompt, with its KV cache "
                "(tokens/s = 1000 / ms)")
    return f"one forward pass of the first search sample (batch {len(next(iter(sample.values())))})"
