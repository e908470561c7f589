"""InternLM v1 / InternLM2 load natively on LlamaForCausalLM and match reference forwards of the originals."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tunesmith.models import convert_internlm_folder, load_model, load_tokenizer, read_config

# ----------------------------------------------------------- reference forwards (plain torch, fp32)


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(q, k, base, dim):
    seq = q.shape[-2]
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freqs = torch.outer(torch.arange(seq, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _attention(q, k, v):
    """q [H, T, D], k/v [H, T, D] (already repeated): causal softmax attention."""
    t, d = q.shape[1], q.shape[2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    scores = scores.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), float("-inf"))
    return scores.softmax(-1) @ v


def _mlp(x, gate, up, down):
    return F.silu(x @ gate.T) * (x @ up.T) @ down.T


def internlm_v1_forward(w: dict, cfg: dict, ids: torch.Tensor) -> torch.Tensor:
    """InternLM (v1) decoder as in modeling_internlm.py: q/k/v/o with bias, rotary on q/k, SwiGLU."""
    heads, hidden, eps = cfg["num_attention_heads"], cfg["hidden_size"], cfg["rms_norm_eps"]
    dim = hidden // heads
    base = cfg.get("rotary", {}).get("base", 10000)
    h = w["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = _rms(h, w[p + "input_layernorm.weight"], eps)

        def proj(name, x=x, p=p):
            return x @ w[p + f"self_attn.{name}.weight"].T + w[p + f"self_attn.{name}.bias"]

        q, k, v = (proj(n).view(-1, heads, dim).transpose(0, 1) for n in ("q_proj", "k_proj", "v_proj"))
        q, k = _rope(q, k, base, dim)
        att = _attention(q, k, v).transpose(0, 1).reshape(-1, hidden)
        h = h + att @ w[p + "self_attn.o_proj.weight"].T + w[p + "self_attn.o_proj.bias"]
        x = _rms(h, w[p + "post_attention_layernorm.weight"], eps)
        h = h + _mlp(x, w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"], w[p + "mlp.down_proj.weight"])
    return _rms(h, w["model.norm.weight"], eps) @ w["lm_head.weight"].T


def internlm2_forward(w: dict, cfg: dict, ids: torch.Tensor) -> torch.Tensor:
    """InternLM2 decoder as in modeling_internlm2.py: fused grouped wqkv split per kv head, GQA, SwiGLU w1/w3/w2."""
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hidden, eps = cfg["hidden_size"], cfg["rms_norm_eps"]
    dim, groups = hidden // heads, heads // kv
    seq = ids.shape[0]
    base = cfg["rope_theta"]
    scaling = cfg.get("rope_scaling") or {}
    if scaling.get("type") == "dynamic" and seq > cfg["max_position_embeddings"]:
        # InternLM2DynamicNTKScalingRotaryEmbedding
        f = scaling["factor"]
        base = base * ((f * seq / cfg["max_position_embeddings"]) - (f - 1)) ** (dim / (dim - 2))
    h = w["model.tok_embeddings.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = _rms(h, w[p + "attention_norm.weight"], eps)
        qkv = x @ w[p + "attention.wqkv.weight"].T
        if p + "attention.wqkv.bias" in w:
            qkv = qkv + w[p + "attention.wqkv.bias"]
        qkv = qkv.view(seq, kv, groups + 2, dim)  # "b q (h gs d) -> b q h gs d"
        q = qkv[:, :, :groups].reshape(seq, heads, dim).transpose(0, 1)
        k = qkv[:, :, -2].transpose(0, 1)
        v = qkv[:, :, -1].transpose(0, 1)
        q, k = _rope(q, k, base, dim)
        k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)  # repeat_kv
        att = _attention(q, k, v).transpose(0, 1).reshape(seq, hidden)
        out = att @ w[p + "attention.wo.weight"].T
        if p + "attention.wo.bias" in w:
            out = out + w[p + "attention.wo.bias"]
        h = h + out
        x = _rms(h, w[p + "ffn_norm.weight"], eps)
        ff = p + "feed_forward."
        h = h + _mlp(x, w[ff + "w1.weight"], w[ff + "w3.weight"], w[ff + "w2.weight"])
    return _rms(h, w["model.norm.weight"], eps) @ w["output.weight"].T


def _ids(vocab: int, n: int = 12) -> torch.Tensor:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(0))


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(ids[None]).logits[0]


# ----------------------------------------------------------- model


def test_internlm_v1_matches_reference_forward(tiny_internlm):
    cfg = read_config(tiny_internlm)
    model = load_model(tiny_internlm, dtype="fp32")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.attention_bias is True
    ids = _ids(cfg["vocab_size"])
    ref = internlm_v1_forward(load_file(tiny_internlm / "model.safetensors"), cfg, ids)
    torch.testing.assert_close(_hf_logits(model, ids), ref, atol=1e-5, rtol=1e-5)


def test_internlm_v1_bin_checkpoint_loads(tiny_internlm, tiny_internlm_bin):
    assert not (tiny_internlm_bin / "model.safetensors").exists()
    cfg = read_config(tiny_internlm_bin)
    ids = _ids(cfg["vocab_size"])
    a = _hf_logits(load_model(tiny_internlm_bin, dtype="fp32"), ids)
    b = _hf_logits(load_model(tiny_internlm, dtype="fp32"), ids)
    torch.testing.assert_close(a, b)  # same seed, same weights; inv_freq buffers were ignored


@pytest.mark.parametrize("seq", [12, 300])  # 300 > max_position_embeddings: dynamic NTK rope kicks in
def test_internlm2_matches_reference_forward(tiny_internlm2, seq):
    cfg = read_config(tiny_internlm2)
    model = load_model(tiny_internlm2, dtype="fp32")
    assert model.config.num_key_value_heads == 2 and model.config.rope_parameters["rope_type"] == "dynamic"
    ids = _ids(cfg["vocab_size"], seq)
    ref = internlm2_forward(load_file(tiny_internlm2 / "model.safetensors"), cfg, ids)
    torch.testing.assert_close(_hf_logits(model, ids), ref, atol=1e-5, rtol=1e-5)


def test_internlm2_with_bias_matches_reference(tmp_path):
    from tests.fixtures.tiny_models import make_tiny_internlm2

    folder = make_tiny_internlm2(tmp_path / "m", bias=True)
    cfg = read_config(folder)
    ids = _ids(cfg["vocab_size"])
    ref = internlm2_forward(load_file(folder / "model.safetensors"), cfg, ids)
    torch.testing.assert_close(_hf_logits(load_model(folder, dtype="fp32"), ids), ref, atol=1e-5, rtol=1e-5)


def test_remote_code_is_never_run(tiny_internlm, tiny_internlm2):
    # the fixtures' remote .py files raise when executed; trust_remote_code=True must not reach them either
    for folder in (tiny_internlm, tiny_internlm2):
        assert "auto_map" in read_config(folder)
        load_model(folder, trust_remote_code=True)
        load_tokenizer(folder, trust_remote_code=True)


def test_convert_internlm_folder_gives_a_plain_llama_folder(tiny_internlm2, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = convert_internlm_folder(tiny_internlm2, tmp_path / "llama")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config
    assert "auto_map" not in json.loads((out / "tokenizer_config.json").read_text())
    ids = _ids(config["vocab_size"])
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # no tunesmith involved
    torch.testing.assert_close(_hf_logits(plain, ids), _hf_logits(load_model(tiny_internlm2, dtype="fp32"), ids))
    text = "Hello world<|im_end|>"
    assert AutoTokenizer.from_pretrained(out)(text).input_ids == load_tokenizer(tiny_internlm2)(text).input_ids


# ----------------------------------------------------------- tokenizer


@pytest.mark.parametrize("family", ["tiny_internlm", "tiny_internlm2"])
def test_sentencepiece_tokenizer_matches_sentencepiece(family, request):
    import sentencepiece as spm

    folder = request.getfixturevalue(family)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    tok = load_tokenizer(folder)
    assert type(tok).__name__ == "LlamaTokenizer"
    assert len(tok) == sp.get_piece_size()
    texts = ["Hello world 123 + 45 = ?", "请给我介绍五个上海的景点", "Please tell me five scenic spots.", "emoji 🙂 x"]
    for text in texts:
        assert tok(text, add_special_tokens=False).input_ids == sp.encode(text), text
        assert tok.decode(sp.encode(text)) == text
    assert tok("hi").input_ids[0] == sp.bos_id() == tok.bos_token_id  # BOS added, like the original
    assert tok.eos_token == "</s>" and tok.pad_token == "</s>" and tok.padding_side == "right"


def test_internlm_special_tokens_are_single_tokens(tiny_internlm, tiny_internlm2):
    import sentencepiece as spm

    for folder, specials in ((tiny_internlm, ["<eoh>", "<eoa>"]), (tiny_internlm2, ["<|im_start|>", "<|im_end|>"])):
        sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
        tok = load_tokenizer(folder)
        for token in specials:
            ids = tok(f"hello{token}world", add_special_tokens=False).input_ids
            assert sp.piece_to_id(token) in ids, token
            assert tok.convert_tokens_to_ids(token) == sp.piece_to_id(token)
    v2 = load_tokenizer(tiny_internlm2)
    assert "<|im_end|>" in v2.all_special_tokens
    rendered = v2.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
