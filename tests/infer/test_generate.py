"""The generator: exact against transformers' generate, stops, cache reuse, detokenisation."""

from __future__ import annotations

import pytest
import torch

from tunesmith.infer.detok import StreamDecoder
from tunesmith.infer.generate import Generator
from tunesmith.infer.sampling import SamplingConfig
from tunesmith.infer.stops import StopHit, StopMatcher


def _prompt(tok):
    return tok("Hello world, this is a test of", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("mode,every", [("plain", 1), ("plain", 5), ("static", 1), ("static", 7)])
def test_greedy_matches_generate(smol_tokenizer, tiny_model, mode, every):
    prompt = _prompt(smol_tokenizer)
    ref = tiny_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24, eos_token_id=None)
    gen = Generator(tiny_model, smol_tokenizer, mode=mode, stop_check_every=every)
    gen.eos_token_ids = set()
    result = gen.generate(prompt, SamplingConfig(max_new_tokens=24, temperature=0))
    assert result.ids == ref[0, len(prompt):].tolist()
    assert result.finish_reason == "length"


def test_sampling_matches_generate_with_same_seed(smol_tokenizer, tiny_model):
    prompt = _prompt(smol_tokenizer)
    cfg = SamplingConfig(max_new_tokens=20, temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.3, seed=123)
    gen = Generator(tiny_model, smol_tokenizer, mode="plain")
    gen.eos_token_ids = set()
    ours = gen.generate(prompt, cfg).ids
    torch.manual_seed(123)
    ref = tiny_model.generate(torch.tensor([prompt]), do_sample=True, temperature=0.8, top_k=40, top_p=0.9,
                              repetition_penalty=1.3, max_new_tokens=20, eos_token_id=None)
    assert ours == ref[0, len(prompt):].tolist()
    assert gen.generate(prompt, cfg).ids == ours  # seeded: reproducible


@pytest.mark.parametrize("mode,every", [("plain", 1), ("static", 4)])
def test_stop_word_cuts_exactly_and_cache_is_reused(smol_tokenizer, tiny_model, mode, every):
    prompt = _prompt(smol_tokenizer)
    gen = Generator(tiny_model, smol_tokenizer, mode=mode, stop_check_every=every)
    gen.eos_token_ids = set()
    full = gen.generate(prompt, SamplingConfig(max_new_tokens=30, temperature=0))
    word = full.text[15:21]
    pieces: list[str] = []
    cut = gen.generate(prompt, SamplingConfig(max_new_tokens=30, temperature=0), stop_words=[word],
                       on_text=pieces.append)
    assert cut.finish_reason == "stop" and cut.stop == word
    assert cut.text == full.text[: full.text.index(word)] == "".join(pieces)
    assert word not in "".join(pieces)
    # the next prompt extends the cached ids: only the new part is prefilled, output still exact
    follow = prompt + cut.ids + prompt
    again = gen.generate(follow, SamplingConfig(max_new_tokens=8, temperature=0))
    assert again.prefilled_tokens == len(prompt) + 1
    ref = tiny_model.generate(torch.tensor([follow]), do_sample=False, max_new_tokens=8, eos_token_id=None)
    assert again.ids == ref[0, len(follow):].tolist()


def test_stop_token_id_ends_generation(smol_tokenizer, tiny_model):
    prompt = _prompt(smol_tokenizer)
    gen = Generator(tiny_model, smol_tokenizer, mode="plain")
    gen.eos_token_ids = set()
    full = gen.generate(prompt, SamplingConfig(max_new_tokens=12, temperature=0))
    stop_id = full.ids[5]
    result = gen.generate(prompt, SamplingConfig(max_new_tokens=12, temperature=0), stop_token_ids=[stop_id])
    assert result.ids == full.ids[: full.ids.index(stop_id) + 1]
    assert result.finish_reason == "stop"


def test_stop_matcher_holds_back_partial_words():
    m = StopMatcher(["<eoa>", "Observation:"])
    assert m.feed("Hello <e") == "Hello "
    assert m.feed("x") == "<ex"
    assert m.feed(" Obs") == " "
    hit = m.feed("ervation: 42")
    assert isinstance(hit, StopHit) and hit.word == "Observation:" and hit.text == ""
    m2 = StopMatcher(["<eoa>"])
    assert m2.feed("a<eo") == "a" and m2.flush() == "<eo"


@pytest.mark.parametrize(
    "text",
    ["Hello world, how are you?", "中文测试：你好，世界！🙂 emoji", "  leading and  double  spaces\n\nnew lines"],
)
def test_stream_decoder_is_exact(smol_tokenizer, text):
    ids = smol_tokenizer(text, add_special_tokens=False)["input_ids"]
    dec = StreamDecoder(smol_tokenizer)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stream_decoder_metaspace_leading_space():
    """sentencepiece-style tokenizers drop the leading space of a lone token; the window keeps it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "▁Hello": 1, "▁world": 2, "!": 3, "▁": 4}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="<unk>", continuing_subword_prefix=""))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    dec = StreamDecoder(fast, context_ids=[1])
    assert dec.push(2) + dec.push(3) + dec.flush() == " world!"


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["graph", "compiled"])
def test_cuda_fast_paths_match_the_eager_static_path(smol_tokenizer, tiny_model, mode):
    import copy

    model = copy.deepcopy(tiny_model).to("cuda", torch.bfloat16)
    prompt = _prompt(smol_tokenizer)
    outs = {}
    for m in ("static", mode):
        gen = Generator(model, smol_tokenizer, mode=m)
        gen.eos_token_ids = set()
        outs[m] = gen.generate(prompt, SamplingConfig(max_new_tokens=64, temperature=0)).ids
        # a second call reuses the cache (and the captured / compiled step)
        assert gen.generate(prompt, SamplingConfig(max_new_tokens=64, temperature=0)).ids == outs[m]
    assert outs[mode] == outs["static"]
