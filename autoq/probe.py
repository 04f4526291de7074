"""Precisions a backend builds for a layer but does not run there: found once per model by building every layer in
its first precision of each probed kind together and reading what executed, so the search never offers them.

OpenVINO is why: NNCF leaves some layers float whatever it is asked (the squeeze-and-excitation convolutions of an
EfficientNet, its SE_BLOCK pattern), so every assignment that asked int8 there was flagged `executed: NO`.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

from autoq.evaluate import Evaluator
from autoq.files import write_json
from autoq.precision import Assignment, Precision

VERSION = 1


def unexecuted(evaluator: Evaluator, choices: dict[str, list[str]], cache_dir: Path) -> dict[str, list[str]]:
    """Layer -> the offered precisions its backend ran in another kind when built (cached in `cache_dir`)."""
    kinds = evaluator.backend.probed_kinds
    asked = {}
    for layer, offered in choices.items():
        first = next((p for p in offered if Precision.parse(p).kind in kinds), None)
        if first is not None:
            asked[layer] = first
    if not asked:
        return {}
    key = hashlib.sha1(json.dumps([VERSION, evaluator.fingerprint(), evaluator.backend.name, asked],
                                  sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / f"probe-{key}.json"
    if path.is_file():
        ran = json.loads(path.read_text())
    else:
        with tempfile.TemporaryDirectory(prefix="autoq-probe-") as tmp:
            layers = {name: asked.get(name, "fp32") for name in choices}
            candidate = evaluator.build(Assignment(layers), Path(tmp) / "probe")
            evaluator.backend.runner(candidate, evaluator.threads)
            ran = evaluator.backend.executed(candidate)
        write_json(path, ran, indent=1)
    dropped = {}
    for layer, spec in asked.items():
        kind = Precision.parse(spec).kind
        if layer in ran and Precision.parse(ran[layer]).kind != kind:
            dropped[layer] = [p for p in choices[layer] if Precision.parse(p).kind == kind]
    return dropped
