"""Model FLOPs per token, for model-FLOPs utilisation (MFU).

Convention (the issue's): a forward pass costs ``2 N`` per token, where ``N`` counts the weights of every
matmul (all decoder linears and the LM head; embeddings are lookups and cost nothing). Full fine-tuning adds a
backward pass for activations and weights, ``6 N`` in all; LoRA skips the frozen weights' gradients, ``4 N``
(the adapters' own FLOPs are under 3 % at r 64 and left out). Attention adds, per token and layer, ``2 d L``
forward for causal ``QK^T`` and ``PV`` (half of the square is masked), three times that with the backward pass.
``L`` is the effective context: the mean over tokens of their sample's length (packed samples attend only
within themselves), so ``sum(len^2) / sum(len)``. Recomputation from activation checkpointing is not counted:
MFU measures useful work.
"""

from __future__ import annotations

from tunesmith.bench.shapes import Shape


def matmul_params(shape: Shape) -> int:
    d, f, v = shape.hidden, shape.intermediate, shape.vocab
    head_dim = d // shape.heads
    kv = shape.kv_heads * head_dim
    per_layer = d * d + 2 * d * kv + d * d + 3 * d * f  # q, k, v, o, gate, up, down
    return shape.layers * per_layer + d * v  # + LM head


def effective_context(sample_lengths: list[int]) -> float:
    total = sum(sample_lengths)
    return sum(n * n for n in sample_lengths) / total if total else 0.0


def flops_per_token(shape: Shape, method: str, context: float) -> float:
    n = matmul_params(shape)
    dense = (6 if method == "full" else 4) * n
    attention = 3 * 2 * shape.hidden * context * shape.layers
    return dense + attention


def mfu(tokens_per_second: float, flops_token: float, peak_flops: float) -> float:
    return tokens_per_second * flops_token / peak_flops if peak_flops > 0 else 0.0
