"""The Backend contract and the registry (name -> lazily imported class)."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from autoq.calibrate import Calibration
from autoq.errors import AutoqError
from autoq.graph import Layer, OnnxModel
from autoq.precision import Assignment, Kind, Precision
from autoq.regions import Regions

Feeds = dict[str, np.ndarray]
Outputs = list[np.ndarray]

BACKENDS = {
    "onnxruntime": "autoq.backends.onnxruntime:OnnxRuntimeBackend",
    "openvino": "autoq.backends.openvino:OpenVinoBackend",
    "torch": "autoq.backends.torch:TorchBackend",
    "litert": "autoq.backends.litert:LiteRtBackend",
}
LIBRARIES = {"onnxruntime": ("onnxruntime",), "openvino": ("openvino", "nncf"), "torch": ("torch",),
             "litert": ("ai-edge-litert", "ai-edge-quantizer", "litert-torch")}  # each
# backend's packages, named with their versions in a run's machine fingerprint (without importing them)


@dataclass
class Candidate:
    """An Assignment built by a backend into an artifact it can run."""

    assignment: Assignment
    path: Path  # the built model file
    size_bytes: int
    state: object = None  # the building backend's own record (read with `state_of`)


State = TypeVar("State")


def state_of(candidate: Candidate, kind: type[State]) -> State:
    """A backend's own record of `candidate`, of type `kind`; an empty one for a candidate made elsewhere (a
    recipe, a file named to `autoq verify`)."""
    if candidate.state is None:
        candidate.state = kind()
    if not isinstance(candidate.state, kind):
        msg = f"a candidate built by another backend ({type(candidate.state).__name__}, not {kind.__name__})"
        raise TypeError(msg)
    return candidate.state


@dataclass(frozen=True)
class Recipe:
    """A runtime's standard one-line quantization of the whole model, measured beside the front: `build(model,
    calibration, workdir)` makes it from the run's cached calibration data (raising with the reason if it cannot)."""

    label: str
    build: Callable[[OnnxModel, Calibration, Path], Candidate]
    # the recipe in autoq's specs, layer -> spec, where the backend's build of that assignment is the recipe's own
    # model (same rounding, kernels and stored weights): the search starts from it and from it rebalanced
    layers: Callable[[OnnxModel], dict[str, str]] | None = None


@dataclass(frozen=True)
class TensorRange:
    """The uint8 range a built model quantizes an activation tensor on (symmetric: about 0, as the quantizer makes
    it from the calibration's range)."""

    low: float
    high: float
    symmetric: bool


@dataclass(frozen=True)
class QuantizedForm:
    """What a built candidate computes with beyond its specs, for fine-tuning to simulate and train: the range of
    every activation tensor it quantizes (by the float graph's names), the biases it stores where its build changed
    them (bias correction), and the options that rebuild trained weights and biases as they were trained."""

    ranges: dict[str, TensorRange]
    biases: dict[str, np.ndarray]
    options: dict[str, object]


@dataclass
class GlueCheck:
    """What the runtime really made of the glue between layers."""

    conversions: list[str]  # float<->int8 conversions left inside the graph (tensor -> int8 | float)
    chains: list[list[str]]  # int8 layers grouped by the integer chain they run in


class Backend(ABC):
    """Builds assignments for real, runs them, and says which precision each layer really executed in.

    Backends never time themselves: `autoq.measure` times whatever `runner` returns.
    """

    name: str
    default_space: str  # the bundled search space used when none is given
    default_space_note: str | None = None  # why this machine gets a lesser default space, said to the user
    search_settings = "the runtime's defaults"  # how `runner` sessions are set up (for the report)
    deployed_settings = "the runtime's defaults"  # how `deployed_runner` sessions are set up
    option_values: dict[str, tuple] = {}  # the model-wide options it reads -> their allowed values
    option_kinds: dict[str, tuple[str, ...]] = {}  # option -> the precision kinds whose build it changes
    deployed_instances = 1  # separately compiled instances of each model `autoq verify` times, where they differ
    verify_refusal: str | None = None  # why `autoq verify` cannot re-time this backend's points, if it cannot
    takes_module = False  # builds from the user's nn.Module (the demo then hands it the module, not the ONNX file)
    llm_space: str | None = None  # the bundled space for a causal language model (None: it does not run one)
    llm_exporter = "genai"  # how a Hugging Face causal LM becomes its graph (`autoq.causal_lm.EXPORTERS`)

    learned_roundings: tuple[str, ...] = ("adaround",)  # fitted once per layer by `autoq.recovery.rounding`
    probed_kinds: tuple[Kind, ...] = ()  # kinds it may leave unrun on some layers: `autoq.probe` finds those once
    builds: dict[Kind, tuple[int, ...]] = {}  # allow-list: the kinds it builds -> their bits (a float's width)
    unbuilt: dict[Kind, str] = {}  # why a kind (or a width of it) is not in `builds`, where there is a reason
    elements: tuple[str, ...] = ("int",)  # allow-list: the weight-only elements it stores (`precision.ELEMENTS`)

    def unbuildable(self, precision: Precision) -> str | None:
        """Why this backend cannot build `precision` for any layer (one line), or None if it can: a kind or bit
        width not in `builds` (a new width is unbuildable until a backend lists it), then the backend's own limits
        on the variant (`refuses`)."""
        if precision.bits not in self.builds.get(precision.kind, ()):
            if precision.kind in self.unbuilt:
                return self.unbuilt[precision.kind]
            offered = "; ".join(f"{kind} {'/'.join(map(str, bits))}-bit" for kind, bits in self.builds.items())
            return f"the {self.name} backend does not build {precision.bits}-bit {precision.kind} (it builds {offered})"
        if precision.element not in self.elements:
            stored = ", ".join(self.elements)
            return f"the {self.name} backend does not store {precision.weight_label} weights (its elements: {stored})"
        return self.refuses(precision)

    def lacks(self, precision: Precision) -> str | None:
        """Why this machine cannot run `precision` as it is stored, though the backend builds it (a probe of the
        runtime here), or None: a space's precision lacked here is left out with a note, not an error."""
        return None

    def quantized_form(self, candidate: Candidate) -> QuantizedForm | None:
        """What the built `candidate` quantizes and stores, where the backend's static int8 reads its ranges from
        the Calibration (so fine-tuning can simulate them all and train them); None where its quantizer observes
        the samples itself."""
        return None

    @abstractmethod
    def refuses(self, precision: Precision) -> str | None:
        """Why this backend cannot build this variant of a kind and width it builds (one line), or None."""

    def options(self, requested: dict[str, list]) -> dict[str, list]:
        """The space's model-wide options this machine can really run (a backend drops what it can't); an option
        it does not read, or a value it does not know, is an error naming the allowed ones."""
        for key, values in requested.items():
            if key not in self.option_values:
                known = ", ".join(self.option_values) or "none"
                msg = f"option '{key}' means nothing to the {self.name} backend (its options: {known})"
                raise AutoqError(msg)
            unknown = [v for v in values if v not in self.option_values[key]]
            if unknown:
                allowed = ", ".join(str(v) for v in self.option_values[key])
                msg = f"option '{key}': unknown value {unknown[0]!r} for the {self.name} backend (allowed: {allowed})"
                raise AutoqError(msg)
        return requested

    def model_options(self, model: OnnxModel, options: dict[str, list]) -> dict[str, list]:
        """The options without the values that would build this model exactly as another value does."""
        return options

    def option_affects(self, option: str, precision: Precision) -> bool:
        """Whether the model-wide `option` changes how a layer in `precision` is built (by default: its kind)."""
        return precision.kind in self.option_kinds.get(option, ())

    def layer_precisions(self, layer: Layer, allowed: list[str]) -> list[str]:
        """The space's precisions for `layer` that this backend can build for that layer (op and shape limits);
        fp32 always stays."""
        return [p for p in allowed if p == "fp32" or self.fits(layer, Precision.parse(p))]

    def fits(self, layer: Layer, precision: Precision) -> bool:
        """Whether `precision` (buildable in general) can be built for `layer`."""
        return layer.op_type != "Gather" or precision.kind == Kind.FLOAT

    def expected(self, assignment: Assignment) -> dict[str, str]:
        """Layer -> the precision its kernel should run in (model-wide options may decide it)."""
        return dict(assignment.layers)

    @abstractmethod
    def build(self, model: OnnxModel, assignment: Assignment, calibration: Calibration, workdir: Path) -> Candidate:
        """Build `assignment` into `workdir` from cached calibration ranges (never re-calibrates)."""

    @abstractmethod
    def runner(self, candidate: Candidate, threads: int) -> Callable[[Feeds], Outputs]:
        """A callable running the candidate on one batch of feeds with a fixed thread count."""

    @abstractmethod
    def executed(self, candidate: Candidate) -> dict[str, str]:
        """Layer -> precision its kernel really ran in, read from the runtime's own graph."""

    def layer_latency(self, candidate: Candidate, feeds: Feeds, threads: int,
                      runs: int = 20) -> dict[str, float] | None:
        """Mean ms each layer's kernels (with their own quantize/dequantize nodes) took, from the runtime's
        profiler; None where the backend has no per-node profile."""
        return None

    def tied_tables(self, model: OnnxModel) -> dict[str, str]:
        """Embedding table layer -> the LM head layer it is tied to, where the backend stores a tied table once when
        both take the same spec (none by default)."""
        return {}

    def regions(self, model: OnnxModel, calibration: Calibration) -> Regions | None:
        """The glue each layer takes along when int8 (`autoq.regions`); None where the backend's own quantizer
        places quantizers (NNCF, PT2E)."""
        return None

    def glue_check(self, candidate: Candidate) -> GlueCheck | None:
        """The float<->int8 conversions and int8 chains in the runtime's graph; None where not inspectable."""
        return None

    @abstractmethod
    def export(self, candidate: Candidate, path: Path) -> Path:
        """Write the candidate as a model file a user can deploy; return its path."""

    def reference_model(self, run_dir: Path) -> Path:
        """The FP32 model file of a finished run that `autoq verify` times its points against."""
        return run_dir / "model.onnx"

    def deployed_runner(self, candidate: Candidate, threads: int) -> Callable[[Feeds], Outputs]:
        """The candidate run with the session settings a user deploys with (`autoq verify`); the search's own
        `runner` may differ where that makes alternating timing rounds honest."""
        return self.runner(candidate, threads)

    def recipes(self, model: OnnxModel) -> list[Recipe]:
        """The runtime's one-line recipes for `model`, to be measured beside the front (none by default)."""
        return []


def get_backend(name: str) -> Backend:
    """Instantiate a registered backend; an unknown name or a missing install is a clear error."""
    if name not in BACKENDS:
        msg = f"unknown backend '{name}' (available: {', '.join(BACKENDS)})"
        raise AutoqError(msg)
    module_name, _, class_name = BACKENDS[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] == "autoq":  # autoq's own bug, not a missing install
            raise
        msg = f"backend '{name}' needs a package that is not installed ({exc.name}): pip install 'autoq[{name}]'"
        raise AutoqError(msg) from exc
    return getattr(module, class_name)()
