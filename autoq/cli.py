"""Command line: argument parsing only; the work is done by autoq.api."""

from __future__ import annotations

import argparse
import sys

from autoq.errors import AutoqError


def _problem_args(parser: argparse.ArgumentParser) -> None:
    """The flags that say what problem to work on, shared by every command."""
    parser.add_argument("model", nargs="?", help="ONNX model file (default: the embedded all-MiniLM-L6-v2 demo)")
    parser.add_argument("--data", help=".npz with one array per model input (first axis = samples)")
    parser.add_argument("--labels", help="labels: an array name in the data file, or a .npy file")
    parser.add_argument("--metric", help="cosine | top1 | top5 | sqnr | accuracy (default: accuracy with labels, "
                                         "else cosine)")
    parser.add_argument("--space", help="search space: a YAML file or a bundled name (default: cpu-int8)")
    parser.add_argument("--backend", default="onnxruntime", help="backend (default: onnxruntime)")
    parser.add_argument("--threads", type=int, default=2, help="inference threads for every measurement (2)")
    parser.add_argument("--out", help="run directory (default: reports/<model>-<backend>); rerun to resume")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autoq", description="Hardware-aware mixed-precision quantization search")
    commands = parser.add_subparsers(dest="command", required=True)
    search = commands.add_parser("search", help="search per-layer precisions; writes the Pareto front and a report")
    _problem_args(search)
    search.add_argument("--trials", type=int, default=30, help="trials in the study, earlier runs included (30)")
    search.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    search.add_argument("--seed", type=int, help="sampler seed (default: the space's)")
    search.add_argument("--quiet", action="store_true", help="no progress bar")
    sensitivity = commands.add_parser("sensitivity", help="score every layer at every precision alone")
    _problem_args(sensitivity)
    sensitivity.add_argument("--method", default="measured", help="measured (default) | sqnr | hessian")
    return parser


def _summary(result) -> str:
    front = result.front
    lines = [f"{len(result.trials)} trials, {len(front)} front points:"]
    for _, row in front.iterrows():
        quality = row.get("val_quality", row["quality"])
        latency = row.get("val_latency_ms", row["latency_ms"])
        lines.append(f"  point {row['point']}: quality {quality:.4f}  {latency:7.2f} ms  "
                     f"{row['size_bytes'] / 1e6:7.2f} MB  {row['summary']}")
    lines.append(f"report: {result.report}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        from autoq import api

        if args.command == "sensitivity":
            table = api.analyse_sensitivity(args.model, args.data, labels=args.labels, metric=args.metric,
                                            space=args.space, backend=args.backend, method=args.method,
                                            threads=args.threads, out=args.out)
            top = table.sort_values("score", ascending=False).head(10)
            print(top[["layer", "precision", "quality_drop", "sqnr_db", "latency_saving_ms"]].to_string(index=False))
            return 0
        result = api.search(args.model, args.data, labels=args.labels, metric=args.metric, space=args.space,
                            backend=args.backend, trials=args.trials, timeout=args.timeout, threads=args.threads,
                            out=args.out, seed=args.seed, progress=not args.quiet)
    except AutoqError as exc:
        print(f"autoq: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autoq: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print(_summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
