"""`--type`: the storage type of each GGUF tensor, and the tensor encoded as the bytes GGUF stores.

The conventions are llama.cpp's (convert_hf_to_gguf.py, llama-quantize):
- 1-D tensors (norms, rope factors) stay f32: llama.cpp's kernels expect them so;
- f32 / f16 / bf16: every 2-D tensor in that type, token_embd and output included;
- q8_0: every 2-D tensor in Q8_0, token_embd and output included (as convert_hf_to_gguf.py --outtype q8_0);
- q4_0: 2-D tensors in Q4_0, except the output projection (output.weight, or token_embd when the head is tied to
  it), which is kept at Q8_0: llama-quantize keeps it at higher precision (Q6_K, which the gguf package cannot
  write) because 4-bit rounding there costs the most quality;
- a tensor whose rows do not split into the type's blocks (32 values) is written as f16 instead.

Only types the gguf package can encode are offered. K-quants (q4_k_m ...) are refused: write f16 and quantize
it with llama.cpp's llama-quantize.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from tunesmith.errors import TunesmithError, unknown_name_error

TYPES = ("f16", "bf16", "q8_0", "q4_0", "f32")
# llama-quantize's k-quants, i-quants and ternary types: no encoder in the gguf package
_NEEDS_LLAMA_CPP = re.compile(r"^(q\d_k(_[sml])?|iq\d\w*|tq\d_0)$")


@dataclass(frozen=True)
class OutType:
    name: str
    default: object  # gguf.GGMLQuantizationType of 2-D tensors
    head: object  # ... of the output projection
    file_type: int  # gguf.LlamaFileType

    def for_tensor(self, shape: tuple[int, ...], *, is_head: bool = False):
        """The storage type of one tensor (falls back to F16 when its rows do not fit the blocks)."""
        import gguf

        if len(shape) < 2:
            return gguf.GGMLQuantizationType.F32
        qtype = self.head if is_head else self.default
        block, _ = gguf.GGML_QUANT_SIZES[qtype]
        if shape[-1] % block:
            return gguf.GGMLQuantizationType.F16
        return qtype


def out_type(name: str) -> OutType:
    import gguf

    Q = gguf.GGMLQuantizationType
    F = gguf.LlamaFileType
    key = str(name).lower().replace("-", "_")
    table = {
        "f32": OutType("f32", Q.F32, Q.F32, F.ALL_F32),
        "f16": OutType("f16", Q.F16, Q.F16, F.MOSTLY_F16),
        "bf16": OutType("bf16", Q.BF16, Q.BF16, F.MOSTLY_BF16),
        "q8_0": OutType("q8_0", Q.Q8_0, Q.Q8_0, F.MOSTLY_Q8_0),
        "q4_0": OutType("q4_0", Q.Q4_0, Q.Q8_0, F.MOSTLY_Q4_0),
    }
    if key in table:
        return table[key]
    if _NEEDS_LLAMA_CPP.match(key):
        raise TunesmithError(
            f"--type {name} cannot be written here: the gguf package has no encoder for it (only "
            f"{', '.join(TYPES)})",
            f"write --type f16, then quantize with llama.cpp: llama-quantize OUT.gguf OUT-{key.upper()}.gguf "
            f"{key.upper()}",
        )
    raise unknown_name_error("--type", name, TYPES)


def nbytes(qtype, shape: tuple[int, ...]) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    count = 1
    for n in shape:
        count *= n
    return count // block * size


def encode(tensor: torch.Tensor, qtype) -> np.ndarray:
    """`tensor` as the bytes (or f16 / f32 values) GGUF stores for `qtype`, row-major as the tensor is."""
    import gguf

    Q = gguf.GGMLQuantizationType
    t = tensor.detach().cpu().contiguous()
    if qtype == Q.F32:
        return t.to(torch.float32).numpy()
    if qtype == Q.F16:
        return t.to(torch.float16).numpy()
    if qtype == Q.BF16:  # numpy has no bfloat16: torch rounds, the raw 16-bit patterns are written
        return t.to(torch.bfloat16).view(torch.int16).numpy()
    return gguf.quants.quantize(t.to(torch.float32).numpy(), qtype)
