"""Where the search starts (search policy): assignments enqueued before the sampler's own, built from the
sensitivity table (greedy and fallback cuts), the runtime's recipes (as they are, their learned twins, rebalanced
and at their size), tied tables and the options' other values. `starting_points` composes them for a run."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import pandas as pd

from autoq.errors import AutoqError
from autoq.precision import Assignment, Kind, Precision

OPTION_SEEDS = 3  # per alternative value of an option: the fast end's fp32-protected seeds built with it


@dataclass(frozen=True)
class StartingPoints:
    """What a new study enqueues: `recipes` right after the uniform baselines (the runtime's recipes in autoq's
    specs, their learned twins, each with the options' other values), then `seeds`."""
    recipes: list[Assignment]
    seeds: list[Assignment]


def starting_points(table: pd.DataFrame | None, choices: dict[str, list[str]], recipes: list[dict[str, str]],
                    ties: dict[str, str], options: Mapping[str, Sequence], affects: Affects) -> StartingPoints:
    """The run's seeds: with a sensitivity `table`, the greedy cuts, the fast end's fallbacks (those protecting with
    fp32 also under each option's other values); every recipe's seeds; tied tables following their heads.
    `recipes` are the backend's recipes as layer -> spec, `ties` its tied tables (table -> head)."""
    seeds: list[Assignment] = []
    if table is not None:
        seeds = greedy_seeds(table, choices) + fallback_seeds(table, choices)
        seeds += option_variants(fallback_seeds(table, choices, fp32_only=True), options, affects, limit=OPTION_SEEDS)
    tied = frozenset(ties) | set(ties.values())
    seeds = follow_ties(recipe_seeds(recipes, table, choices, keep=tied) + seeds, ties, choices)
    as_they_are = recipe_seeds(recipes, None, choices, keep=tied)
    return StartingPoints(as_they_are + option_variants(as_they_are, options, affects), seeds)


Affects = Callable[[str, Precision], bool]  # (option, precision) -> whether the option changes how it is built


def option_variants(seeds: Sequence[Assignment], options: Mapping[str, Sequence], affects: Affects,
                    limit: int | None = None) -> list[Assignment]:
    """Each seed with each other value of every option that changes how one of its layers is built (`affects`),
    the first `limit` such seeds per value: e.g. ORT's SmoothQuant on the fast end's int8-dyn-pc seeds."""
    variants = []
    for key, values in options.items():
        touched = [seed for seed in seeds if any(affects(key, Precision.parse(p)) for p in set(seed.layers.values()))]
        variants += [Assignment(seed.layers, {**seed.options, key: value})
                     for value in values[1:] for seed in touched[:limit]]
    return variants


def greedy_seeds(table: pd.DataFrame, choices: dict[str, list[str]],
                 fractions: tuple[float, ...] = (0.25, 0.5, 0.67, 0.8, 0.9, 0.95)) -> list[Assignment]:
    """Assignments that lower the precision of layers in order of least quality cost per ms saved (the
    AIMET/NNCF greedy idea), cut at several budgets, so the first trials already trace a front. Where a layer
    has a precision that saves latency, its precisions that don't are left out of the order."""
    rows = table[[p in choices.get(name, []) for name, p in zip(table["layer"], table["precision"], strict=True)]]
    faster = rows["latency_saving_ms"].fillna(0) > 0  # where a layer has a faster option, slower ones (e.g. bf16
    rows = rows[faster | ~faster.groupby(rows["layer"]).transform("any")]  # with no native bf16) take no step
    if rows.empty:
        return []
    # a backend without a per-layer profiler has no savings (None): MACs, then parameters order the layers (a
    # table has no MACs)
    gain = (pd.to_numeric(rows["latency_saving_ms"], errors="coerce").fillna(0).clip(lower=0)
            + 1e-9 * rows["macs"].astype(float) + 1e-15 * rows["params"].astype(float))
    cost = rows["score"] - rows["score"].min()
    best = rows.assign(ratio=cost / gain).sort_values("ratio").drop_duplicates("layer")
    order = list(zip(best["layer"], best["precision"], strict=True))
    seeds: dict[str, Assignment] = {}
    for fraction in fractions:
        chosen = dict(order[: max(1, round(fraction * len(order)))])
        seed = Assignment({name: chosen.get(name, "fp32" if "fp32" in c else c[0]) for name, c in choices.items()})
        seeds.setdefault(seed.key(), seed)
    return list(seeds.values())


def fallback_seeds(table: pd.DataFrame, choices: dict[str, list[str]],
                   fractions: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75), table_cost: float = 0.02,
                   fp32_only: bool = False, fine: tuple[float, ...] = (0.01, 0.03)) -> list[Assignment]:
    """The fast end, alone and with its most fragile layers protected. For each of the two precisions that save the
    most latency in total, the top `fractions` of layers (by that precision's score) move to a safer spec: the most
    accurate one that still saves latency, the most accurate one that saves nearly as much (int8-dyn -> its
    per-channel form; the first three fractions), or fp32 (the first two). A layer that does not offer the fast
    precision (an embedding table) takes the spec saving it the most bytes at a latency cost under `table_cost` of
    the fast precision's total saving, except in the seeds protecting with fp32, which seek quality: there it
    stays fp32 (MiniLM: int4 word and token-type tables cost 0.003 of cosine, 0.9935 -> 0.9904, more than fp32
    on the four most fragile MatMuls regains under SmoothQuant, 0.0019).
    The safest spec also protects the `fine` fractions, a layer or a few of a large model: a language model's LM
    head (and the table tied to it) in 8 bits and the rest in 4 is the size class of NNCF's and the GenAI builder's
    int4 recipes (SmolLM2 on OpenVINO: nothing between 78 and 104 MB without them).
    With a menu of specs, random mixes rarely find these. `fp32_only`: only the seeds that protect with fp32."""
    rows = table[[p in choices.get(n, []) for n, p in zip(table["layer"], table["precision"], strict=True)]]
    if rows.empty:
        return []
    totals = rows.groupby("precision")["latency_saving_ms"].sum().sort_values(ascending=False)
    saving = totals[totals > 0]
    accuracy = rows[rows["precision"].isin(saving.index)].groupby("precision")["score"].mean().sort_values()
    seeds: dict[str, Assignment] = {}
    for fast in list(saving.index[:2]):
        cheap = rows[rows["latency_saving_ms"].fillna(0) >= -table_cost * saving[fast]]
        cheap = cheap.sort_values("size_saving_bytes", ascending=False).drop_duplicates("layer")
        smallest = dict(zip(cheap["layer"], cheap["precision"], strict=True))
        safer = [p for p in accuracy.index if accuracy[p] < accuracy[fast]]
        near = [p for p in safer if saving[p] >= 0.9 * saving[fast]]
        order = list(rows[rows["precision"] == fast].sort_values("score", ascending=False)["layer"])
        plans = [("fp32", (0.0,) + fractions[:2])]
        if not fp32_only:
            plans += [*((safe, fine + fractions) for safe in safer[:1]),
                      *((safe, fractions[:3]) for safe in near[:1] if safe not in safer[:1])]
        for safe, cuts in plans:
            for fraction in cuts:
                protected = set(order[: max(1, round(fraction * len(order)))] if fraction else [])
                tables = "fp32" if safe == "fp32" and fraction else None  # protecting with fp32 seeks quality
                layers = {name: (safe if safe in c else "fp32") if name in protected else
                          (fast if fast in c else
                           (tables if tables in c else smallest.get(name, "fp32" if "fp32" in c else c[0])))
                          for name, c in choices.items()}
                seed = Assignment(layers)
                seeds.setdefault(seed.key(), seed)
    return list(seeds.values())


def recipe_seeds(recipes: list[dict[str, str]], table: pd.DataFrame | None, choices: dict[str, list[str]],
                 fractions: tuple[float, ...] = (0.2, 0.4), keep: frozenset[str] = frozenset()) -> list[Assignment]:
    """The backend's recipes the space can express (`Recipe.layers`), as they are and, with a sensitivity `table`,
    rebalanced two ways. The recipe's most accurate spec on as many layers, and on `fractions` of them, picked as
    the most fragile under their other spec (the recipe's own, or its most common one) by the sensitivity instead
    of by the recipe's rule (llama.cpp's blocks for k_quant_mixed; NNCF's last layer). And at the recipe's size
    (`at_size`). The search then starts where the runtime's one-line recipes are, and from their bytes placed by
    measurement. `keep`: layers left as the recipe has them (a tied table and LM head: stored once)."""
    seeds: dict[str, Assignment] = {}
    scores = None if table is None else table.set_index(["layer", "precision"])["score"]
    for layers in recipes:
        if any(spec not in choices.get(name, []) for name, spec in layers.items()):
            continue  # a spec the space leaves out (e.g. float compute): not this space's to start from
        seed = Assignment({name: layers.get(name, "fp32" if "fp32" in c else c[0]) for name, c in choices.items()})
        seeds.setdefault(seed.key(), seed)
        twin = learned_twin(seed, choices, keep)
        seeds.setdefault(twin.key(), twin)
        if table is not None:
            resized = at_size(seed, table, choices, keep)
            seeds.setdefault(resized.key(), resized)
        specs = pd.Series(list(layers.values())).value_counts()
        if table is None or scores is None or specs.index.isin(table["precision"]).sum() < 2:
            continue  # one scored spec (fp32 has no score): nothing to rebalance
        specs = specs[specs.index.isin(table["precision"])]
        safest = min(specs.index, key=lambda spec: scores.xs(spec, level="precision").mean())
        base = next(spec for spec in specs.index if spec != safest)
        lower = {name: base if spec == safest else spec for name, spec in layers.items()}
        offering = [n for n in layers if n not in keep and safest in choices[n] and lower[n] in choices[n]
                    and (n, lower[n]) in scores]
        order = sorted(offering, key=lambda n: scores[(n, lower[n])], reverse=True)
        for count in (sum(layers[n] == safest for n in offering), *(round(f * len(offering)) for f in fractions)):
            rebalanced = Assignment({**seed.layers, **{n: safest if i < count else lower[n]
                                                       for i, n in enumerate(order)}})
            seeds.setdefault(rebalanced.key(), rebalanced)
    return list(seeds.values())


def learned_twin(seed: Assignment, choices: dict[str, list[str]], keep: frozenset[str] = frozenset()) -> Assignment:
    """`seed` with each layer moved to the learned-rounding form of its spec where the space offers it
    (`w4g32-acc4` -> `w4g32-gptq-acc4` or `w4g32-adaround-acc4`; `w4g32-kquant-acc4` -> `w4g32-asym-gptq-acc4`,
    `w4g32-asym-adaround-acc4`, else a symmetric form; `int8` -> `int8-adaround`): the same bits, blocks and
    kernels, the weights fitted to FP32's outputs.
    `keep`: layers left as they are (a tied table and LM head, stored once only while they share a format)."""
    layers = {}
    for name, text in seed.layers.items():
        offered = [form for form in _learned_forms(Precision.parse(text)) if form in choices.get(name, [])]
        layers[name] = offered[0] if offered and name not in keep else text
    return Assignment(layers, dict(seed.options))


def _learned_forms(spec: Precision) -> list[str]:
    """The learned-rounding forms of `spec`, best first: a zero-pointed grid's own, then the symmetric one; GPTQ
    before AdaRound (lower output error on SmolLM2's Linears: `autoq.recovery.gptq`)."""
    if spec.kind not in (Kind.STATIC, Kind.WEIGHT_ONLY):
        return []
    symmetries = [spec.symmetric] if spec.kind == Kind.STATIC else [spec.symmetric, True]
    forms = []
    for symmetric in symmetries:
        for method in ("gptq", "adaround"):
            try:
                forms.append(str(replace(spec, rounding=method, symmetric=symmetric)))
            except AutoqError:  # no such learned form of this spec
                continue
    return forms


def at_size(seed: Assignment, table: pd.DataFrame, choices: dict[str, list[str]], keep: frozenset[str] = frozenset(),
            relax: float = 0.5, spend: float = 0.9) -> Assignment:
    """`seed` at its own size with its bytes placed by sensitivity: the `relax` share of its layers that lose the
    least in their fastest spec no larger than theirs take it (SmolLM2: int4 in blocks of 128 for blocks of 32),
    and `spend` of the bytes that frees goes, most fragile layer first, to each layer's most accurate spec that
    saves latency (the rest is slack for the table's estimates: SmolLM2's GenAI int4 so placed was 0.2% larger)."""
    rows = table.set_index(["layer", "precision"])
    score, saved = rows["score"], rows["size_saving_bytes"]
    faster = rows["latency_saving_ms"].fillna(0)
    layers = dict(seed.layers)
    movable = [n for n, p in layers.items() if n not in keep and (n, p) in score.index]
    own = {n: [p for p in choices[n] if (n, p) in score.index] for n in movable}
    fast = {n: max((p for p in own[n] if saved[(n, p)] >= saved[(n, layers[n])]), key=lambda p: faster[(n, p)])
            for n in movable}
    for n in sorted(movable, key=lambda n: score[(n, fast[n])])[: round(relax * len(movable))]:
        layers[n] = fast[n]
    budget = spend * sum(saved[(n, layers[n])] - saved[(n, seed.layers[n])] for n in movable)
    for n in sorted(movable, key=lambda n: score[(n, layers[n])], reverse=True):
        safe = min((p for p in own[n] if faster[(n, p)] > 0), key=lambda p: score[(n, p)], default=layers[n])
        cost = saved[(n, layers[n])] - saved[(n, safe)]
        if layers[n] == seed.layers[n] and 0 < cost <= budget:
            layers[n], budget = safe, budget - cost
    return Assignment(layers, dict(seed.options))


def follow_ties(seeds: list[Assignment], ties: dict[str, str], choices: dict[str, list[str]]) -> list[Assignment]:
    """Each seed with every weight-only tied table (`Backend.tied_tables`) in its head's spec where the table offers
    it (the head's accuracy level aside): the backend then stores the table once, in the head's weights (SmolLM2:
    16 MB of int4 table saved). Seeds rank tables by their own bytes and cannot see that saving."""
    followed: dict[str, Assignment] = {}
    for seed in seeds:
        layers = dict(seed.layers)
        for table, head in ties.items():
            if table not in layers or head not in layers or Precision.parse(layers[table]).kind != Kind.WEIGHT_ONLY:
                continue
            same = Precision.parse(layers[head]).weight_format()
            if same is not None and str(same) in choices.get(table, []):
                layers[table] = str(same)
        moved = Assignment(layers, dict(seed.options))
        followed.setdefault(moved.key(), moved)
    return list(followed.values())
