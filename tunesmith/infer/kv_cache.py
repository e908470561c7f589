"""The KV cache a `Generator` keeps between calls, and which prompt ids it holds.

Two layouts: a `DynamicCache` that grows per token (``static=False``: CPU, quantized or offloaded models), or a
`StaticCache` of a fixed capacity whose tensors keep their addresses, so a decode step recorded as a CUDA graph or
compiled over it can be replayed. A static cache is allocated in whole KiB-token steps (a chat that grows
re-allocates only now and then) and is cut back by moving its write position, never by reallocating; each new
static cache calls ``on_new`` (the generator drops the steps recorded over the old one).

When a new prompt starts with the ids already in the cache (the chat history), only the rest is prefilled
(:meth:`PromptCache.prepare`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class PromptCache:
    def __init__(self, model, *, static: bool, max_positions: int, on_new: Callable[[], None] = lambda: None):
        self.model, self.static, self.max_positions, self.on_new = model, static, max_positions, on_new
        self.cache = None
        self.capacity = 0  # of a static cache
        self.ids: list[int] = []  # ids whose keys/values are in the cache, in order

    def reset(self) -> None:
        """Forget the cached keys/values (the next prompt is prefilled from scratch)."""
        if self.cache is not None and self.static:
            try:
                self.crop(int(self.cache.get_seq_length()))
            except RuntimeError:
                self.cache = None
        else:
            self.cache = None
        self.ids = []

    def reserve(self, n_tokens: int) -> None:
        """Allocate a static cache for ``n_tokens`` now (so a compiled step is built once for that size)."""
        if self.static and (self.cache is None or self.capacity < n_tokens):
            self.cache = self._new(n_tokens)
            self.ids = []

    def _new(self, needed: int):
        from transformers import DynamicCache, StaticCache

        config = self.model.config
        if not self.static:
            return DynamicCache(config=config)
        length = -(-needed // 1024) * 1024
        if self.max_positions:
            length = min(length, max(self.max_positions, needed))
        self.capacity = length
        self.on_new()
        return StaticCache(config=config, max_cache_len=length)

    def crop(self, n_remove: int) -> None:
        """Drop the last ``n_remove`` positions."""
        if n_remove <= 0:
            return
        if not self.static:
            self.cache.crop(-n_remove)
            return
        # static layers: move the write position back in place (the tensors keep their static addresses);
        # older transformers v5 releases have no StaticLayer.crop
        with torch.inference_mode():
            for layer in self.cache.layers:
                if type(layer).__name__ != "StaticLayer":
                    raise RuntimeError(f"cannot crop a {type(layer).__name__}")
                if getattr(layer, "is_initialized", False):
                    layer.cumulative_length.sub_(n_remove)

    def prepare(self, prompt_ids: list[int], max_new: int) -> int:
        """Reuse the cached prefix of ``prompt_ids``; return how many prompt ids are already in the cache."""
        needed = len(prompt_ids) + max_new
        if self.cache is not None and self.static and needed > self.capacity:
            self.cache, self.ids = None, []  # too small: grow (recompiles the decode step once)
        if self.cache is None:
            self.cache = self._new(needed)
            self.ids = []
        # reconcile with what the cache really holds (a stream that was not read to its end leaves extra ids)
        actual = int(self.cache.get_seq_length())
        if actual > len(self.ids):
            self.crop(actual - len(self.ids))
        elif actual < len(self.ids):
            self.ids = self.ids[:actual]
        common = 0
        limit = min(len(self.ids), len(prompt_ids) - 1)  # at least one id must be run for the logits
        while common < limit and self.ids[common] == prompt_ids[common]:
            common += 1
        try:
            self.crop(len(self.ids) - common)
        except Exception:  # noqa: BLE001 - layers that cannot be cropped (sliding windows, ...): start over
            self.cache = self._new(needed)
            common = 0
        self.ids = self.ids[:common]
        return common

    def trim_to_ids(self) -> None:
        """A static cache may hold positions computed past a stop (a chunk ahead): cut them off."""
        if self.static:
            self.crop(int(self.cache.get_seq_length()) - len(self.ids))
