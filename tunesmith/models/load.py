"""load_model: any supported checkpoint as a transformers causal LM, in the right dtype, optionally 4/8-bit."""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path

import torch

from tunesmith.errors import TunesmithError
from tunesmith.models.internlm import is_internlm, load_internlm
from tunesmith.models.quantize import bnb_config, pick_dtype
from tunesmith.models.resolve import read_config, resolve_model_path

_ATTN = ("auto", "sdpa", "eager", "flash_attention_2", "flex_attention")


def needs_remote_code(config: dict) -> bool:
    """True when config.json names an architecture this transformers lacks (and we do not map natively)."""
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    return not is_internlm(config) and model_type not in CONFIG_MAPPING


def check_loadable(folder: Path, config: dict, trust_remote_code: bool) -> None:
    """TunesmithError for a model that needs remote code which the user did not allow."""
    if trust_remote_code or not needs_remote_code(config):
        return
    import transformers

    model_type = config.get("model_type")
    arch = ", ".join(config.get("architectures") or []) or "?"
    if config.get("auto_map"):
        raise TunesmithError(
            f"{folder} needs remote code: model_type {model_type!r} ({arch}) is not built into "
            f"transformers {transformers.__version__} and its config.json points at Python files in the folder",
            "if you trust that code: --trust-remote-code (chat, serve, eval, merge) or "
            "model.trust_remote_code: true (train)",
        )
    raise TunesmithError(
        f"{folder}: model_type {model_type!r} ({arch}) is unknown to transformers {transformers.__version__}",
        "upgrade transformers (pip install -U transformers) or check config.json",
    )


def load_model(
    path: str | Path,
    *,
    dtype: str | torch.dtype = "auto",
    bits: int | None = None,
    device_map=None,
    trust_remote_code: bool = False,
    attn_implementation: str = "auto",
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: str | torch.dtype = "auto",
    quant_storage: str | torch.dtype | None = None,
    offload_folder: str | None = None,
    quantization=None,
):
    """A causal LM from `path` (anything resolve_model_path accepts), in eval mode as transformers returns it.

    dtype 'auto': bf16 on GPUs that support it, fp16 on older ones, fp32 on CPU. bits 4 = NF4 (+ double
    quant), 8 = LLM.int8, via bitsandbytes (its CPU backend works too). InternLM v1 / v2 are mapped onto
    LlamaForCausalLM whatever trust_remote_code says: their remote code predates transformers 5.
    `quantization` (a config QuantizationSection) supplies bits and the quant_* arguments in one go.
    """
    if quantization is not None:
        bits = bits if bits is not None else quantization.bits
        quant_type, double_quant = quantization.quant_type, quantization.double_quant
        compute_dtype, quant_storage = quantization.compute_dtype, quantization.quant_storage
    folder = resolve_model_path(path)
    config = read_config(folder)
    check_loadable(folder, config, trust_remote_code)
    torch_dtype = pick_dtype(dtype)
    kwargs: dict = {"dtype": torch_dtype}
    if attn_implementation not in _ATTN:
        raise TunesmithError(f"unknown attention implementation {attn_implementation!r}", f"use one of {_ATTN}")
    if attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise TunesmithError(
            "attn_implementation flash_attention_2 needs the flash-attn package", "pip install flash-attn, or use sdpa"
        )
    if attn_implementation != "auto":  # auto: transformers picks sdpa where the model supports it
        kwargs["attn_implementation"] = attn_implementation
    if bits is not None:
        kwargs["quantization_config"] = bnb_config(
            bits,
            weights_dtype=torch_dtype,
            quant_type=quant_type,
            double_quant=double_quant,
            compute_dtype=compute_dtype,
            quant_storage=quant_storage,
        )
        if device_map is None:
            # bitsandbytes quantizes while placing weights: say where, or it stays on the CPU path
            device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if offload_folder is not None:
        kwargs["offload_folder"] = offload_folder
    try:
        if is_internlm(config):
            return load_internlm(folder, config, **kwargs)
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=trust_remote_code, **kwargs)
    except pickle.UnpicklingError:
        raise TunesmithError(
            f"{folder}: a .bin checkpoint holds pickled Python objects besides tensors; refusing to load it "
            "(unpickling can run arbitrary code)",
            "convert it to safetensors in an environment you trust, or use a safetensors copy of the model",
        ) from None
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise TunesmithError(
                f"{folder} needs remote code to load",
                "if you trust the code in that folder: --trust-remote-code (chat, serve, eval, merge) or "
                "model.trust_remote_code: true (train)",
            ) from None
        if "Unrecognized configuration class" in str(exc):
            raise TunesmithError(
                f"{folder} holds a {config.get('model_type')!r} model, which is not a causal language model",
                "pass a decoder (chat / base LLM) model folder",
            ) from None
        raise
