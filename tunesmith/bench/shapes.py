"""Model shapes the benchmark builds with random weights (no checkpoint download)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    attention_bias: bool

    def llama_config(self, max_positions: int = 4096):
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            max_position_embeddings=max(4096, max_positions),
            attention_bias=self.attention_bias,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            hidden_act="silu",
        )


SHAPES: dict[str, Shape] = {
    # InternLM-chat-7b: Llama architecture with q/k/v/o biases
    "internlm-7b": Shape("internlm-7b", 4096, 32, 32, 32, 11008, 103168, True),
    # a ~1.8B shape (InternLM2-1.8B-like widths) for quick runs
    "1.8b": Shape("1.8b", 2048, 24, 16, 16, 5632, 92544, True),
    # CPU smoke tests
    "tiny": Shape("tiny", 64, 2, 4, 4, 128, 512, True),
}
