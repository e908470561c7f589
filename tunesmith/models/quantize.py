"""Precision choices: the weights dtype by hardware, and bitsandbytes 4-bit (NF4) / 8-bit configs."""

from __future__ import annotations

import importlib.util
import logging

import torch

from tunesmith.errors import TunesmithError

# peft imports bitsandbytes whenever it is installed (peft/helpers.py), so every run that uses peft, plain LoRA
# included, imports it. On a CPU with AVX512-BF16, bitsandbytes then logs at import that it could not fetch an
# optional CPU 4-bit matmul from the Hugging Face hub through the `kernels` package. Harmless: it falls back to
# the kernel it ships, which serves only 4-bit inference (training keeps its own differentiable matmul, see
# models/lora.py keep_4bit_differentiable), and tunesmith would not download kernel code at run time anyway.
# That one message is dropped; everything else bitsandbytes logs is kept.
KERNELS_HUB_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropKernelsHubNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(KERNELS_HUB_NOTICE)


_bnb_cpu_log = logging.getLogger("bitsandbytes.backends.cpu.ops")  # the logger bitsandbytes logs it to
if not any(isinstance(f, _DropKernelsHubNotice) for f in _bnb_cpu_log.filters):
    _bnb_cpu_log.addFilter(_DropKernelsHubNotice())

_NAMES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}


DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def auto_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """The one "auto" rule: bf16 on a CUDA GPU that supports it, fp16 on older GPUs, fp32 on the CPU. ``device``:
    where the weights will compute (default: a CUDA GPU when there is one)."""
    on_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if on_cuda:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device | str | None = None, *,
               what: str = "dtype") -> torch.dtype:
    """'auto' / None -> auto_dtype(device); 'bf16' | 'fp16' | 'fp32' (or torch names, or a torch.dtype) as given.
    ``what`` names the setting in the error (a flag or a config key)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or str(dtype).lower() == "auto":
        return auto_dtype(device)
    try:
        return _NAMES[str(dtype).lower()]
    except KeyError:
        raise TunesmithError(f"unknown {what} {dtype!r}", "use auto, bf16, fp16 or fp32") from None


def require_bitsandbytes(bits: int) -> None:
    if bits not in (4, 8):
        raise TunesmithError(f"--bits (quantization.bits) must be 4 or 8, not {bits}",
                             "4 = NF4 (QLoRA), 8 = LLM.int8, or leave it unset")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise TunesmithError(
            f"--bits {bits} needs bitsandbytes, which is not installed",
            "pip install 'tunesmith[qlora]' (or leave out --bits / quantization.bits)",
        )


def bnb_config(
    bits: int,
    *,
    weights_dtype: torch.dtype,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: str | torch.dtype = "auto",
    quant_storage: str | torch.dtype | None = None,
):
    """A transformers BitsAndBytesConfig. compute 'auto' = the weights dtype (bf16 / fp16 / fp32 on CPU).

    quant_storage: the dtype packed 4-bit weights are stored in; ZeRO-3 needs it equal to the other
    parameters' dtype so it can shard them together (default uint8).
    """
    require_bitsandbytes(bits)
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = weights_dtype if compute_dtype in (None, "auto") else pick_dtype(compute_dtype)
    kwargs = {}
    if quant_storage is not None:
        kwargs["bnb_4bit_quant_storage"] = pick_dtype(quant_storage)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute,
        **kwargs,
    )
