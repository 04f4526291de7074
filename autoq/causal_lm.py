"""A Hugging Face causal language model to ONNX with a KV cache, by ONNX Runtime GenAI's model builder, and text to
the token windows a search scores it on.

Why the builder and not `torch.onnx.export`: it writes the graph ONNX Runtime runs generation with (fused
GroupQueryAttention with a KV cache, rotary embeddings, SimplifiedLayerNormalization; reading SmolLM2-135M's
GGUF, saving it as float and exporting it took 27 s here),
and names each Linear after its module (`/model/layers.0/attn/o_proj/MatMul`; q, k and v fused into `qkv_proj`).
The torch exporters need the cache classes of each transformers version traced by hand and give graphs ONNX
Runtime runs slower.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx

from autoq.decoder import PAST
from autoq.errors import AutoqError
from autoq.graph import InputSpec, input_specs

LABELS = "labels"  # the array of next tokens in a windows file
SOURCE = "autoq.hf_source"  # model metadata: the Hugging Face folder the builder exported it from


def export_causal_lm(hf_dir: Path, out_dir: Path, cache_dir: Path, precision: str = "fp32",
                     options: dict[str, str] | None = None) -> Path:
    """`hf_dir` (a `save_pretrained` folder) as an ONNX model for the CPU with a KV cache in `out_dir`, its weights in
    `precision` (fp32; int4 is the builder's own weight-only quantization, with its `--extra_options`). The model's
    metadata names `hf_dir` (SOURCE), so a run can build the builder's recipes from the same weights."""
    out_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(hf_dir), "-i", str(hf_dir),
               "-o", str(out_dir), "-p", precision, "-e", "cpu", "-c", str(cache_dir)]
    if options:
        command += ["--extra_options", *(f"{k}={v}" for k, v in options.items())]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    model = out_dir / "model.onnx"
    if done.returncode or not model.is_file():
        if "No module named onnxruntime_genai" in done.stderr:
            msg = "exporting a language model needs ONNX Runtime GenAI's builder: pip install 'autoq[llm]'"
            raise AutoqError(msg)
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        msg = f"the ONNX Runtime GenAI builder could not export {hf_dir}: {last}"
        raise AutoqError(msg)
    proto = onnx.load(str(model), load_external_data=False)  # the weights stay where the builder put them
    onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props},
                                        SOURCE: str(hf_dir.resolve())})
    onnx.save(proto, str(model))
    return model


def cache_shape(model_path: Path, inputs: list[InputSpec]) -> tuple[int, int]:
    """(key/value heads, head size) of a decoder's cache: from its `inputs`, or the builder's genai_config.json."""
    shape = next((s.shape for s in inputs if PAST.fullmatch(s.name)), None)
    if shape is None:
        msg = f"{model_path} takes no past_key_values.N.key/value inputs: it is not a decoder with a KV cache"
        raise AutoqError(msg)
    if len(shape) == 4 and shape[1] and shape[3]:
        return shape[1], shape[3]
    config = model_path.parent / "genai_config.json"
    if config.is_file():
        decoder = json.loads(config.read_text())["model"]["decoder"]
        return int(decoder["num_key_value_heads"]), int(decoder["head_size"])
    msg = f"{model_path}: the cache's head count and size are symbolic and no genai_config.json is beside it"
    raise AutoqError(msg)


def token_windows(tokens: np.ndarray, length: int, count: int, model_path: Path) -> dict[str, np.ndarray]:
    """`count` consecutive windows of `length` tokens from the 1-D `tokens`, as the decoder `model_path`'s inputs
    with an empty cache, and their next tokens as `labels`: what `autoq search` scores a language model on
    (metric ppl_ratio)."""
    inputs = input_specs(onnx.load(str(model_path), load_external_data=False))
    heads, size = cache_shape(model_path, inputs)
    if len(tokens) < count * length + 1:
        msg = f"{len(tokens)} tokens are too few for {count} windows of {length}: give more text"
        raise AutoqError(msg)
    rows = np.stack([tokens[i * length:(i + 1) * length + 1] for i in range(count)]).astype(np.int64)
    arrays = {LABELS: rows[:, 1:]}
    for spec in inputs:
        if spec.name == "input_ids":
            arrays[spec.name] = rows[:, :-1]
        elif spec.name == "attention_mask":
            arrays[spec.name] = np.ones((count, length), spec.dtype)
        elif spec.name == "position_ids":
            arrays[spec.name] = np.tile(np.arange(length, dtype=spec.dtype), (count, 1))
        elif PAST.fullmatch(spec.name):
            arrays[spec.name] = np.zeros((count, heads, 0, size), spec.dtype)
        else:
            msg = f"input '{spec.name}' {spec.shape} is not one a decoder with a KV cache takes"
            raise AutoqError(msg)
    return arrays
