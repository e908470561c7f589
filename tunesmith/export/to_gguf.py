"""`convert gguf`: a model (and optionally a LoRA adapter merged into it) written as one GGUF file, streamed.

    export_gguf("builtin:smollm2-135m-instruct", "smollm2.gguf", adapter="hf", out_type="q8_0", ollama=True)

Nothing is built and the whole model is never in memory: the GGUF header, metadata and tensor table are written
first (names, shapes and storage types are known from the checkpoint headers), then each tensor is read, merged
with its LoRA update when there is an adapter (export/merge.py's own per-tensor merge, in fp32), reordered for
llama.cpp's rotary layout (q / k), encoded (export/gguf_types.py) and appended. Peak memory is about one tensor
in fp32 plus its encoding (the embedding, usually), plus the adapter and the vocabulary.

What goes in: gguf_model.py (which models, hyper-parameters, tensor names), gguf_vocab.py (tokenizer: the
adapter folder's when it has one, since it carries the training chat template), gguf_types.py (--type).
The file is written under a temporary name and renamed at the end: an error or Ctrl-C leaves nothing under OUT.
With `ollama`, a Modelfile (export/modelfile.py) is written beside it.
"""

from __future__ import annotations

import importlib.util
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tunesmith.errors import TunesmithError
from tunesmith.export.adapter import read_adapter
from tunesmith.export.folder import check_free_space, has_tokenizer
from tunesmith.export.gguf_model import (
    ARCH,
    ROPE_FREQS,
    check_supported,
    gguf_names,
    is_buffer,
    permute_qk,
    read_shape,
    rotary_heads,
)
from tunesmith.export.gguf_types import encode, nbytes
from tunesmith.export.gguf_types import out_type as parse_type
from tunesmith.export.gguf_vocab import read_vocab
from tunesmith.export.layout import layout_for
from tunesmith.export.merge import (
    EMBED,
    HEAD,
    check_full_precision,
    iter_trained_tensors,
    pick_device,
    plan_merge,
)
from tunesmith.export.modelfile import choose_prompt, modelfile_text
from tunesmith.export.shards import list_tensors
from tunesmith.files import atomic_path, check_outputs, write_text_atomic
from tunesmith.models import load_tokenizer
from tunesmith.models.resolve import read_config, resolve_model_path, weight_files

MODELFILE = "Modelfile"


@dataclass
class GGUFResult:
    path: Path
    out_type: str
    tensors: int
    total_bytes: int
    seconds: float
    vocab: str  # "gpt2 (pre smollm)" / "llama (sentencepiece)"
    modelfile: Path | None = None
    template: str | None = None  # the Modelfile's prompt template
    notes: list[str] = field(default_factory=list)


@dataclass
class _Entry:
    trained: str  # name in the trained (Llama) model
    name: str  # GGUF name
    shape: tuple[int, ...]
    qtype: object  # gguf.GGMLQuantizationType
    nbytes: int


def _check_destination(out: Path, modelfile: Path | None, *, overwrite: bool, inputs: dict) -> None:
    if out.suffix != ".gguf":
        raise TunesmithError(f"the output {out} does not end in .gguf", "name the file e.g. model.gguf")
    check_outputs(inputs, {"OUT": out, "Modelfile": modelfile})
    for path in (out, modelfile):
        if path is None or not path.exists():
            continue
        if path.is_dir():
            raise TunesmithError(f"the destination {path} exists and is a folder", "choose another OUT")
        if not overwrite:
            raise TunesmithError(f"the destination {path} already exists", "choose another OUT, or pass --overwrite")


def _model_name(model: str, base_dir: Path, adapter_dir: Path | None) -> str:
    name = model[len("builtin:"):] if model.startswith("builtin:") else base_dir.name
    return f"{name} + {adapter_dir.name}" if adapter_dir is not None else name


def _table(parts: list[tuple[str, tuple[int, ...]]], kind, to_gguf, rope_freqs) -> list[_Entry]:
    """The GGUF tensor table, in the order the data will follow: the rope factors (llama3 scaling), then the
    model's tensors in the checkpoint's order (an untied head last)."""
    entries = []
    if rope_freqs is not None:
        qtype = kind.for_tensor(tuple(rope_freqs.shape))
        entries.append(_Entry(ROPE_FREQS, ROPE_FREQS, tuple(rope_freqs.shape), qtype, nbytes(qtype, rope_freqs.shape)))
    has_head = any(n == HEAD for n, _ in parts)
    for trained, shape in parts:
        is_head = trained == HEAD or (trained == EMBED and not has_head)  # a tied embedding is the head too
        qtype = kind.for_tensor(tuple(shape), is_head=is_head)
        entries.append(_Entry(trained, to_gguf(trained), tuple(shape), qtype, nbytes(qtype, shape)))
    return entries


def _write_tensors(writer, entries: list[_Entry], stream, shape, progress) -> None:
    """Each (trained name, tensor) of `stream` reordered for llama.cpp's rotary layout, encoded and appended, in
    the order of the table already written."""
    total = sum(e.nbytes for e in entries)
    done = 0
    pending = iter(entries)
    for trained, tensor in stream:
        if is_buffer(trained):
            continue
        e = next(pending, None)
        if e is None or trained != e.trained or tuple(tensor.shape) != e.shape:  # table and data disagree: a bug
            raise RuntimeError(f"convert gguf: expected {e}, got {trained} {tuple(tensor.shape)}")
        heads = rotary_heads(trained, shape)
        if heads is not None:
            tensor = permute_qk(tensor, heads)
        data = encode(tensor, e.qtype)
        del tensor
        writer.write_tensor_data(data)
        del data
        done += e.nbytes
        if progress is not None:
            progress(done, total)
    if next(pending, None) is not None:
        raise RuntimeError("convert gguf: fewer tensors than the table announced")


def export_gguf(
    model: str | Path,
    out: str | Path,
    *,
    adapter: str | Path | None = None,
    out_type: str = "f16",
    ollama: bool = False,
    prompt_template: str | None = None,
    device: str = "auto",
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> GGUFResult:
    """Write `model` (+ `adapter`) to the GGUF file `out`; `progress(done_bytes, total_bytes)` as it is written."""
    if importlib.util.find_spec("gguf") is None:
        raise TunesmithError("convert gguf needs the gguf package, which is not installed", "pip install gguf")
    import gguf

    start = time.perf_counter()
    kind = parse_type(out_type)
    out = Path(out)
    modelfile = out.parent / MODELFILE if ollama else None
    adapter_dir = Path(adapter) if adapter else None
    base_dir = resolve_model_path(model)
    _check_destination(out, modelfile, overwrite=overwrite,
                       inputs={"MODEL": base_dir, "--adapter": adapter_dir})
    config = read_config(base_dir)
    refs = list_tensors(weight_files(base_dir))
    check_full_precision(base_dir, config, refs)
    layout = layout_for(config)
    parts = [p for r in refs for p in layout.trained_names(r.name, r.shape) if not is_buffer(p[0])]
    check_supported(base_dir, config, [n for n, _ in parts])
    shape = read_shape(base_dir, config)

    adapter_obj = plan = None
    dev = pick_device(device)
    if adapter_dir is not None:
        adapter_obj = read_adapter(adapter_dir)
        plan = plan_merge(base_dir, adapter_obj, refs, layout)
        if plan.untie:
            parts.append((HEAD, dict(parts)[EMBED]))

    tokenizer_dir = adapter_dir if adapter_dir is not None and has_tokenizer(adapter_dir) else base_dir
    tokenizer = load_tokenizer(tokenizer_dir)
    prompt = choose_prompt(tokenizer, adapter_dir, prompt_template) if ollama else None
    end_of_turn = prompt.stop_words[0] if prompt and prompt.stop_words else None
    vocab = read_vocab(tokenizer, [tokenizer_dir, base_dir], shape.vocab_size, end_of_turn=end_of_turn)

    rope_freqs = shape.rope_freqs()
    entries = _table(parts, kind, gguf_names(shape.block_count), rope_freqs)
    total = sum(e.nbytes for e in entries)
    check_free_space(out, total)
    fallback = [e.name for e in entries if len(e.shape) > 1 and e.qtype not in (kind.default, kind.head)]

    modelfile_body = None
    if prompt is not None:
        bos = tokenizer.bos_token if vocab.add_bos and tokenizer.bos_token else ""
        modelfile_body = modelfile_text(out.name, prompt, bos=bos, eos=tokenizer.eos_token or "")

    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, ARCH)
        try:
            writer.add_name(_model_name(str(model), base_dir, adapter_dir))
            writer.add_file_type(int(kind.file_type))
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            shape.write(writer)
            vocab.write(writer)
            for e in entries:
                writer.add_tensor_info(e.name, e.shape, np.float32, e.nbytes, raw_dtype=e.qtype)
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            stream = iter_trained_tensors(refs, layout, adapter=adapter_obj, plan=plan, device=dev)
            if rope_freqs is not None:
                stream = itertools.chain([(ROPE_FREQS, rope_freqs)], stream)
            _write_tensors(writer, entries, stream, shape, progress)
        finally:
            writer.close()
    if modelfile is not None:
        write_text_atomic(modelfile, modelfile_body)

    notes = list(shape.notes)
    if fallback:
        notes.append(f"{len(fallback)} tensor(s) whose rows do not split into {kind.name} blocks were written as "
                     f"f16 (e.g. {fallback[0]})")
    if kind.name == "q4_0":
        head = "output.weight" if any(n == HEAD for n, _ in parts) else "token_embd.weight (the tied output projection)"
        notes.append(f"{head} kept at q8_0, as llama-quantize keeps the output at higher precision")
    vocab_kind = f"gpt2 (pre {vocab.pre})" if vocab.model == "gpt2" else "llama (sentencepiece)"
    return GGUFResult(out, kind.name, len(entries), total, time.perf_counter() - start, vocab_kind,
                      modelfile, prompt.template.name if prompt else None, notes)
