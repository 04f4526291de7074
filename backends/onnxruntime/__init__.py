"""ONNX Runtime's CPU provider as an autoq backend.

`backend.py` builds a candidate per assignment and reads back what each layer ran in; `quantize.py` applies ORT's
quantizers per spec (static regions, dynamic, MatMulNBits / GatherBlockQuantized); `graph.py` guards float layers,
finds integer chains and attributes profiles; `bias.py` corrects int8 biases; `smooth.py` is SmoothQuant per layer;
`tied.py` stores a tied embedding once; `recipes.py` lists ORT's and the GenAI builder's one-line recipes.
"""

from autoq.backends.onnxruntime.backend import OnnxRuntimeBackend

__all__ = ["OnnxRuntimeBackend"]
