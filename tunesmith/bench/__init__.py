"""Throughput / memory harness: tunesmith's training step against a plain transformers + peft loop."""

from tunesmith.bench.harness import BenchOptions, Result, run_bench

__all__ = ["BenchOptions", "Result", "run_bench"]
