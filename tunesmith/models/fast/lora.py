"""Fused LoRA forward: ``base(x) + s * B(A(dropout(x)))`` as one ``addmm`` in the activation dtype.

peft keeps adapter weights in fp32 (right: AdamW needs fp32 masters) and therefore casts every LoRA input to
fp32: in a bf16 model each adapted linear makes an fp32 copy of its input, runs dropout and both low-rank
matmuls in fp32 (no tensor cores at full rate), writes an fp32 ``[tokens, out]`` product, scales it in a
separate pass and adds it to the bf16 base output in another. With LoRA on all seven linears of a layer that
is the larger part of a LoRA step's memory traffic.

The fast path keeps the arithmetic and the fp32 parameters, and only changes where the casts go: the
(tiny) adapter weights are cast to the activation dtype, dropout and the low-rank matmuls run in that dtype,
and scale + add are folded into a single ``torch.addmm(result, h, B.T, alpha=scaling)``. Gradients still
reach the fp32 parameters in fp32. Dropout draws its mask from the same ``nn.Dropout`` module at the same
point as peft, so with the same seed the same elements are dropped.

It is applied by giving each peft LoRA layer a subclass of its own class (a module swap that keeps the
parameters, state-dict keys, merge/unmerge and saving untouched); anything the fused form does not cover
(several active adapters, DoRA and other variants, LoRA bias, merged or disabled adapters, mixed-adapter
batches) calls peft's own forward.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

_FAST_CLASSES: dict[type, type] = {}
_SWITCHABLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its adapter layers


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    plain = super(type(self), self).forward
    if self.disable_adapters or self.merged or args or kwargs:
        return plain(x, *args, **kwargs)
    active = self.active_adapters
    if len(active) != 1:
        return plain(x, *args, **kwargs)
    name = active[0]
    if (
        name not in self.lora_A
        or name in getattr(self, "lora_variant", {})
        or getattr(self, "use_dora", {}).get(name, False)
        or getattr(self, "lora_bias", {}).get(name, False)
        or self.lora_A[name].bias is not None
        or self.lora_B[name].bias is not None
        or hasattr(self.lora_A[name].weight, "ds_id")  # ZeRO-3 gathers it only inside lora_A's own forward
    ):
        return plain(x, *args, **kwargs)
    result = self.base_layer(x)
    dtype = result.dtype
    a = self.lora_A[name].weight
    b = self.lora_B[name].weight
    h = F.linear(self.lora_dropout[name](x.to(dtype)), a.to(dtype))
    out_features = result.shape[-1]
    fused = torch.addmm(
        result.reshape(-1, out_features), h.reshape(-1, h.shape[-1]), b.to(dtype).t(), alpha=self.scaling[name]
    )
    return fused.view(result.shape)


def _fast_class(cls: type) -> type:
    fast = _FAST_CLASSES.get(cls)
    if fast is None:
        fast = type(f"Fused{cls.__name__}", (cls,), {"forward": _fused_forward, "__module__": __name__})
        _FAST_CLASSES[cls] = fast
    return fast


def is_fused(module: nn.Module) -> bool:
    return type(module) in _FAST_CLASSES.values()


def apply_fused_lora(model: nn.Module) -> int:
    """Give every peft LoRA ``Linear`` (plain and bitsandbytes 4/8-bit) the fused forward. Returns how many."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return 0
    count = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or is_fused(module):
            continue
        if not isinstance(getattr(module, "lora_A", None), nn.ModuleDict):
            continue
        if type(module).__name__ not in ("Linear", "Linear4bit", "Linear8bitLt"):
            continue  # embeddings, convs, ...: peft's own forward
        module.__class__ = _fast_class(type(module))
        count += 1
    return count


def remove_fused_lora(model: nn.Module) -> int:
    """Undo :func:`apply_fused_lora` (before merging or exporting, for instance)."""
    count = 0
    for module in model.modules():
        if is_fused(module):
            module.__class__ = type(module).__mro__[1]
            count += 1
    return count


def _switchable_layers(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that peft switches on ``disable_adapter`` (tuner layers and the wrappers of
    ``modules_to_save``), found once per model."""
    layers = _SWITCHABLE.get(model)
    if layers is None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        try:
            from peft.utils.other import AuxiliaryTrainingWrapper as Wrapper
        except ImportError:  # older peft
            from peft.utils.other import ModulesToSaveWrapper as Wrapper
        layers = [m for m in model.modules() if isinstance(m, (BaseTunerLayer, Wrapper))]
        _SWITCHABLE[model] = layers
    return layers


@contextlib.contextmanager
def adapter_off(model: nn.Module) -> Iterator[None]:
    """Run a peft LoRA model as its base model inside the block (DPO's reference for LoRA / QLoRA).

    What peft's ``disable_adapter`` does for the forward pass, at a fraction of its cost: peft also takes a census
    of every module (``get_model_status``) and flips ``requires_grad`` on every adapter weight on the way in and
    out, about 60 ms of host time per use at 7B with LoRA on all linears, paid once per micro-batch by the DPO step
    and each time a new compiled-graph guard (``requires_grad``) to check. Here each adapter layer's own
    ``disable_adapters`` flag is set and restored; parameters and their ``requires_grad`` are left alone, which is
    right for the no-grad reference pass this is for. Equal outputs: tests/models/fast/test_lora.py."""
    if not hasattr(model, "disable_adapter"):
        raise ValueError("the adapter-off reference needs a peft model (method lora or qlora)")
    config = model.peft_config[model.active_adapter] if hasattr(model, "peft_config") else None
    if config is not None and (config.is_prompt_learning or getattr(config, "is_adaption_prompt", False)):
        with model.disable_adapter():  # adapters that are not layers: peft's own switch
            yield
        return
    layers = _switchable_layers(model)
    before = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer, was in zip(layers, before):
            layer._disable_adapters = was
