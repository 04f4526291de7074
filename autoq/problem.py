"""A run's problem, built in named steps and validated: where the model and data come from (a file, a torch module,
a demo, a Hugging Face folder), the search space on this backend and machine, the run directory, the model as ONNX,
the data and its splits, each layer's choices, the run's identity, then (holding the run's lock) the calibration
and the evaluator every later step measures with."""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from autoq import data as data_mod
from autoq.backends import get_backend
from autoq.backends.base import Backend
from autoq.calibrate import calibrate
from autoq.causal_lm import LABELS, folder_files
from autoq.errors import AutoqError
from autoq.evaluate import Evaluator
from autoq.graph import OnnxModel, first_run, prepare
from autoq.measure import fingerprint
from autoq.metrics import Metric, get_metric
from autoq.precision import calibrations
from autoq.probe import unexecuted
from autoq.progress import PhaseProgress
from autoq.settings import RunSettings
from autoq.space import SearchSpace, load_space
from autoq.study import run_lock
from autoq.torch_input import is_torch_model, to_onnx

REPORTS = Path("reports")
DataArg = str | Path | Mapping[str, np.ndarray] | None


@dataclass
class Problem:
    """Everything a run needs, validated: the model, data splits, metric, space and per-layer choices."""

    run_dir: Path
    model_name: str
    evaluator: Evaluator
    space: SearchSpace
    choices: dict[str, list[str]]
    metric: str
    machine: dict
    seed: int
    config: str  # hash of what the run is about: workers sharing a study must agree on it


@dataclass(frozen=True)
class Source:
    """Where the model and data come from, with what the source implies (a demo's metric, an LLM's space)."""

    model: object
    data: DataArg
    example_inputs: object = None
    metric: str | Metric | None = None
    labels: str | Path | np.ndarray | None = None
    space: str | Path | dict | SearchSpace | None = None
    stem: str | None = None  # names the default run directory
    label: str | None = None  # names the model in the report


def resolve_source(model: object, data: DataArg, example_inputs: object, settings: RunSettings,
                   backend: Backend) -> Source:
    """The model and data to search: as given, a demo's, or a Hugging Face folder's export and text windows."""
    if settings.text is not None and not (isinstance(model, str | Path) and Path(model).is_dir()):
        raise AutoqError("--text goes with a Hugging Face causal LM folder as the model (autoq search FOLDER --text "
                         "FILE)")
    given = Source(model, data, example_inputs, settings.metric, settings.labels, settings.space)
    if model is None and backend.takes_module and settings.demo == "minilm":  # the module, not its ONNX
        from autoq.demo import demo_module

        module, example, arrays = demo_module()
        return replace(given, model=module, example_inputs=example, data=arrays, metric=given.metric or "cosine")
    if model is None:
        from autoq.demo import DEMOS

        demo = DEMOS[settings.demo]  # a known name: RunSettings checks it
        if demo.language_model and backend.llm_space is None:
            raise AutoqError(f"the {demo.name} demo runs on a backend with a language-model space, not {backend.name}")
        path, windows = demo.files(backend)
        space = given.space if given.space is not None or not demo.language_model else backend.llm_space
        return replace(given, model=path, data=windows, metric=given.metric or demo.metric,
                       labels=given.labels if given.labels is not None else demo.labels, space=space,
                       stem=demo.stem, label=f"{demo.stem}: {demo.summary}")
    if isinstance(model, str | Path) and Path(model).is_dir():  # a Hugging Face causal LM and a text file
        stem = Path(model).name
        cache = run_directory(settings, stem, backend) / "cache" / "causal-lm"
        path, windows = folder_files(Path(model), settings.text, data, backend, cache)
        return replace(given, model=path, data=windows, metric=given.metric or "ppl_ratio",
                       labels=given.labels if given.labels is not None else LABELS,
                       space=given.space if given.space is not None else backend.llm_space,
                       stem=stem, label=f"{stem}: causal LM, perplexity on {settings.text}")
    return given


def search_space(source: Source, settings: RunSettings, backend: Backend, searching: bool) -> SearchSpace:
    """The space named (or the backend's default, saying why where this machine gets a lesser one), with the
    sampler asked for and the options this machine runs."""
    space = load_space(source.space if source.space is not None else backend.default_space)
    if source.space is None and backend.default_space_note and searching:
        print(f"autoq: {backend.default_space_note}", file=sys.stderr)
    if settings.sampler is not None:
        space = space.with_sampler(settings.sampler)
    space.options = backend.options(space.options)
    return space


def run_directory(settings: RunSettings, stem: str, backend: Backend) -> Path:
    """`--out`, or reports/<stem>-<backend>; created with its cache folder."""
    run_dir = Path(settings.out) if settings.out else REPORTS / f"{stem}-{backend.name}"
    try:
        (run_dir / "cache").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        msg = f"cannot create the run directory {run_dir} ({exc.strerror}): give --out a folder you can write"
        raise AutoqError(msg) from exc
    return run_dir


def onnx_model(source: Source, run_dir: Path) -> OnnxModel:
    """The model as autoq's normalised ONNX (a torch module exported once, its layers named by module FQN)."""
    model, is_file = source.model, isinstance(source.model, str | Path)
    module = model if is_torch_model(model) and not is_file else None
    if is_torch_model(model):
        model = to_onnx(model, source.example_inputs, run_dir / "cache")
    if not isinstance(model, str | Path):
        msg = f"the model must be an ONNX or .pt2 file or a torch nn.Module, not {type(model).__name__}"
        raise AutoqError(msg)
    prepared = prepare(model, run_dir)
    prepared.module = module
    return prepared


def checked_data(source: Source, model: OnnxModel) -> data_mod.Dataset:
    """The data, validated against the model's inputs and run once through the FP32 model (one-line errors for
    anything the runtime rejects), in a fixed batch too."""
    if source.data is None:
        raise AutoqError("no data: pass --data DATA.npz with arrays named as the model inputs")
    dataset = data_mod.load(source.data, source.labels)
    data_mod.validate(dataset, model.inputs)
    first_run(model, next(dataset.batches(data_mod.batch_size(model.inputs, 2))))
    return dataset


def check_run(run_dir: Path, config: dict) -> None:
    """A run directory holds one problem; resuming it with another model/data/space is an error."""
    path = run_dir / "run.json"
    if path.is_file():
        old = json.loads(path.read_text())
        changed = [k for k in config if old.get(k) != config[k]]
        if changed:
            msg = (f"{run_dir} holds a run with a different {', '.join(changed)}: "
                   "choose another --out (or delete it) to start a new run")
            raise AutoqError(msg)
    else:
        path.write_text(json.dumps(config, indent=2))


def offered_here(evaluator: Evaluator, choices: dict[str, list[str]], cache_dir: Path,
                 say: bool) -> dict[str, list[str]]:
    """The choices without the precisions the backend does not run on a layer (`autoq.probe`), said in one line."""
    try:
        dropped = unexecuted(evaluator, choices, cache_dir)
    except Exception as exc:  # noqa: BLE001 - a probe that fails leaves the executed check to flag each trial
        if say:
            print(f"autoq: the probe of which layers {evaluator.backend.name} runs as asked failed ({exc})",
                  file=sys.stderr)
        return choices
    if dropped and say:
        names = sorted(dropped)
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        specs = "/".join(sorted({p for ps in dropped.values() for p in ps}))
        print(f"autoq: {evaluator.backend.name} does not run {specs} on {len(names)} layers here, whatever is "
              f"asked ({shown}): not offered there", file=sys.stderr)
    return {name: [p for p in offered if p not in dropped.get(name, ())] for name, offered in choices.items()}


@contextmanager
def open_problem(model: object, data: DataArg, example_inputs: object, settings: RunSettings,
                 searching: bool) -> Iterator[Problem]:
    """The steps above in order; a search (`searching`) also checks that its run directory holds this problem.
    The run's lock is held while the problem is open."""
    backend = get_backend(settings.backend)
    source = resolve_source(model, data, example_inputs, settings, backend)
    space = search_space(source, settings, backend, searching)
    seed = space.seed if settings.seed is None else settings.seed
    is_file = isinstance(source.model, str | Path)
    label = source.label or (str(source.model) if is_file else f"{type(source.model).__name__} (torch module)")
    stem = source.stem or (Path(str(source.model)).stem if is_file else type(source.model).__name__)
    run_dir = run_directory(settings, stem, backend)
    prepared = onnx_model(source, run_dir)
    dataset = checked_data(source, prepared)
    splits = data_mod.split(dataset, seed=0)
    metric_name, metric_fn = get_metric(source.metric, dataset.labels is not None)
    choices = space.choices(prepared.layers, backend.unbuildable, backend.lacks)
    choices = {la.name: backend.layer_precisions(la, choices[la.name]) for la in prepared.layers}
    space.options = backend.model_options(prepared, space.options)
    config = {"model": hashlib.sha1(prepared.path.read_bytes()).hexdigest(),
              "data": data_mod.fingerprint(dataset), "backend": backend.name, "metric": metric_name,
              "choices": choices, "options": space.options, "seed": seed,
              "sensitivity": space.sensitivity, "max_layer_drop": space.max_layer_drop,
              "constraints": settings.constraints.as_dict()}
    if searching:
        check_run(run_dir, config)
    with run_lock(run_dir):
        with PhaseProgress("calibration", 1, settings.progress and searching) as bar:
            calibration = calibrate(prepared, splits.calibration, run_dir / "cache", calibrations(choices))
            bar.advance(1)
        evaluator = Evaluator(backend, prepared, calibration, splits, metric_fn, settings.threads)
        choices = offered_here(evaluator, choices, run_dir / "cache", settings.progress and searching)
        try:
            yield Problem(run_dir, label, evaluator, space, choices, metric_name, fingerprint(settings.threads), seed,
                          hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16])
        finally:
            evaluator.close()
