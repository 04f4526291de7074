"""Backend adapters, installed as `autoq.backends`."""

from autoq.backends.base import BACKENDS, Backend, Candidate, get_backend

__all__ = ["BACKENDS", "Backend", "Candidate", "get_backend"]
