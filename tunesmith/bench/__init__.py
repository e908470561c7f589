"""`tunesmith bench`: the product's training step (or `tunesmith train` itself, --end-to-end) against a plain
transformers + peft loop. The repository's top-level bench/ holds the device suite, other scripts and the notes."""

from tunesmith.bench.harness import BenchOptions, Result, run_bench

__all__ = ["BenchOptions", "Result", "run_bench"]
