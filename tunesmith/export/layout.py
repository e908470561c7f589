"""Tensor names of a base checkpoint vs the names of the model that was trained (and its adapter).

Most models train under their own names. InternLM v1 / v2 are trained as transformers' LlamaForCausalLM
(tunesmith.models maps them at load), so an adapter or a full fine-tune names Llama modules; writing them back
in the layout the base came in needs the reverse mapping:

- InternLM v1: the same names (its rotary `inv_freq` buffers have no Llama counterpart and pass through);
- InternLM2: renamed modules, and q_proj / k_proj / v_proj are rows of the fused `attention.wqkv`, grouped
  per key/value head as [q_0 .. q_{g-1}, k, v]. A change to q/k/v is fused back into those rows.

The forward direction (names, splitting) is tunesmith.models' own conversion, applied to meta tensors, so
both directions agree by construction; `fuse_wqkv` is its inverse.
"""

from __future__ import annotations

import torch

from tunesmith.models.internlm import convert_internlm_tensors, is_internlm


def fuse_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """(q, k, v) rows (weights or biases) -> InternLM2's fused wqkv rows; the inverse of split_wqkv."""
    head_dim = k.shape[0] // kv_heads
    groups = heads // kv_heads
    rest = q.shape[1:]
    qg = q.reshape(kv_heads, groups, head_dim, *rest)
    kg = k.reshape(kv_heads, 1, head_dim, *rest)
    vg = v.reshape(kv_heads, 1, head_dim, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(kv_heads * (groups + 2) * head_dim, *rest)


class Layout:
    """Identity mapping: the model trained under the checkpoint's own names."""

    name = "native"

    def trained_names(self, name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
        """(trained-model name, shape) of each part of base tensor `name`; [] when it has no counterpart."""
        return [(name, shape)]

    def split(self, name: str, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [tensor]

    def join(self, name: str, parts: list[torch.Tensor]) -> torch.Tensor:
        return parts[0]

    def base_name(self, trained: str) -> str:
        """The base-layout name of a trained-model tensor the base does not store (an untied head)."""
        return trained


class InternLMLayout(Layout):
    def __init__(self, config: dict):
        self.config = config
        self.name = config["model_type"]
        self.heads = config["num_attention_heads"]
        self.kv_heads = config.get("num_key_value_heads", self.heads)

    def _convert(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        return list(convert_internlm_tensors([(name, tensor)], self.config))

    def trained_names(self, name, shape):
        return [(n, tuple(t.shape)) for n, t in self._convert(name, torch.empty(shape, device="meta"))]

    def split(self, name, tensor):
        return [t for _, t in self._convert(name, tensor)]

    def join(self, name, parts):
        if len(parts) == 3:
            return fuse_wqkv(*parts, heads=self.heads, kv_heads=self.kv_heads)
        return parts[0]

    def base_name(self, trained):
        if self.name == "internlm2" and trained == "lm_head.weight":
            return "output.weight"
        return trained


def layout_for(config: dict) -> Layout:
    return InternLMLayout(config) if is_internlm(config) else Layout()
