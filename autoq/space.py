"""SearchSpace from search_spaces/*.yaml: ordered match rules -> per-layer precision choices.

```yaml
name: cpu-int8
default: [fp32, int8]          # choices of a layer no rule matches
rules:                          # first match wins
  - match: "re:.*classifier.*"  # exact node name, "re:<regex>" (fullmatch), or
    precisions: [fp32]
  - op_type: [Conv]             # op types
    precisions: [fp32, int8]
options: {reduce_range: [false]}   # model-wide choices
sampler: nsga2                  # nsga2 | tpe | gp | random
population: 16
seed: 0
sensitivity: sqnr               # how search seeds itself: sqnr (seconds) | measured (minutes) | none
max_layer_drop: 0.05            # with measured: a precision costing more alone is not offered to the layer
screen: true                    # skip candidates the cost model predicts the front dominates by a clear margin
```
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import yaml

from autoq.errors import AutoqError
from autoq.graph import Layer
from autoq.methods import METHODS
from autoq.precision import Precision
from autoq.samplers import get_sampler

TOP_KEYS = {"name", "description", "default", "rules", "options", "sampler", "population", "seed", "sensitivity",
            "max_layer_drop", "screen"}
RULE_KEYS = {"match", "op_type", "precisions"}
DEFAULT_SPACE = "cpu-int8"


@dataclass(frozen=True)
class Rule:
    precisions: tuple[str, ...]
    match: str | None = None
    op_types: tuple[str, ...] = ()

    def matches(self, layer: Layer) -> bool:
        if self.op_types and layer.op_type not in self.op_types:
            return False
        if self.match is None:
            return True
        if self.match.startswith("re:"):
            return re.fullmatch(self.match[3:], layer.name) is not None
        return self.match == layer.name


@dataclass
class SearchSpace:
    name: str
    default: tuple[str, ...]
    rules: list[Rule] = field(default_factory=list)
    options: dict[str, list] = field(default_factory=dict)
    sampler: str = "nsga2"
    population: int = 16
    seed: int = 0
    sensitivity: str = "sqnr"
    max_layer_drop: float | None = None
    source: str = "<dict>"
    screen: bool = True

    def with_sampler(self, sampler: str) -> SearchSpace:
        try:
            get_sampler(sampler)
        except AutoqError as exc:
            raise AutoqError(f"--sampler: {exc}") from None
        return replace(self, sampler=sampler)

    def precisions(self) -> list[str]:
        """Every precision the space names."""
        return list(dict.fromkeys([*self.default, *(p for rule in self.rules for p in rule.precisions)]))

    def choices(self, layers: list[Layer], unbuildable: Callable[[Precision], str | None],
                lacks: Callable[[Precision], str | None] = lambda precision: None) -> dict[str, list[str]]:
        """Layer -> allowed precisions (first matching rule, else `default`); a precision the backend cannot
        build at all (`unbuildable` gives the reason) is an error naming it; one this machine cannot run as it is
        stored (`lacks`: e.g. a weight format the CPU plugin decompresses) is left out with a note."""
        dropped = set()
        for precision in self.precisions():
            reason = unbuildable(Precision.parse(precision))
            if reason:
                msg = f"{self.source}: precision {precision} is not available on this backend: {reason}"
                raise AutoqError(msg)
            missing = lacks(Precision.parse(precision))
            if missing:
                dropped.add(precision)
                print(f"autoq: {precision} left out of the space on this machine: {missing}", file=sys.stderr)

        def kept(precisions: tuple[str, ...]) -> list[str]:
            return [p for p in precisions if p not in dropped] or ["fp32"]

        return {layer.name: kept(next((r.precisions for r in self.rules if r.matches(layer)), self.default))
                for layer in layers}


def _fail(source: str, key: str, problem: str) -> AutoqError:
    return AutoqError(f"{source}: key '{key}': {problem}")


def _precisions(value: object, source: str, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise _fail(source, key, "expected a non-empty list of precisions")
    try:
        return tuple(dict.fromkeys(str(Precision.parse(item)) for item in value))
    except AutoqError as exc:
        raise _fail(source, key, str(exc)) from None


def parse_space(data: object, source: str = "<dict>") -> SearchSpace:
    """Validate a space's dict form; errors name the source, the key and the allowed values."""
    if not isinstance(data, dict):
        msg = f"{source}: a search space must be a YAML mapping (keys: {', '.join(sorted(TOP_KEYS))})"
        raise AutoqError(msg)
    for key in data:
        if key not in TOP_KEYS:
            raise _fail(source, key, f"unknown key (allowed: {', '.join(sorted(TOP_KEYS))})")
    rules = []
    for index, rule in enumerate(data.get("rules") or []):
        where = f"rules[{index}]"
        if not isinstance(rule, dict):
            raise _fail(source, where, "each rule is a mapping with 'precisions' and 'match' and/or 'op_type'")
        for key in rule:
            if key not in RULE_KEYS:
                raise _fail(source, f"{where}.{key}", f"unknown key (allowed: {', '.join(sorted(RULE_KEYS))})")
        if "precisions" not in rule:
            raise _fail(source, where, "missing 'precisions'")
        match = rule.get("match")
        if match is not None and match.startswith("re:"):
            try:
                re.compile(match[3:])
            except re.error as exc:
                raise _fail(source, f"{where}.match", f"bad regular expression: {exc}") from exc
        op_types = rule.get("op_type") or []
        rules.append(Rule(_precisions(rule["precisions"], source, f"{where}.precisions"), match,
                          tuple([op_types] if isinstance(op_types, str) else op_types)))
    sampler = data.get("sampler", "nsga2")
    try:
        get_sampler(sampler)
    except AutoqError as exc:
        raise _fail(source, "sampler", str(exc)) from None
    options = data.get("options") or {}
    if not isinstance(options, dict) or not all(isinstance(v, list) and v for v in options.values()):
        raise _fail(source, "options", "expected a mapping of option name -> non-empty list of values")
    population = data.get("population", 16)
    if not isinstance(population, int) or population < 2:
        raise _fail(source, "population", "expected an integer >= 2")
    sensitivity = data.get("sensitivity", "sqnr")
    if sensitivity != "none" and sensitivity not in METHODS:
        raise _fail(source, "sensitivity", f"unknown method '{sensitivity}' (registered: {', '.join(METHODS)}, none)")
    max_drop = data.get("max_layer_drop")
    if max_drop is not None and (not isinstance(max_drop, int | float) or max_drop <= 0):
        raise _fail(source, "max_layer_drop", "expected a positive number (a quality drop, in metric units)")
    if max_drop is not None and sensitivity != "measured":
        raise _fail(source, "max_layer_drop", "needs 'sensitivity: measured' (it bounds measured quality drops)")
    screen = data.get("screen", True)
    if not isinstance(screen, bool):
        raise _fail(source, "screen", "expected true or false")
    return SearchSpace(str(data.get("name", Path(source).stem)),
                       _precisions(data.get("default", ["fp32", "int8"]), source, "default"), rules,
                       dict(options), sampler, population, int(data.get("seed", 0)), sensitivity, max_drop, source,
                       screen)


def load_space(space: str | Path | dict | SearchSpace | None) -> SearchSpace:
    """A space from a SearchSpace, a dict, a YAML path, or the name of a bundled space."""
    if isinstance(space, SearchSpace):
        return space
    if space is None:
        space = DEFAULT_SPACE
    if isinstance(space, dict):
        return parse_space(space)
    path = Path(space)
    if not path.is_file():
        bundled = resources.files("autoq.search_spaces") / f"{space}.yaml"
        if not bundled.is_file():
            names = sorted(p.name[:-5] for p in resources.files("autoq.search_spaces").iterdir()
                           if p.name.endswith(".yaml"))
            msg = f"search space '{space}' is neither a file nor a bundled space ({', '.join(names)})"
            raise AutoqError(msg)
        return parse_space(yaml.safe_load(bundled.read_text()), f"{space}.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        msg = f"{path}: invalid YAML{where}: {getattr(exc, 'problem', exc)}"
        raise AutoqError(msg) from exc
    return parse_space(data, str(path))
