"""`trident bench NAME ...`: benchmarks that print figures (tests never time anything).

Each benchmark lives in its own module exposing ``register(subparsers)``.
"""

from __future__ import annotations

import argparse
import importlib

BENCHES: dict[str, str] = {
    "data": "trident.tools.bench_data",
    "pipeline": "trident.tools.bench_pipeline",
    "zero": "trident.tools.bench_zero",
    "checkpoint": "trident.tools.bench_checkpoint",
    "train": "trident.tools.bench_train",
    "attention": "trident.tools.bench_attention",
    "memory": "trident.tools.bench_memory",
    "stage-memory": "trident.tools.bench_stage_memory",
    "cp": "trident.tools.bench_cp",
    "init": "trident.tools.bench_init",
    "moe": "trident.tools.bench_moe",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="measure speed and memory; prints figures")
    bench_sub = parser.add_subparsers(dest="bench", metavar="BENCH")
    bench_sub.required = True
    for module_name in BENCHES.values():
        importlib.import_module(module_name).register(bench_sub)
