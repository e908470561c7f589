"""Which models `convert gguf` writes, as llama.cpp's `llama` architecture: the check, the hyper-parameters, the
tensor names and the one change of layout the architecture needs.

Llama, SmolLM2, Mistral without a sliding window, InternLM2 (its fused `wqkv` split into q / k / v by
export/layout.py: the same math as Llama) and InternLM v1 without biases are all the `llama` architecture.
InternLM v1 as internlm-chat-7b ships it has q / k / v / o biases: llama.cpp could read them, but GGUF readers
of this architecture (transformers', so tunesmith's own) build Llama without biases and drop them silently, so
a model with biases is refused rather than written into a file that answers differently.

llama.cpp applies rotary embeddings to adjacent pairs of a head's channels, Hugging Face's Llama to its two
halves; the converter therefore reorders the rows of q_proj and k_proj within each head (`permute_qk`), and
GGUF readers undo it.

Rope scaling: `linear` is written as GGUF's linear scaling; `llama3` (Llama 3.1 and later) as the
`rope_freqs` tensor of per-frequency factors that llama.cpp reads (transformers' GGUF reader ignores it);
`dynamic` (InternLM's dynamic NTK) has no GGUF form and only acts past the trained context, so it is left out
with a note; any other kind is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunesmith.errors import TunesmithError

ARCH = "llama"
SUPPORTED = ("Llama-family models (llama, SmolLM2, mistral without a sliding window), InternLM2, "
             "and InternLM v1 without biases")
CONVERT_ELSEWHERE = ("convert it with llama.cpp's convert_hf_to_gguf.py (for an adapter: run `tunesmith convert "
                     "merge` first and convert the merged folder)")
ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's per-frequency rope factors (llama3 scaling)


@dataclass
class LlamaShape:
    """The hyper-parameters a `llama` GGUF carries, read from the model's config (InternLM through its mapping)."""

    context_length: int
    embedding_length: int
    block_count: int
    feed_forward_length: int
    head_count: int
    head_count_kv: int
    head_dim: int
    rope_theta: float
    rms_eps: float
    vocab_size: int
    rope: dict = field(default_factory=dict)  # transformers' rope_parameters
    notes: list[str] = field(default_factory=list)

    def write(self, writer) -> None:
        import gguf

        writer.add_context_length(self.context_length)
        writer.add_embedding_length(self.embedding_length)
        writer.add_block_count(self.block_count)
        writer.add_feed_forward_length(self.feed_forward_length)
        writer.add_head_count(self.head_count)
        writer.add_head_count_kv(self.head_count_kv)
        writer.add_rope_dimension_count(self.head_dim)
        writer.add_rope_freq_base(self.rope_theta)
        writer.add_layer_norm_rms_eps(self.rms_eps)
        writer.add_vocab_size(self.vocab_size)
        if self.head_dim != self.embedding_length // self.head_count:
            writer.add_key_length(self.head_dim)
            writer.add_value_length(self.head_dim)
        if self.rope.get("rope_type") == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(self.rope["factor"]))

    def rope_freqs(self) -> torch.Tensor | None:
        """llama3 rope scaling as llama.cpp reads it: one factor per rotary frequency (None for other kinds)."""
        if self.rope.get("rope_type") != "llama3":
            return None
        factor = float(self.rope.get("factor", 8.0))
        low, high = float(self.rope.get("low_freq_factor", 1.0)), float(self.rope.get("high_freq_factor", 4.0))
        old_context = float(self.rope.get("original_max_position_embeddings", 8192))
        factors = []
        for i in range(0, self.head_dim, 2):
            wavelength = 2 * math.pi * self.rope_theta ** (i / self.head_dim)
            if wavelength < old_context / high:  # high frequencies: unchanged
                factors.append(1.0)
            elif wavelength > old_context / low:  # low frequencies: scaled by the whole factor
                factors.append(factor)
            else:  # in between: a smooth blend of the two
                smooth = (old_context / wavelength - low) / (high - low)
                factors.append(1.0 / ((1 - smooth) / factor + smooth))
        return torch.tensor(factors, dtype=torch.float32)


def _unsupported(folder: Path, what: str) -> TunesmithError:
    return TunesmithError(f"convert gguf writes {SUPPORTED}; {folder} is {what}", CONVERT_ELSEWHERE)


def _llama_config(folder: Path, config: dict):
    """transformers' config object for the model (InternLM through tunesmith's own mapping; no remote code)."""
    from transformers import AutoConfig

    from tunesmith.models.internlm import is_internlm, llama_config_from_internlm

    if is_internlm(config):
        return llama_config_from_internlm(config)
    settings = {k: v for k, v in config.items() if k not in ("model_type", "auto_map", "transformers_version")}
    return AutoConfig.for_model(config["model_type"], **settings)


def check_supported(folder: Path, config: dict, tensor_names: list[str]) -> None:
    """TunesmithError, before anything is written, for a model this writer cannot turn into a faithful GGUF."""
    kind = config.get("model_type")
    if kind not in ("llama", "mistral", "internlm", "internlm2"):
        arch = ", ".join(config.get("architectures") or []) or "no architecture"
        raise _unsupported(folder, f"model_type {kind!r} ({arch})")
    if kind == "mistral":
        window = config.get("sliding_window")
        if window is not None and window < config.get("max_position_embeddings", 0):
            raise _unsupported(folder, f"a mistral model with a {window}-token sliding window, which the llama "
                                       "architecture does not have")
    biases = [n for n in tensor_names if n.endswith(".bias")]
    if biases:
        family = "an InternLM v1 model" if kind == "internlm" else f"a {kind} model"
        raise _unsupported(folder, f"{family} with attention / MLP biases ({biases[0]} ...), which GGUF readers of "
                                   "the llama architecture drop")


def read_shape(folder: Path, config: dict) -> LlamaShape:
    view = _llama_config(folder, config)
    heads = view.num_attention_heads
    rope = dict(getattr(view, "rope_parameters", None) or {})
    if not rope:  # transformers v4 names
        rope = dict(getattr(view, "rope_scaling", None) or {})
        rope.setdefault("rope_theta", getattr(view, "rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    rope["rope_type"] = rope_type
    shape = LlamaShape(
        context_length=int(view.max_position_embeddings),
        embedding_length=int(view.hidden_size),
        block_count=int(view.num_hidden_layers),
        feed_forward_length=int(view.intermediate_size),
        head_count=int(heads),
        head_count_kv=int(getattr(view, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(view, "head_dim", None) or view.hidden_size // heads),
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        rms_eps=float(view.rms_norm_eps),
        vocab_size=int(view.vocab_size),
        rope=rope,
    )
    if rope_type == "dynamic":
        shape.notes.append(f"rope scaling 'dynamic' (dynamic NTK) has no GGUF form and was left out: the same "
                           f"within the trained context of {shape.context_length} tokens")
    elif rope_type == "llama3":
        shape.notes.append("llama3 rope scaling written as the rope_freqs tensor (llama.cpp reads it; "
                           "transformers' GGUF reader does not)")
    elif rope_type not in ("default", "linear"):
        raise _unsupported(folder, f"a model with rope scaling {rope_type!r}")
    return shape


def is_buffer(trained: str) -> bool:
    """Tensors old checkpoints carry that are recomputed, not weights (rotary inv_freq): not written."""
    return trained.endswith("rotary_emb.inv_freq")


def gguf_names(block_count: int):
    """trained-model tensor name -> GGUF tensor name (gguf's own table for the llama architecture)."""
    import gguf

    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, block_count)

    def name(trained: str) -> str:
        found = table.get_name(trained, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise TunesmithError(f"tensor {trained} has no place in a llama-architecture GGUF",
                                 CONVERT_ELSEWHERE)
        return found

    return name


def permute_qk(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q_proj / k_proj weight (or bias) from the half-split rotary layout to llama.cpp's adjacent pairs:
    within each head, row j of the first half and row j of the second half become rows 2j and 2j + 1."""
    rows = tensor.shape[0]
    rest = tensor.shape[1:]
    return tensor.reshape(heads, 2, rows // heads // 2, *rest).transpose(1, 2).reshape(tensor.shape)


def rotary_heads(trained: str, shape: LlamaShape) -> int | None:
    """The head count to permute a tensor by (q_proj: query heads, k_proj: key/value heads), None for others."""
    if trained.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
        return shape.head_count
    if trained.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
        return shape.head_count_kv
    return None
