"""PyTorch as an autoq backend: the user's module built per layer (torch.ao eager, PT2E compiled by inductor).

`backend.py` holds the backend, `apply` (an assignment onto a copy of a module) and `compile_assignment`.
"""

from autoq.backends.torch.backend import TorchBackend, apply, compile_assignment, cxx_compiler

__all__ = ["TorchBackend", "apply", "compile_assignment", "cxx_compiler"]
