"""A PEFT LoRA adapter folder read as plain updates to base tensors, without building any model.

Each saved key (PEFT's layout: `base_model.model.<module>.lora_A.weight`, `...base_layer.bias`,
`<modules_to_save module>.weight`) becomes an update of one tensor of the trained model:

- a low-rank delta `scale * B @ A` (scale = alpha / r, or alpha / sqrt(r) with rslora; per-module r and alpha
  from rank_pattern / alpha_pattern as PEFT matches them); embeddings use the transpose; fan_in_fan_out
  (GPT-2 Conv1D) too; a LoRA bias (lora_bias) adds `scale * B.bias` to the module's bias;
- a replacement (trained biases, modules_to_save copies).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunesmith.errors import TunesmithError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")

_LORA = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.(?P<param>weight|bias)$")
_LORA_EMB = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_embedding_A|lora_embedding_B)$")
_PREFIX = "base_model.model."

# adapter features a weight merge cannot reproduce here, with the reason
_UNSUPPORTED = {
    "use_dora": "DoRA adapters (use_dora) are not supported by the streaming merge",
    "trainable_token_indices": "trainable-token adapters (trainable_token_indices) are not supported",
    "layer_replication": "adapters with layer_replication change the model's structure and cannot be merged here",
    "target_parameters": "adapters on nn.Parameter targets (target_parameters) are not supported",
    "use_qalora": "QA-LoRA adapters (use_qalora) are not supported",
    "alora_invocation_tokens": "activated LoRA (alora) adapters only apply after their invocation tokens: "
                               "they cannot be merged into weights",
}


@dataclass
class LoraDelta:
    a: torch.Tensor
    b: torch.Tensor
    scale: float
    embedding: bool = False
    fan_in_fan_out: bool = False

    def add_to(self, w: torch.Tensor) -> None:
        """w += scale * B @ A (transposed for embeddings / fan_in_fan_out), one fused fp32 matmul on w's device."""
        a = self.a.to(device=w.device, dtype=torch.float32)
        b = self.b.to(device=w.device, dtype=torch.float32)
        if self.embedding or self.fan_in_fan_out:
            w.addmm_(a.T, b.T, alpha=self.scale)
        else:
            w.addmm_(b, a, alpha=self.scale)


@dataclass
class Update:
    replace: torch.Tensor | None = None
    deltas: list[LoraDelta] = field(default_factory=list)
    bias_add: list[tuple[torch.Tensor, float]] = field(default_factory=list)  # lora_B.bias * scale

    def apply(self, base: torch.Tensor, device: torch.device, *, owned: bool = False) -> torch.Tensor:
        """The updated tensor in fp32 on `device` (the caller casts it). `owned`: `base` may be modified."""
        source = self.replace if self.replace is not None else base
        if not self.deltas and not self.bias_add:
            return source.to(device=device, dtype=torch.float32)
        w = source.to(device=device, dtype=torch.float32, copy=not (owned and self.replace is None))
        for d in self.deltas:
            d.add_to(w)
        for bias, scale in self.bias_add:
            w += bias.to(device=device, dtype=torch.float32) * scale
        return w


@dataclass
class Adapter:
    folder: Path
    config: dict
    updates: dict[str, Update]  # trained-model tensor name -> update
    lora_modules: list[str]
    replaced: list[str]

    @property
    def base_model_name_or_path(self) -> str | None:
        return self.config.get("base_model_name_or_path")


def _pattern_value(patterns: dict, key: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first pattern matching the end of the module name."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def read_adapter_config(folder: Path) -> dict:
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        hint = "pass the folder written by `tunesmith convert pth_to_hf` (adapter_config.json + adapter_model.*)"
        if (folder / "config.json").is_file():
            hint = "this looks like a full model, not an adapter: " + hint
        raise TunesmithError(f"{folder} is not a PEFT adapter folder (no {ADAPTER_CONFIG})", hint)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TunesmithError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}",
                             "write the adapter again with convert pth_to_hf") from None
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise TunesmithError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA",
                             "only LoRA / QLoRA adapters can be merged into the weights")
    for key, reason in _UNSUPPORTED.items():
        if config.get(key):
            raise TunesmithError(f"{path}: {reason}", "merge it with peft's merge_and_unload instead")
    return config


def adapter_weights_file(folder: Path) -> Path:
    for name in ADAPTER_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    raise TunesmithError(f"adapter folder {folder} has no adapter_model.safetensors or adapter_model.bin",
                         "the adapter is incomplete: write it again with convert pth_to_hf")


def _trained_name(key: str) -> str:
    name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
    name = name.replace(".base_layer.", ".")
    return re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)


def read_adapter(folder: str | Path) -> Adapter:
    """Parse an adapter folder into per-tensor updates (TunesmithError for anything unexpected)."""
    from tunesmith.export.shards import load_state_dict

    folder = Path(folder)
    if not folder.is_dir():
        raise TunesmithError(f"adapter folder {folder} does not exist",
                             "pass the folder written by `tunesmith convert pth_to_hf`")
    config = read_adapter_config(folder)
    state = load_state_dict(adapter_weights_file(folder))
    alpha = config.get("lora_alpha", 8)
    rank = config.get("r", 8)
    rslora = bool(config.get("use_rslora", False))
    fan = bool(config.get("fan_in_fan_out", False))

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    updates: dict[str, Update] = {}
    replaced: list[str] = []
    for key, tensor in state.items():
        m = _LORA.match(key) or _LORA_EMB.match(key)
        if m:
            kind = m.group("kind")
            if "param" in m.groupdict() and m.group("param") == "bias":
                kind += ".bias"
            pairs.setdefault(_trained_name(m.group("module")), {})[kind] = tensor
            continue
        if "lora_" in key or "trainable_tokens" in key:
            raise TunesmithError(f"{folder}: adapter key {key!r} is of a kind this merge does not know",
                                 "merge it with peft's merge_and_unload instead")
        name = _trained_name(key)
        updates.setdefault(name, Update()).replace = tensor
        replaced.append(name)

    for module, parts in sorted(pairs.items()):
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a = parts.get("lora_embedding_A" if embedding else "lora_A")
        b = parts.get("lora_embedding_B" if embedding else "lora_B")
        if a is None or b is None:
            raise TunesmithError(f"{folder}: module {module} has only one of its two LoRA matrices",
                                 "the adapter file is incomplete: write it again with convert pth_to_hf")
        r = _pattern_value(config.get("rank_pattern"), module, rank)
        if a.shape[0] != r or b.shape[1] != r:
            raise TunesmithError(f"{folder}: module {module} has LoRA rank {a.shape[0]}, adapter_config.json says {r}",
                                 "adapter_config.json does not belong to these weights")
        al = _pattern_value(config.get("alpha_pattern"), module, alpha)
        scale = al / math.sqrt(r) if rslora else al / r
        weight = module + ".weight"
        updates.setdefault(weight, Update()).deltas.append(
            LoraDelta(a, b, scale, embedding=embedding, fan_in_fan_out=fan and not embedding))
        if "lora_B.bias" in parts:
            updates.setdefault(module + ".bias", Update()).bias_add.append((parts["lora_B.bias"], scale))
    return Adapter(folder, config, updates, sorted(pairs), sorted(replaced))
