"""Model loading (local / hub / GGUF / builtin, InternLM mapped natively, 4/8-bit) and training preparation.

Public API (docs/internals.md):
    resolve_model_path(name_or_path) -> Path
    load_tokenizer(path, trust_remote_code=False)
    load_model(path, *, dtype="auto", bits=None, device_map=None, trust_remote_code=False,
               attn_implementation="auto", quant_type="nf4", double_quant=True, compute_dtype="auto",
               quant_storage=None, offload_folder=None)
    prepare_for_training(model, cfg) -> model
    count_parameters(model) -> (trainable, total)
    convert_internlm_folder(src, dst)
"""

from tunesmith.models.builtin import BUILTIN_MODELS, builtin_names
from tunesmith.models.cache import cache_root
from tunesmith.models.convert import convert_internlm_folder
from tunesmith.models.internlm import llama_config_from_internlm
from tunesmith.models.load import load_model, needs_remote_code
from tunesmith.models.lora import (
    count_parameters,
    find_all_linear_names,
    prepare_for_training,
)
from tunesmith.models.quantize import auto_dtype, pick_dtype
from tunesmith.models.resolve import (
    BUILTIN_PREFIX,
    read_config,
    resolve_model_path,
    weight_files,
)
from tunesmith.models.tokenizer import load_tokenizer

__all__ = [
    "BUILTIN_MODELS",
    "BUILTIN_PREFIX",
    "auto_dtype",
    "builtin_names",
    "cache_root",
    "convert_internlm_folder",
    "count_parameters",
    "find_all_linear_names",
    "llama_config_from_internlm",
    "load_model",
    "load_tokenizer",
    "needs_remote_code",
    "pick_dtype",
    "prepare_for_training",
    "read_config",
    "resolve_model_path",
    "weight_files",
]
