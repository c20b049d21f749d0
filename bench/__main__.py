"""``python -m bench [TABLE ...]``: run benchmark tables (all by default) and rewrite their sections
of docs/benchmarks.md. Tables: b0 (float references), b1 (Deep Compression), b2 (int8 on ONNX Runtime), b2e (EfficientNet-Lite0 int8), b3 (structured
pruning), b3u (unstructured), b4 (distillation and ensembles), b4d (distill defaults vs the student alone), b5 (data-free distillation), b6 (parallelism), b7 (all-MiniLM-L6-v2 compressed), b8 (accuracy-aware search)."""

from __future__ import annotations

import argparse
import logging

from bench import (
    b0_reference,
    b1_deep_compression,
    b2_int8,
    b2e_efficientnet,
    b3_structured,
    b3u_unstructured,
    b4_distillation,
    b4d_defaults,
    b5_datafree,
    b6_parallel,
    b7_minilm,
    b8_search,
)

TABLES = {
    "b0": b0_reference.run,
    "b1": b1_deep_compression.run_all,
    "b2": b2_int8.run_all,
    "b2e": b2e_efficientnet.run_all,
    "b3": b3_structured.run_all,
    "b3u": b3u_unstructured.run_all,
    "b4": b4_distillation.run_all,
    "b4d": b4d_defaults.run_all,
    "b5": b5_datafree.run_all,
    "b6": b6_parallel.run_all,
    "b7": b7_minilm.run_all,
    "b8": b8_search.run_all,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("tables", nargs="*", help=f"tables to run: {', '.join(TABLES)} (default: all)")
    parser.add_argument(
        "--only",
        nargs="*",
        default=[],
        help="b3: rerun only these models; b5: only these rows (keep the others); b8: only these models",
    )
    parser.add_argument(
        "--keep-scale",
        action="store_true",
        help="b7: keep the stored BERT-base scale row instead of rerunning it",
    )
    parser.add_argument("--budget", type=float, default=10.0, help="b8: minutes of every search")
    parser.add_argument(
        "--threads", type=int, default=2, help="b5: torch threads (1 to run two b5 --only at once)"
    )
    args = parser.parse_args()
    unknown = [t for t in args.tables if t not in TABLES]
    if unknown:
        parser.error(f"unknown table(s) {unknown}; known: {', '.join(TABLES)}")
    logging.basicConfig(level=logging.WARNING)
    for name in args.tables or TABLES:
        if name == "b3" and args.only:
            TABLES[name](command=f"python -m bench b3 --only {' '.join(args.only)}", only=tuple(args.only))
        elif name == "b5" and args.only:
            TABLES[name](
                command=f"python -m bench b5 --only {' '.join(args.only)}",
                only=tuple(args.only),
                threads=args.threads,
            )
        elif name == "b8":
            only = f" --only {' '.join(args.only)}" if args.only else ""
            TABLES[name](
                budget=args.budget,
                only=tuple(args.only),
                command=f"python -m bench b8 --budget {args.budget:g}{only}",
            )
        elif name == "b7" and args.keep_scale:
            TABLES[name](command="python -m bench b7 --keep-scale", scale=False)
        else:
            TABLES[name](command=f"python -m bench {name}")


if __name__ == "__main__":
    main()
