"""What kind of model the decoder has in hand: under a peft wrapper, quantized, offloaded, with a static-cache
layout that can be rewound, and what its forward calls the cache argument."""

from __future__ import annotations

import inspect


def inductor_has(name: str) -> bool:
    try:
        from torch._inductor import config
    except ImportError:  # pragma: no cover
        return False
    return hasattr(config, name)


def plain_static_layers(config) -> bool:
    """True when a StaticCache for this model is made of plain full-attention layers only (no sliding-window
    or linear-attention layers, whose static forms cannot be rewound in place)."""
    try:
        from transformers import StaticCache

        cache = StaticCache(config=config, max_cache_len=8)  # tensors are allocated lazily: this is cheap
    except Exception:  # noqa: BLE001
        return False
    return all(type(layer).__name__ == "StaticLayer" for layer in cache.layers)


def unwrap_model(model):
    """The transformers model under a peft wrapper (LoRA layers live inside it, so calling it uses them)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def cache_kwarg(model) -> str:
    """transformers >= 5.2x calls the cache argument `cache`; earlier v5 releases `past_key_values`."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None))


def is_offloaded(model) -> bool:
    device_map = getattr(model, "hf_device_map", None) or {}
    return any(str(v) in {"cpu", "disk"} for v in device_map.values()) and len(set(map(str, device_map.values()))) > 1
