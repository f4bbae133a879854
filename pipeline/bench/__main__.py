"""``python -m pipeline.bench <name> [--out PATH] [options]``: run one benchmark, save JSON.

A benchmark is a module with ``add_arguments(parser)`` and ``main(args) -> dict``;
adding one is one entry in ``BENCHMARKS``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import ModuleType

from pipeline.bench import parts, report, storage, throughput

BENCHMARKS: dict[str, ModuleType] = {
    "parts": parts,
    "report": report,
    "storage": storage,
    "throughput": throughput,
}


def main(argv: list[str] | None = None) -> Path:
    """Run the named benchmark and write its results; returns the JSON file's path."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench")
    names = parser.add_subparsers(dest="name", required=True)
    for name, benchmark in BENCHMARKS.items():
        subparser = names.add_parser(
            name,
            help=(benchmark.__doc__ or "").split("\n")[0],
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        subparser.add_argument(
            "--out",
            type=Path,
            default=Path(f"bench_results/{name}.json"),
            help="JSON results file (default: %(default)s)",
        )
        benchmark.add_arguments(subparser)
    args = parser.parse_args(argv)
    results = BENCHMARKS[args.name].main(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results written to {args.out}")
    return args.out


if __name__ == "__main__":
    main()
