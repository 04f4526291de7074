"""Precision (one per-layer choice, a frozen spec with a short string form) and Assignment (layer -> precision,
plus model-wide options).

The string form: the base first, then options joined by `-` in any order (the canonical form orders them and
drops defaults):

    fp32 | bf16 | fp16                                  float, the whole layer in that format
    int8[-sym][-entropy|-mse|-pct<P>][-adaround]        static: calibrated activations (asymmetric unless `sym`,
                                                        min-max ranges unless named), per-channel int8 weights
                                                        rounded to nearest, or learned (`adaround`)
    int8-dyn[-pc][-sq<A>]                               int8 weights (per tensor, `pc` per channel), activations
                                                        quantized at run time; `sq<A>`: the input smoothed first
                                                        (SmoothQuant with alpha A, per-channel weights only)
    int4-dyn-pc                                         int4 weights per channel, activations quantized to int8
                                                        at run time (XNNPACK's qd8-f32-qc4w)
    w<2|3|4|8>[g<N>][-asym][-hqq|-gptq|-awq|-se][-acc<L>]
                                                        weight-only integers: symmetric unless `asym`, per channel
                                                        unless in groups of N, rounded to nearest unless named;
                                                        `acc<L>` is ONNX Runtime MatMulNBits' accuracy_level (4: int8
                                                        compute)
    nf4[g<N>] | cb4[g<N>] | km4[g<N>] | fp8[g<N>] | fp4[g<N>]
                                                        weight-only, non-uniform: NormalFloat4, a 4-bit codebook
                                                        (NNCF's CB4, or `km4`: 16 values fitted to the layer's own
                                                        weights by k-means), float8 E4M3, float4 E2M1, one scale per
                                                        channel or group (fp8/fp4 are stored weights; fp16/bf16 are
                                                        compute)

Everything else (bits, colours, size estimates, the rounding the sensitivity simulates) is derived from the spec.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from autoq.errors import AutoqError

FLOATS = {"fp32": 32, "bf16": 16, "fp16": 16}
CALIBRATIONS = ("minmax", "entropy", "mse", "percentile")
ROUNDINGS = ("rtn", "hqq", "gptq", "awq", "se", "kquant", "adaround")  # se: NNCF's scale estimation; kquant:
# llama.cpp's k-quants; adaround: learned per weight against the layer's FP32 outputs (autoq.recovery.rounding)
STATIC_ROUNDINGS = ("rtn", "adaround")
ZERO_POINTED = ("hqq", "kquant")  # roundings that fit a zero point per group: asymmetric by themselves
# a weight-only spec's stored element: its string prefix and the bits it comes in
ELEMENTS = {"int": ("w", (2, 3, 4, 8)), "nf": ("nf", (4,)), "cb": ("cb", (4,)), "km": ("km", (4,)),
            "fp": ("fp", (4, 8))}


class Kind(str, Enum):
    """What a spec quantizes (equal to its string, so YAML, CSV and JSON keep the plain words)."""

    FLOAT = "float"  # the whole layer in a float format
    STATIC = "static"  # calibrated int8 activations, int8 weights
    DYNAMIC = "dynamic"  # int8 weights, activations quantized at run time
    WEIGHT_ONLY = "weight-only"  # quantized weights, float compute

    def __str__(self) -> str:
        return self.value


KINDS = tuple(Kind)
FORMS = (f"{'|'.join(FLOATS)}, int8[-sym][-{'|-'.join(c for c in CALIBRATIONS[1:] if c != 'percentile')}|-pct<P>]"
         "[-adaround], "
         f"int8-dyn[-pc][-sq<alpha>], int4-dyn-pc, w<2|3|4|8>[g<N>][-asym][-{'|-'.join(ROUNDINGS[1:])}][-acc<0-4>], "
         "nf4|cb4|km4|fp8|fp4[g<N>]")
# hue, saturation, value of each kind's base colour (float by width: blue / purple / teal), with the spec named
# by each; a (kind, bits) not listed takes its kind's nearest width, shifted in hue by the bits
HUES = {(Kind.FLOAT, 32): ((0.60, 0.55, 0.70), "fp32"), (Kind.FLOAT, 16): ((0.72, 0.40, 0.70), "bf16"),
        (Kind.STATIC, 8): ((0.06, 0.63, 0.87), "int8"), (Kind.DYNAMIC, 8): ((0.99, 0.60, 0.77), "int8-dyn"),
        (Kind.WEIGHT_ONLY, 8): ((0.37, 0.50, 0.66), "w8"), (Kind.WEIGHT_ONLY, 4): ((0.88, 0.36, 0.85), "w4g128")}


@dataclass(frozen=True)
class Precision:
    """One per-layer choice: what is quantized, to how many bits, how, and the runtime knobs it implies."""

    kind: Kind
    bits: int  # the weights' bits (a float format's width)
    fmt: str = ""  # float only: fp32 | bf16 | fp16
    symmetric: bool = False  # static: the activations' ranges; weight-only: the weights'
    granularity: str = "channel"  # of the weight scales: channel | tensor | group
    group: int = 0  # weights per scale when granularity is group
    calibration: str = "minmax"  # static only: how activation ranges are set
    percentile: float = 0.0  # with calibration percentile
    rounding: str = "rtn"  # weight-only: rtn | hqq | gptq | awq | se | kquant
    accuracy_level: int = 0  # weight-only: ONNX Runtime MatMulNBits accuracy_level (0: the runtime's default)
    smooth: float = 0.0  # int8-dyn-pc: SmoothQuant's alpha for the layer's input (0: not smoothed)
    element: str = "int"  # weight-only: the stored element (`ELEMENTS`): int | nf | cb | km | fp

    def __post_init__(self) -> None:
        problem = self._problem()
        if problem:
            raise AutoqError(problem)

    def _problem(self) -> str | None:
        if self.kind not in KINDS:
            return f"unknown kind (kinds: {', '.join(map(str, KINDS))})"
        if self.kind == Kind.FLOAT:
            return None if FLOATS.get(self.fmt) == self.bits else f"float formats: {', '.join(FLOATS)}"
        if self.fmt:
            return "only a float precision has a float format"
        if self.kind == Kind.STATIC and self.bits != 8:
            return "static weights and activations are 8 bits"
        if self.kind == Kind.DYNAMIC and self.bits not in (4, 8) or self.bits == 4 and self.granularity == "tensor":
            return "dynamic weights are int8 (per tensor or channel) or int4 per channel (int4-dyn-pc)"
        if self.element not in ELEMENTS or (self.element != "int" and self.kind != Kind.WEIGHT_ONLY):
            return f"stored elements are {', '.join(ELEMENTS)} (the non-integer ones weight-only)"
        if self.kind == Kind.WEIGHT_ONLY and self.bits not in ELEMENTS[self.element][1]:
            bits = ELEMENTS[self.element][1]
            return f"{self.element} weights have {' or '.join(map(str, bits))} bits"
        if self.element != "int" and (not self.symmetric or self.rounding != "rtn" or self.accuracy_level):
            return f"{self.weight_label} weights take a scale per group, rounded to nearest (no asym, rounding, acc)"
        if (self.granularity == "group") != (self.group > 0) or self.granularity not in ("channel", "tensor", "group"):
            return "granularity is channel, tensor, or group with a group size"
        if self.group and (self.kind != Kind.WEIGHT_ONLY or self.group < 16 or self.group & (self.group - 1)):
            return "groups are a power of two >= 16, for weight-only precisions only"
        if self.granularity == "tensor" and self.kind != Kind.DYNAMIC:
            return "per-tensor weights only for int8-dyn"
        if self.kind != Kind.STATIC and (self.calibration != "minmax" or self.percentile):
            return "calibration is for static int8 (weight-only and dynamic have no activation ranges)"
        if self.calibration not in CALIBRATIONS or (self.calibration == "percentile") != (0 < self.percentile < 100):
            return f"calibration is one of {', '.join(CALIBRATIONS)} (percentile with a value in (0, 100))"
        if self.kind == Kind.STATIC and self.rounding not in STATIC_ROUNDINGS:
            return f"static int8 weights are rounded by one of {', '.join(STATIC_ROUNDINGS)}"
        learned_static = self.kind == Kind.STATIC or self.rounding == "rtn"
        if self.kind != Kind.WEIGHT_ONLY and (not learned_static or self.accuracy_level):
            return "rounding and accuracy level are for weight-only and static int8 precisions"
        if self.rounding not in ROUNDINGS or self.accuracy_level not in range(5):
            return f"rounding is one of {', '.join(ROUNDINGS)}; accuracy level 0-4"
        if self.rounding in ZERO_POINTED and self.symmetric:
            return f"{self.rounding} fits a zero point per group (it is asymmetric)"
        if self.kind == Kind.DYNAMIC and self.symmetric:
            return "int8-dyn activations are asymmetric"
        if self.smooth and (self.kind != Kind.DYNAMIC or self.granularity != "channel" or self.bits != 8
                            or not 0 < self.smooth < 1):
            return "smoothing (sq<alpha>, alpha in (0, 1)) is for int8-dyn-pc (per-tensor weights lose by it)"
        return None

    @classmethod
    def parse(cls, text: str) -> Precision:
        """The spec a string names, e.g. `int8-sym-pct99.99`, `w4g32-hqq-acc4`; one-line error if malformed."""
        tokens = str(text).strip().lower().split("-")
        head, rest = tokens[0], tokens[1:]
        try:
            if head in FLOATS:
                if rest:
                    raise ValueError(f"a float format takes no options ('{rest[0]}')")
                return cls(Kind.FLOAT, FLOATS[head], head)
            fields: dict[str, Any]
            if head in ("int8", "int4") and "dyn" in rest:
                rest.remove("dyn")
                fields = {"kind": Kind.DYNAMIC, "bits": int(head[3]), "granularity": "tensor"}
            elif head == "int8":
                fields = {"kind": Kind.STATIC, "bits": 8}
            elif (found := re.fullmatch(r"(w|nf|cb|km|fp)(\d+)(?:g(\d+))?", head)) is not None:
                group = int(found.group(3) or 0)
                element = next(e for e, (prefix, _) in ELEMENTS.items() if prefix == found.group(1))
                fields = {"kind": Kind.WEIGHT_ONLY, "bits": int(found.group(2)), "symmetric": True,
                          "granularity": "group" if group else "channel", "group": group, "element": element}
            else:
                raise ValueError(f"unknown form '{head}'")
            for token in rest:
                fields.update(_option(token, fields["kind"]))
            if fields.get("rounding") in ZERO_POINTED and "sym" not in rest:
                fields["symmetric"] = False  # its zero points: asymmetric without saying so
            return cls(**fields)
        except (ValueError, TypeError, AutoqError) as exc:
            msg = f"precision '{text}': {exc} (forms: {FORMS})"
            raise AutoqError(msg) from None

    def __str__(self) -> str:
        if self.kind == Kind.FLOAT:
            return self.fmt
        if self.kind == Kind.DYNAMIC:
            return f"int{self.bits}-dyn" + ("-pc" if self.granularity == "channel" else "") + (
                f"-sq{self.smooth:g}" if self.smooth else "")
        if self.kind == Kind.STATIC:
            tokens = ["int8", "sym" if self.symmetric else ""]
            tokens.append({"minmax": "", "percentile": f"pct{self.percentile:g}"}.get(self.calibration,
                                                                                     self.calibration))
            tokens.append("" if self.rounding == "rtn" else self.rounding)
        else:
            asym = not self.symmetric and self.rounding not in ZERO_POINTED  # asymmetric by itself
            tokens = [self.weight_label + (f"g{self.group}" if self.group else ""), "asym" if asym else "",
                      "" if self.rounding == "rtn" else self.rounding,
                      f"acc{self.accuracy_level}" if self.accuracy_level else ""]
        return "-".join(t for t in tokens if t)

    @property
    def name(self) -> str:
        return str(self)

    @property
    def weight_label(self) -> str:
        """The stored weight's type as executed checks name it: `w4`, `w2`, `nf4`, `cb4`, `km4`, `fp8`, `fp4`."""
        return f"{ELEMENTS[self.element][0]}{self.bits}"

    def weight_format(self) -> Precision | None:
        """The weights as stored, without runtime knobs (`w4g32-acc4` -> `w4g32`: an embedding table has no matrix
        product to set an accuracy level on); None for a spec whose weights are not stored quantized on their own."""
        return replace(self, accuracy_level=0) if self.kind == Kind.WEIGHT_ONLY else None

    @property
    def calibration_key(self) -> str:
        """The calibration a static precision reads its activation ranges from (`minmax`, `pct99.99`, ...)."""
        return f"pct{self.percentile:g}" if self.calibration == "percentile" else self.calibration

    def bytes_per_weight(self) -> float:
        """Stored bytes per weight, with one float32 scale (and a zero point when asymmetric) per group."""
        if self.kind == Kind.FLOAT:
            return self.bits / 8
        overhead = (4 + (0 if self.symmetric else self.bits / 8)) / self.group if self.group else 0.0
        return self.bits / 8 + overhead

    @property
    def colour(self) -> str:
        """A colour per spec: the kind's hue, lighter or darker by a stable hash of the variant."""
        widths = [bits for kind, bits in HUES if kind == self.kind]
        width = min(widths, key=lambda bits: (abs(bits - self.bits), bits))
        (hue, saturation, value), base = HUES[(self.kind, width)]
        hue = (hue + 0.04 * (width - self.bits)) % 1.0  # a width not in HUES: its own shade of the kind
        if str(self) != base:
            shift = int(hashlib.sha1(str(self).encode()).hexdigest()[:4], 16) / 0xFFFF
            value = min(1.0, value * (0.65 + 0.5 * shift))
            hue = (hue + 0.06 * (shift - 0.5)) % 1.0
        red, green, blue = colorsys.hsv_to_rgb(hue, saturation, value)
        return f"#{round(red * 255):02x}{round(green * 255):02x}{round(blue * 255):02x}"


def _option(token: str, kind: str) -> dict:
    """The spec fields one option token sets."""
    if token == "sym":
        return {"symmetric": True}
    if token == "asym":
        return {"symmetric": False}
    if token == "pc":
        return {"granularity": "channel"}
    if token in CALIBRATIONS and token != "percentile":  # a percentile is named by its value: pct99.99
        return {"calibration": token}
    if (found := re.fullmatch(r"pct(\d+(?:\.\d+)?)", token)) is not None:
        return {"calibration": "percentile", "percentile": float(found.group(1))}
    if token in ROUNDINGS:
        return {"rounding": token}
    if (found := re.fullmatch(r"acc(\d)", token)) is not None:
        return {"accuracy_level": int(found.group(1))}
    if (found := re.fullmatch(r"sq(\d*\.?\d+)", token)) is not None:
        return {"smooth": float(found.group(1))}
    raise ValueError(f"unknown option '{token}' for a {kind} precision")


def calibrations(choices: dict[str, list[str]]) -> tuple[str, ...]:
    """The calibrations other than min-max that the static precisions among `choices` read."""
    keys = {Precision.parse(p).calibration_key for allowed in choices.values() for p in allowed}
    return tuple(sorted(keys - {"minmax"}))


def canonical(text: str) -> str:
    """The canonical string of a precision (validated): `int8-minmax` -> `int8`."""
    return str(Precision.parse(text))


@dataclass(frozen=True)
class Assignment:
    """The output of a trial: a precision for every layer (canonical strings) plus model-wide options."""

    layers: dict[str, str]
    options: dict[str, object] = field(default_factory=dict)
    VERSION = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", {name: canonical(p) for name, p in self.layers.items()})

    @classmethod
    def uniform(cls, layer_names: list[str], precision: str, options: dict | None = None) -> Assignment:
        return cls({name: precision for name in layer_names}, dict(options or {}))

    def specs(self) -> dict[str, Precision]:
        return {name: Precision.parse(p) for name, p in self.layers.items()}

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
