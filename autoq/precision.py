"""Precision (one per-layer choice) and Assignment (layer -> precision, plus model-wide options)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from autoq.errors import AutoqError

# name -> (kind, bits): kind says what is quantized.
KNOWN = {
    "fp32": ("float", 32),
    "bf16": ("float", 16),
    "fp16": ("float", 16),
    "int8": ("static", 8),  # calibrated activations + per-channel int8 weights
    "int8-dyn": ("dynamic", 8),  # int8 weights, activations quantized at run time
    "w8": ("weight-only", 8),
    "w4g32": ("weight-only", 4),
    "w4g128": ("weight-only", 4),
}


@dataclass(frozen=True)
class Precision:
    """One per-layer choice, written by its short name (`int8`, `w4g128`, ...)."""

    name: str

    def __post_init__(self) -> None:
        if self.name not in KNOWN:
            msg = f"unknown precision '{self.name}' (known: {', '.join(KNOWN)})"
            raise AutoqError(msg)

    @property
    def kind(self) -> str:
        return KNOWN[self.name][0]

    @property
    def bits(self) -> int:
        return KNOWN[self.name][1]

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Assignment:
    """The output of a trial: a precision for every layer plus model-wide options."""

    layers: dict[str, str]
    options: dict[str, object] = field(default_factory=dict)
    VERSION = 1

    def __post_init__(self) -> None:
        for precision in self.layers.values():
            Precision(precision)

    @classmethod
    def uniform(cls, layer_names: list[str], precision: str, options: dict | None = None) -> Assignment:
        return cls({name: precision for name in layer_names}, dict(options or {}))

    def counts(self) -> dict[str, int]:
        return dict(Counter(self.layers.values()))

    def summary(self) -> str:
        """e.g. `int8 x30, fp32 x6`."""
        return ", ".join(f"{p} x{n}" for p, n in sorted(self.counts().items()))

    def key(self) -> str:
        """Stable hash: equal assignments (in any order) share a key."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {"version": self.VERSION, "layers": dict(self.layers), "options": dict(self.options)}

    @classmethod
    def from_dict(cls, data: dict) -> Assignment:
        if not isinstance(data, dict) or not isinstance(data.get("layers"), dict):
            msg = "an assignment needs a 'layers' mapping of layer name -> precision"
            raise AutoqError(msg)
        if data.get("version", cls.VERSION) != cls.VERSION:
            msg = f"assignment version {data.get('version')} is not supported (expected {cls.VERSION})"
            raise AutoqError(msg)
        return cls({str(k): str(v) for k, v in data["layers"].items()}, dict(data.get("options") or {}))

    def save(self, path: Path) -> Path:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path

    @classmethod
    def load(cls, path: Path) -> Assignment:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            msg = f"cannot read assignment {path}: {exc}"
            raise AutoqError(msg) from exc
        return cls.from_dict(data)
