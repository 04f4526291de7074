"""A Hugging Face causal language model to ONNX with a KV cache, and text to the token windows a search scores it on.

Two exporters (`EXPORTERS`), one graph each runtime runs generation with:
- `genai`, ONNX Runtime GenAI's model builder, for ONNX Runtime: fused GroupQueryAttention with a KV cache, rotary
  embeddings, SimplifiedLayerNormalization (reading SmolLM2-135M's GGUF, saving it as float and exporting it took
  27 s here); each Linear named after its module (`/model/layers.0/attn/o_proj/MatMul`; q, k and v fused into
  `qkv_proj`).
- `torch`, `torch.onnx.export` (TorchScript) of the model behind a wrapper that takes the cache as tensors, for
  OpenVINO: standard ONNX ops only. OpenVINO reads the builder's GroupQueryAttention as an internal op it cannot
  save as IR, and NNCF refuses that graph's dynamic-typed constants. Layers are named after their modules
  (`/model/layers.0/self_attn/q_proj/MatMul`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from autoq.decoder import PAST
from autoq.errors import AutoqError
from autoq.graph import InputSpec, input_specs, save_onnx
from autoq.progress import PhaseProgress
from autoq.quiet import captured

if TYPE_CHECKING:
    from autoq.backends.base import Backend

LABELS = "labels"  # the array of next tokens in a windows file
SOURCE = "autoq.hf_source"  # model metadata: the Hugging Face folder the builder exported it from


def export_causal_lm(hf_dir: Path, out_dir: Path, cache_dir: Path, precision: str = "fp32",
                     options: dict[str, str] | None = None, exporter: str = "genai") -> Path:
    """`hf_dir` (a `save_pretrained` folder) as `out_dir`/model.onnx with a KV cache, by `exporter` (see the module
    docstring), its weights in `precision` (fp32; the builder also has int8/int4 weight-only quantization, with its
    `--extra_options`). The model's metadata names `hf_dir` (SOURCE), so a run can build the builder's recipes from
    the same weights."""
    if exporter not in EXPORTERS:
        msg = f"unknown exporter '{exporter}' (exporters: {', '.join(EXPORTERS)})"
        raise AutoqError(msg)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = EXPORTERS[exporter](hf_dir, out_dir, cache_dir, precision, options or {})
    proto = onnx.load(str(model), load_external_data=False)  # the weights stay where the exporter put them
    onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props},
                                        SOURCE: str(hf_dir.resolve())})
    onnx.save(proto, str(model))
    return model


def _builder_export(hf_dir: Path, out_dir: Path, cache_dir: Path, precision: str, options: dict[str, str]) -> Path:
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
    return model


def _torch_export(hf_dir: Path, out_dir: Path, cache_dir: Path, precision: str, options: dict[str, str]) -> Path:
    """The model in float32 with eager attention, traced for a 3-token step after a 2-token cache; the batch, the
    step and the cache lengths dynamic."""
    if precision != "fp32" or options:
        msg = "the torch exporter writes fp32 only (quantization is autoq's job)"
        raise AutoqError(msg)
    try:
        with captured():  # torch's and torchao's import-time warnings
            import torch
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32,
                                                         attn_implementation="eager").eval()
    except ImportError as exc:
        msg = "exporting a language model with torch needs torch and transformers: pip install 'autoq[llm,torch]'"
        raise AutoqError(msg) from exc
    config = model.config
    layers, heads = config.num_hidden_layers, config.num_key_value_heads
    size = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    past = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    present = [name.replace("past_key_values", "present") for name in past]
    inputs = ["input_ids", "attention_mask", "position_ids", *past]
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total"},
            "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"},
            **{name: {0: "batch", 2: "past"} for name in past}, **{name: {0: "batch", 2: "total"} for name in present}}
    example = (torch.zeros((1, 3), dtype=torch.int64), torch.ones((1, 5), dtype=torch.int64),
               torch.arange(2, 5)[None], *(torch.zeros((1, heads, 2, size)) for _ in past))
    path = out_dir / "model.onnx"
    with captured(), torch.no_grad():
        torch.onnx.export(_cache_as_tensors(model), example, str(path), input_names=inputs,
                          output_names=["logits", *present], dynamic_axes=axes, opset_version=17, dynamo=False)
    proto = onnx.load(str(path))
    for node in proto.graph.node:  # the wrapper's attribute is not a module of the model
        node.name = node.name.removeprefix("/wrapped")
    save_onnx(proto, path)
    return path


def _cache_as_tensors(model):
    """`model` taking its cache as `past_key_values.N.key|value` tensors and returning `present.N.key|value`."""
    import torch
    from transformers import DynamicCache

    class CacheAsTensors(torch.nn.Module):
        def __init__(self, wrapped: torch.nn.Module) -> None:
            super().__init__()
            self.wrapped = wrapped

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache()
            for index in range(len(past) // 2):
                cache.update(past[2 * index], past[2 * index + 1], index)
            out = self.wrapped(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               past_key_values=cache, use_cache=True)
            return out.logits, *(t for layer in out.past_key_values.layers for t in (layer.keys, layer.values))

    return CacheAsTensors(model)


EXPORTERS = {"genai": _builder_export, "torch": _torch_export}


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


WINDOW, MAX_WINDOWS, MIN_WINDOWS = 64, 96, 16  # tokens per window; windows from a user's text (split 1/4, 1/2, 1/4)


def folder_files(hf_dir: Path, text: str | Path | None, data: object, backend: Backend,
                 folder: Path) -> tuple[Path, Path]:
    """`autoq search HF_FOLDER --text FILE`: the checks (a text file instead of data, a backend that runs language
    models), then `hf_folder_files`."""
    if text is None or data is not None:
        msg = (f"{hf_dir} is a folder: give a Hugging Face causal LM folder with --text FILE (plain text to score "
               "perplexity on), not --data")
        raise AutoqError(msg)
    if backend.llm_space is None:
        raise AutoqError(f"a causal LM folder runs on a backend with a language-model space, not {backend.name}")
    return hf_folder_files(hf_dir, Path(text), folder, backend.llm_exporter)


def hf_folder_files(hf_dir: Path, text: Path, folder: Path, exporter: str) -> tuple[Path, Path]:
    """(model.onnx, windows.npz) for a search of the Hugging Face causal LM in `hf_dir` on the plain text `text`:
    exported once into `folder` by `exporter` (the backend's `llm_exporter`: GenAI's builder for ONNX Runtime, torch's
    for OpenVINO), the text cut into up to 96 windows of 64 tokens by the model's own tokenizer. One-line errors for a
    folder that is not a causal LM and for too little text."""
    hf_dir, text = Path(hf_dir), Path(text)
    if not (hf_dir / "config.json").is_file():
        msg = f"{hf_dir} is not a Hugging Face model folder (no config.json): give the folder save_pretrained wrote"
        raise AutoqError(msg)
    try:
        content = text.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        msg = f"cannot read --text {text}: {exc}; give a plain UTF-8 text file"
        raise AutoqError(msg) from None
    if not content.strip():
        raise AutoqError(f"--text {text} is empty: give the text the model should keep its perplexity on")
    model = folder / f"onnx-{exporter}" / "model.onnx"
    if not model.is_file():
        staging = model.parent.with_suffix(".partial")
        shutil.rmtree(staging, ignore_errors=True)  # an interrupted export leaves nothing half-written behind
        try:
            with PhaseProgress(f"exporting {hf_dir.name} to {model.parent} (first use only)", 1) as bar, captured():
                export_causal_lm(hf_dir, staging, folder / "builder-cache", exporter=exporter)
                bar.advance(1)
        except (OSError, ValueError, KeyError, subprocess.CalledProcessError) as exc:
            msg = f"{hf_dir} could not be exported as a causal language model ({type(exc).__name__}: {exc})"
            raise AutoqError(msg.splitlines()[0]) from None
        shutil.rmtree(model.parent, ignore_errors=True)
        staging.replace(model.parent)
    digest = hashlib.sha1(content.encode()).hexdigest()[:12]
    windows = folder / f"windows-{digest}-{exporter}.npz"
    if not windows.is_file():
        from transformers import AutoTokenizer

        with captured():
            tokens = np.array(AutoTokenizer.from_pretrained(str(hf_dir))(content)["input_ids"], dtype=np.int64)
        count = min(MAX_WINDOWS, (len(tokens) - 1) // WINDOW)
        if count < MIN_WINDOWS:
            msg = (f"--text {text} has {len(tokens)} tokens: at least {MIN_WINDOWS * WINDOW + 1} are needed "
                   f"({MIN_WINDOWS} windows of {WINDOW}); give more text")
            raise AutoqError(msg)
        np.savez(windows, **token_windows(tokens, WINDOW, count, model))  # type: ignore[arg-type]
    return model, windows
