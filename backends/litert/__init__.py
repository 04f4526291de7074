"""LiteRT (TensorFlow Lite) as an autoq backend: the user's torch module converted by litert-torch, built per layer by
AI Edge Quantizer's per-op recipes, run by the LiteRT interpreter with XNNPACK.

`model.py` converts the module and reads what each layer's op runs in; `backend.py` holds the backend.
"""

from autoq.backends.litert.backend import LiteRtBackend

__all__ = ["LiteRtBackend"]
