"""The single latency harness, and the machine fingerprint every figure is recorded with.

Backends never time themselves: they hand a `run()` callable to `time_runner`. It warms up, times the
candidate in rotating rounds against a reference runner (so slow drift of a shared machine shows as a
ratio, not a shift), repeats until the median is stable, and measures the CPU time other processes took
during the timing; if they held more than `max_load` cores it waits and re-times.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata

import numpy as np

Runner = Callable[[], object]


@dataclass
class Timing:
    median_ms: float
    spread_ms: float  # inter-quartile range
    runs: int
    load: float  # cores busy with other processes during the timing
    ref_median_ms: float | None = None  # the reference, timed in the same rounds
    attempts: int = 1

    @property
    def speedup(self) -> float | None:
        return self.ref_median_ms / self.median_ms if self.ref_median_ms else None

    def as_dict(self) -> dict:
        return {**asdict(self), "speedup": self.speedup}


def _busy_ticks() -> int:
    """Busy CPU ticks of the whole machine (user+nice+system+irq+softirq+steal)."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    return fields[0] + fields[1] + fields[2] + sum(fields[5:8])


class LoadMeter:
    """Cores used by *other* processes between start() and stop(); 0.0 where /proc is missing."""

    def start(self) -> None:
        self._wall, self._own = time.perf_counter(), sum(os.times()[:2])
        self._busy = _busy_ticks() if os.path.exists("/proc/stat") else None

    def stop(self) -> float:
        wall = time.perf_counter() - self._wall
        if self._busy is None or wall <= 0:
            return 0.0
        machine = (_busy_ticks() - self._busy) / os.sysconf("SC_CLK_TCK")
        own = sum(os.times()[:2]) - self._own
        return max(0.0, (machine - own) / wall)


def _time_once(run: Runner) -> float:
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1e3


def time_runner(run: Runner, reference: Runner | None = None, *, warmup: int = 5, min_runs: int = 12,
                max_runs: int = 40, rel_error: float = 0.01, round_size: int = 6, max_load: float = 0.3,
                attempts: int = 3, wait_s: float = 2.0) -> Timing:
    """Median latency of `run()` in ms, stable to `rel_error` (standard error of the median), or after
    `max_runs`. With a `reference`, both are timed in alternating rounds of `round_size` runs."""
    for attempt in range(1, attempts + 1):
        for _ in range(warmup):
            run()
            if reference is not None:
                reference()
        meter = LoadMeter()
        meter.start()
        times: list[float] = []
        ref_times: list[float] = []
        while len(times) < max_runs:
            times += _round(run, round_size, settle=reference is not None)
            if reference is not None:
                ref_times += _round(reference, round_size, settle=True)
            if len(times) >= min_runs and _stable(times, rel_error):
                break
        load = meter.stop()
        q1, median, q3 = np.percentile(times, [25, 50, 75])
        ref = float(np.median(ref_times)) if ref_times else None
        timing = Timing(float(median), float(q3 - q1), len(times), round(load, 3), ref, attempt)
        if load <= max_load or attempt == attempts:  # the last attempt stands, with its load recorded
            return timing
        time.sleep(wait_s)
    msg = f"attempts must be at least 1, not {attempts}"
    raise ValueError(msg)


def ratio_rounds(runs: Mapping[str, Runner | Sequence[Runner]], reference: str, rounds: int = 15,
                 round_size: int = 6, warmup: int = 3,
                 pause_s: float = 0.02) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Several models taking turns with the reference, `rounds` times: per model, (its median ms per round, the
    reference's median ms in the block just before it / its own), so each ratio pairs two adjacent blocks and a
    drifting machine shows in both alike. A short pause after each block lets the threads of a session that spins
    (ONNX Runtime's default) park before the next session runs. A model given as several runners (separately
    compiled instances) runs instance `round % len(instances)` in each round."""
    instances = {name: list(run) if isinstance(run, Sequence) else [run] for name, run in runs.items()}
    for each in instances.values():
        for run in each:
            for _ in range(warmup):
                run()
    medians: dict[str, list[float]] = {name: [] for name in runs}
    ratios: dict[str, list[float]] = {name: [] for name in runs}
    for index in range(rounds):
        references = instances[reference]
        for name, each in instances.items():
            if name == reference:
                continue
            time.sleep(pause_s)
            ref = float(np.median(_round(references[index % len(references)], round_size, settle=True)))
            time.sleep(pause_s)
            own = float(np.median(_round(each[index % len(each)], round_size, settle=True)))
            medians[reference].append(ref)
            medians[name].append(own)
            ratios[name].append(ref / own)
            ratios[reference].append(1.0)
    return {name: (np.array(medians[name]), np.array(ratios[name])) for name in runs}


def interval(values: np.ndarray, level: float = 0.95, draws: int = 2000,
             clusters: np.ndarray | None = None) -> tuple[float, float, float]:
    """(median, low, high): the median and its bootstrap percentile confidence interval. With `clusters` (e.g.
    which compiled instance each value came from), clusters are resampled first, then values within each, so
    what differs between instances widens the interval as it should."""
    rng = np.random.default_rng(0)
    if clusters is None:
        resampled = np.median(rng.choice(values, (draws, len(values))), axis=1)
    else:
        groups = [values[clusters == c] for c in np.unique(clusters)]
        resampled = np.array([np.median(np.concatenate([rng.choice(groups[g], len(groups[g]))
                                                        for g in rng.integers(len(groups), size=len(groups))]))
                              for _ in range(draws)])
    tail = (1 - level) / 2 * 100
    return float(np.median(values)), float(np.percentile(resampled, tail)), float(np.percentile(resampled, 100 - tail))


def _round(run: Runner, size: int, settle: bool) -> list[float]:
    """`size` timed runs; after switching from another session the first run is discarded."""
    if settle:
        run()
    return [_time_once(run) for _ in range(size)]


def _stable(times: list[float], rel_error: float) -> bool:
    """Standard error of the median (1.2533 * sigma / sqrt(n), sigma from the IQR so outliers don't
    dominate) within rel_error of the median."""
    q1, median, q3 = np.percentile(times, [25, 50, 75])
    return 1.2533 * (q3 - q1) / 1.349 / np.sqrt(len(times)) <= rel_error * median


def _cpu() -> tuple[str, list[str]]:
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = info.get("flags", "").split()
    keep = ("avx2", "avx512", "amx", "fma", "f16c")
    return info.get("model name", platform.processor() or platform.machine()), sorted(
        f for f in flags if f.startswith(keep) or "vnni" in f)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def fingerprint(threads: int) -> dict:
    """What a latency figure depends on: CPU, flags, cores, threads and library versions."""
    model, flags = _cpu()
    from autoq.backends.base import LIBRARIES

    names = dict.fromkeys(["autoq", "onnx", *(p for packages in LIBRARIES.values() for p in packages), "optuna"])
    libraries = {p: _version(p) for p in names}
    return {"cpu": model, "cpu_flags": flags, "cores": os.cpu_count(), "threads": threads,
            "machine": platform.machine(), "python": platform.python_version(),
            "libraries": {k: v for k, v in libraries.items() if v}}


def hardware_key(print_: dict) -> str:
    """The part of a fingerprint that must match for latencies to be comparable."""
    return f"{print_['cpu']}|{print_['cores']}|{print_['threads']}|{','.join(print_['cpu_flags'])}"
