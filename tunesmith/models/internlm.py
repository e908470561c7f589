"""InternLM v1 / InternLM2 checkpoints mapped onto transformers' LlamaForCausalLM (no remote code).

Both are Llama with other names: v1 adds a bias to q/k/v/o (`attention_bias=True`); v2 fuses q/k/v into one
`wqkv` laid out per key/value head as [q_0 .. q_{g-1}, k, v] (g = query heads per kv head) and renames
the rest. The rotary embedding is the same rotate-half form as Llama's, so no permutation is needed.
Conversion happens on the fly while loading; `models.convert.convert_internlm_folder` writes a converted copy.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch

from tunesmith.errors import TunesmithError

INTERNLM_MODEL_TYPES = ("internlm", "internlm2")
INTERNLM_TOKENIZER_CLASSES = ("InternLMTokenizer", "InternLM2Tokenizer")

_V2_RENAMES = [
    (r"^model\.tok_embeddings\.", "model.embed_tokens."),
    (r"\.attention\.wo\.", ".self_attn.o_proj."),
    (r"\.feed_forward\.w1\.", ".mlp.gate_proj."),
    (r"\.feed_forward\.w3\.", ".mlp.up_proj."),
    (r"\.feed_forward\.w2\.", ".mlp.down_proj."),
    (r"\.attention_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"^output\.", "lm_head."),
]
_WQKV = re.compile(r"^(model\.layers\.\d+)\.attention\.wqkv\.(weight|bias)$")


def is_internlm(config: dict) -> bool:
    return config.get("model_type") in INTERNLM_MODEL_TYPES


def llama_config_from_internlm(config: dict):
    """The LlamaConfig equivalent of an InternLM v1 / v2 config.json (given as a dict)."""
    from transformers import LlamaConfig

    kind = config["model_type"]
    heads = config["num_attention_heads"]
    hidden = config["hidden_size"]
    if kind == "internlm":
        rotary = config.get("rotary") or {}
        theta = float(rotary.get("base", 10000))
        # InternLM's "dynamic" rotary is the same dynamic-NTK formula transformers implements
        if rotary.get("type", "origin") == "dynamic":
            rope = {"rope_type": "dynamic", "factor": float(rotary.get("scaling_factor", 1.0))}
        else:
            rope = {"rope_type": "default"}
        kv_heads = heads
        bias = config.get("bias", True)
    else:
        theta = float(config.get("rope_theta", 10000))
        scaling = config.get("rope_scaling") or {}
        rope_type = scaling.get("rope_type", scaling.get("type"))
        if rope_type in ("dynamic", "linear"):
            rope = {"rope_type": rope_type, "factor": float(scaling["factor"])}
        elif rope_type in (None, "default"):
            rope = {"rope_type": "default"}
        else:
            raise TunesmithError(
                f"InternLM2 rope_scaling type {rope_type!r} is not supported by the native mapping",
                "use 'dynamic' or 'linear' in config.json, or --trust-remote-code",
            )
        kv_heads = config.get("num_key_value_heads", heads)
        bias = config.get("bias", True)
    rope["rope_theta"] = theta
    return LlamaConfig(
        vocab_size=config["vocab_size"],
        hidden_size=hidden,
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        hidden_act=config.get("hidden_act", "silu"),
        max_position_embeddings=config.get("max_position_embeddings", 2048),
        initializer_range=config.get("initializer_range", 0.02),
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        attention_bias=bool(bias),
        mlp_bias=False,
        rope_parameters=rope,
        tie_word_embeddings=config.get("tie_word_embeddings", False),
        bos_token_id=config.get("bos_token_id", 1),
        eos_token_id=config.get("eos_token_id", 2),
        pad_token_id=config.get("pad_token_id"),
        architectures=["LlamaForCausalLM"],
    )


def split_wqkv(fused: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """InternLM2's fused [kv_heads x (groups + 2) x head_dim] rows -> (q, k, v); works for weight and bias."""
    groups = heads // kv_heads
    rest = fused.shape[1:]
    grouped = fused.reshape(kv_heads, groups + 2, head_dim, *rest)
    q = grouped[:, :groups].reshape(heads * head_dim, *rest)
    k = grouped[:, -2].reshape(kv_heads * head_dim, *rest)
    v = grouped[:, -1].reshape(kv_heads * head_dim, *rest)
    return q.contiguous(), k.contiguous(), v.contiguous()


def convert_internlm_tensors(items, config: dict) -> Iterator[tuple[str, object]]:
    """(name, tensor) pairs in InternLM naming -> Llama naming. Lazy: one fused tensor at a time.

    Values may be tensors or safetensors slices; only InternLM2's wqkv is materialised (to split it).
    The rotary `inv_freq` buffers that old .bin files carry are dropped (the model recomputes them).
    """
    v2 = config["model_type"] == "internlm2"
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config["hidden_size"] // heads
    for name, value in items:
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if not v2:
            yield name, value
            continue
        fused = _WQKV.match(name)
        if fused:
            prefix, kind = fused.groups()
            tensor = value if isinstance(value, torch.Tensor) else value[:]
            q, k, v = split_wqkv(tensor, heads, kv_heads, head_dim)
            yield f"{prefix}.self_attn.q_proj.{kind}", q
            yield f"{prefix}.self_attn.k_proj.{kind}", k
            yield f"{prefix}.self_attn.v_proj.{kind}", v
            continue
        for pattern, repl in _V2_RENAMES:
            name = re.sub(pattern, repl, name)
        yield name, value


def _checkpoint_items(files: list[Path], stack: ExitStack) -> Iterator[tuple[str, object]]:
    """(name, lazy slice or tensor) for every tensor of the checkpoint files; never unpickles code."""
    from safetensors import safe_open

    for file in files:
        if file.suffix == ".safetensors":
            handle = stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            for key in handle.keys():
                yield key, handle.get_slice(key)
        else:
            yield from _load_bin(file).items()


def _load_bin(file: Path) -> dict:
    """A .bin state dict with weights_only (anything but tensors is refused, never executed); mmap when the
    file is in the zip format (torch >= 1.6), so shards are paged in lazily."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        return torch.load(file, map_location="cpu", weights_only=True)


def load_internlm(folder: Path, config: dict, **from_pretrained_kwargs):
    """LlamaForCausalLM with the weights of an InternLM v1 / v2 folder (quantization etc. pass through)."""
    from transformers import LlamaForCausalLM

    from tunesmith.models.resolve import weight_files

    llama_config = llama_config_from_internlm(config)
    with ExitStack() as stack:
        state = dict(convert_internlm_tensors(_checkpoint_items(weight_files(folder), stack), config))
        model = LlamaForCausalLM.from_pretrained(
            None, config=llama_config, state_dict=state, **from_pretrained_kwargs
        )
    model.config.name_or_path = str(folder)  # what exporters read as the base model
    model.name_or_path = str(folder)
    _load_generation_config(model, folder)
    return model


def _load_generation_config(model, folder: Path) -> None:
    from transformers import GenerationConfig

    if (folder / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(folder)
        except (OSError, ValueError):  # a stale or odd file: keep the one built from the config
            pass
