"""Small real models for tests: a CNN trained in seconds on scikit-learn's digits, exported to ONNX."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def digits_data() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]  # (1797, 1, 8, 8)
    return images, digits.target.astype(np.int64)


def train_digits_cnn(out: Path, epochs: int = 12, seed: int = 0, opset: int = 17) -> Path:
    """Train a 4-layer CNN (2 Conv + 2 Gemm) on digits and export it to `out` with dynamic batch."""
    import torch

    model = train_digits_module(epochs, seed)
    x = torch.from_numpy(digits_data()[0][:1])
    torch.onnx.export(model, (x,), str(out), dynamo=False, input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset)
    return out


class DigitsClassifier(torch.nn.Module):
    """The trained digits CNN split into named parts, as user code would be: its layers' FQNs are
    features.0, features.3 (Conv) and head.6, head.8 (Linear; Sequential slices keep their indices)."""

    def __init__(self, sequential: torch.nn.Sequential) -> None:
        super().__init__()
        self.features, self.head = sequential[:6], sequential[6:]

    def forward(self, image):
        return self.head(self.features(image))


def train_digits_module(epochs: int = 12, seed: int = 0):
    """The digits CNN as a trained torch nn.Sequential (about 97% accuracy on held-out digits)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    images, labels = digits_data()
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )
    x, y = torch.from_numpy(images[:1400]), torch.from_numpy(labels[:1400])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for start in range(0, len(x), 64):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x[start:start + 64]), y[start:start + 64])
            loss.backward()
            optimizer.step()
    return model.eval()


def crash_unless_fp32(ref: list[np.ndarray], out: list[np.ndarray], labels: np.ndarray | None = None) -> float:
    """A metric that crashes its process (SIGSEGV) on any candidate that is not the FP32 model."""
    import os
    import signal

    if not np.allclose(ref[0], out[0], atol=1e-6):
        os.kill(os.getpid(), signal.SIGSEGV)
    return 1.0


def hang_unless_fp32(ref: list[np.ndarray], out: list[np.ndarray], labels: np.ndarray | None = None) -> float:
    """A metric that never returns on any candidate that is not the FP32 model."""
    import time

    while not np.allclose(ref[0], out[0], atol=1e-6):
        time.sleep(1)
    return 1.0


def embedding_mlp(workdir: Path, seed: int = 0) -> tuple[Path, Path]:
    """A token embedding (Gather from a 512 x 256 table) then three MatMuls (256 -> 256 -> 96 -> 16, the last with
    96 inputs, which groups of 64 or 128 do not tile), mean over tokens; with random token ids. Returns the model
    and an .npz of 64 samples."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    arrays = {"table": rng.normal(0, 1, (512, 256)), "w1": rng.normal(0, 0.06, (256, 256)),
              "w2": rng.normal(0, 0.06, (256, 96)), "w3": rng.normal(0, 0.1, (96, 16))}
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "w1"], ["h1"], name="fc1"), helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="fc2"), helper.make_node("Relu", ["h2"], ["r2"]),
             helper.make_node("MatMul", ["r2", "w3"], ["h3"], name="fc3"),
             helper.make_node("ReduceMean", ["h3"], ["y"], axes=[1], keepdims=0)]
    proto = helper.make_model(helper.make_graph(
        nodes, "embedding_mlp", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16])],
        [numpy_helper.from_array(a.astype(np.float32), k) for k, a in arrays.items()]),
        opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(proto, workdir / "embedding_mlp.onnx")
    np.savez(workdir / "ids.npz", ids=rng.integers(0, 512, (64, 8)).astype(np.int64))
    return workdir / "embedding_mlp.onnx", workdir / "ids.npz"


def conv_only(workdir: Path, seed: int = 0) -> tuple[Path, Path]:
    """Two Convs with random weights and a global average pool: no MatMul or Gemm anywhere. Returns the model and
    an .npz of 64 random 1x8x8 images."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    arrays = {"w1": rng.normal(0, 0.3, (8, 1, 3, 3)), "w2": rng.normal(0, 0.2, (4, 8, 3, 3))}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c2"], ["p"]), helper.make_node("Flatten", ["p"], ["y"])]
    proto = helper.make_model(helper.make_graph(
        nodes, "conv_only", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(a.astype(np.float32), k) for k, a in arrays.items()]),
        opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(proto, workdir / "conv_only.onnx")
    np.savez(workdir / "images.npz", x=rng.normal(0, 1, (64, 1, 8, 8)).astype(np.float32))
    return workdir / "conv_only.onnx", workdir / "images.npz"


def two_layer_mlp(path: Path, w1: np.ndarray, w2: np.ndarray) -> Path:
    """x -> MatMul(w1) 'fc1' -> Relu -> MatMul(w2) 'fc2', symbolic batch, saved at `path`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    proto = helper.make_model(helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", w1.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", w2.shape[1]])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")]),
        opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(proto, str(path))
    return path


def tiny_decoder(folder: Path, exporter: str = "genai") -> tuple[Path, Path]:
    """A randomly initialised two-layer Llama (tied embeddings, grouped-query attention, a byte-level BPE tokenizer
    trained on docstrings) saved as a Hugging Face folder, and its ONNX export with a KV cache by `exporter`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from autoq.causal_lm import export_causal_lm
    from autoq.demo import sentences

    torch.manual_seed(0)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(sentences(200), trainers.BpeTrainer(vocab_size=512, special_tokens=["<s>", "</s>"]))
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=1)
    hf_dir = folder / "hf"
    LlamaForCausalLM(config).eval().save_pretrained(str(hf_dir))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>").save_pretrained(str(hf_dir))
    return hf_dir, export_causal_lm(hf_dir, folder / "onnx", folder / "cache", exporter=exporter)
