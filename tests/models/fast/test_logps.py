"""Per-sequence log-probabilities (models/fast/logps.py): the chunked path against full logits, values and
gradients; packed pair rows against each sequence scored alone; a wrapped head; GPU bf16 within the plain path's
own error."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.models.fast.helpers import gpu_models, grads, lora, rel_err, tiny_llama
from tunesmith.data.encode import Encoded
from tunesmith.data.pack import collate, pair_dataset
from tunesmith.errors import TunesmithError
from tunesmith.models.fast import attention, shared_prompt, varlen
from tunesmith.models.fast.attention import PACKED_SDPA, set_attention
from tunesmith.models.fast.logps import sequence_logps, token_logps


def pair_batch(lengths=((6, 9), (7, 5), (4, 8)), vocab=97, seed=3, prompt=3, rows_packed=True, device="cpu"):
    """A collated pair batch like the training loader's: each sequence scores all but its first `prompt` tokens."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for chosen, rejected in lengths:
        for n in (chosen, rejected):
            ids = torch.randint(0, vocab, (n,), generator=g).numpy().astype("int32")
            labels = ids.copy()
            labels[:prompt] = -100
            samples.append(Encoded(ids, labels))
    ds = pair_dataset(samples, max_length=max(max(p) for p in lengths), pack=rows_packed, seed=None)
    batch = collate([ds[i] for i in range(len(ds))], 0, True, pairs=True)
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}, samples


def by_hand(model, samples):
    """Each sequence alone, full logits, log_softmax: the reference numbers."""
    out = []
    for s in samples:
        ids = torch.as_tensor(s.input_ids, dtype=torch.long)[None]
        logits = model(input_ids=ids).logits[0, :-1].float()
        targets = torch.as_tensor(s.labels, dtype=torch.long)[1:]
        keep = targets != -100
        out.append(torch.log_softmax(logits, -1)[keep].gather(1, targets[keep, None]).sum())
    return torch.stack(out)


@pytest.mark.parametrize("packed", [True, False])
def test_sequence_logps_match_each_sequence_alone(packed):
    model = lora(tiny_llama())
    batch, samples = pair_batch(rows_packed=packed)
    logps, tokens = sequence_logps(model, batch, chunk_size=7)
    torch.testing.assert_close(logps, by_hand(model, samples), atol=1e-5, rtol=1e-5)
    assert tokens.tolist() == [len(s.input_ids) - 3 for s in samples]


def test_chunked_equals_full_logits_values_and_gradients():
    model = lora(tiny_llama())
    twin = copy.deepcopy(model)
    batch, _ = pair_batch()
    weights = torch.tensor([0.3, -1.2, 0.7, 2.0, -0.5, 1.1])  # a DPO-like weight per sequence
    fast, _ = sequence_logps(model, batch, chunked=True, chunk_size=5)
    (fast * weights).sum().backward()
    plain, _ = sequence_logps(twin, batch, chunked=False)
    (plain * weights).sum().backward()
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-6)
    a, b = grads(model), grads(twin)
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)


def test_token_logps_gradients_reach_head_weight_and_bias():
    torch.manual_seed(0)
    hidden = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(8, 13, dtype=torch.float64)
    targets = torch.randint(0, 13, (11,))
    weights = torch.randn(11, dtype=torch.float64)

    def plain(h, w, b):
        return torch.log_softmax(torch.nn.functional.linear(h, w, b), -1).gather(1, targets[:, None]).squeeze(1)

    ours = token_logps(hidden, head, targets, chunk_size=4)
    (ours.double() * weights).sum().backward()
    got = [hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]
    for t in (hidden, head.weight, head.bias):
        t.grad = None
    (plain(hidden, head.weight, head.bias) * weights).sum().backward()
    torch.testing.assert_close(ours.double(), plain(hidden, head.weight, head.bias).detach(), atol=1e-6, rtol=0)
    for mine, ref in zip(got, [hidden.grad, head.weight.grad, head.bias.grad], strict=True):
        torch.testing.assert_close(mine, ref, atol=1e-6, rtol=1e-6)


def test_a_wrapped_head_goes_through_its_own_forward():
    head = tiny_llama().lm_head
    wrapper = torch.nn.Sequential(head)  # not a plain nn.Linear: the generic chunked path
    hidden = torch.randn(9, head.in_features)
    targets = torch.randint(0, head.out_features, (9,))
    torch.testing.assert_close(token_logps(hidden, wrapper, targets, chunk_size=4),
                               token_logps(hidden, head, targets, chunk_size=4), atol=1e-5, rtol=1e-5)


def prompted_pairs(pairs=((5, 4, 6), (1, 7, 3), (4, 3, 3)), vocab=97, seed=5):
    """Pairs (prompt, chosen answer, rejected answer lengths) whose sequences begin with the same prompt; in the
    second the prompt is one token, so nothing is shared. Answers are scored, prompts not."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for prompt, *answers in pairs:
        head = torch.randint(0, vocab, (prompt,), generator=g)
        for n in answers:
            ids = torch.cat([head, torch.randint(0, vocab, (n,), generator=g)]).numpy().astype("int32")
            labels = ids.copy()
            labels[:prompt] = -100
            samples.append(Encoded(ids, labels))
    return samples


def layouts(samples, packed, device="cpu"):
    """The same pairs collated plainly and with shared prompts, each in sample order (rows may pack differently)."""
    out = []
    for share in (False, True):
        ds = pair_dataset(samples, max_length=max(len(x.input_ids) for x in samples), pack=packed, seed=None,
                          share_prompt=share)
        batch = collate([ds[i] for i in range(len(ds))], 0, True, pairs=True)
        order = [i for row in ds.bins for i in row]  # batch sequence j is sample order[j]
        weights = torch.linspace(-1, 1, len(samples))[order]  # the same weight for a sample in both layouts
        out.append(({k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()},
                    torch.tensor(order).argsort(), weights.to(device)))
    return out


def weighted_logps_and_grads(model, layout, **options):
    """Each sample's log-probability and token count (sample order), and the gradients of a weighted sum."""
    batch, to_samples, weights = layout
    model.zero_grad(set_to_none=True)
    logps, tokens = sequence_logps(model, batch, **options)
    (logps * weights).sum().backward()
    return logps.detach().float()[to_samples.to(logps.device)], tokens[to_samples.to(tokens.device)], grads(model)


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("kernel", ["loop", "varlen emulated"])
def test_shared_prompt_rows_score_like_the_plain_layout(monkeypatch, packed, kernel):
    """A pair's prompt held once (the rejected rest attending to it across the chosen rest) gives every sequence
    the log-probability and gradients of the plain layout, on the CPU loop and through the varlen plumbing (the
    flash kernel emulated in plain torch, tests/models/fast/test_attention.py)."""
    if kernel != "loop":
        from tests.models.fast.test_attention import _reference_varlen

        monkeypatch.setattr(shared_prompt, "varlen_possible", lambda device: True)
        monkeypatch.setattr(shared_prompt, "inputs_fit_varlen", lambda q, k, dropout: True)
        monkeypatch.setattr(varlen, "flash_forward", _reference_varlen)
    samples = prompted_pairs()
    plain_batch, shared_batch = layouts(samples, packed)
    held = [int((b["sequence_ids"] >= 0).sum()) for b, _, _ in (plain_batch, shared_batch)]
    assert held[1] == held[0] - (5 - 1) - (4 - 1)  # the prompts of pairs 0 and 2 held once (pair 1's is 1 token)
    assert shared_batch[0]["num_tokens"] == plain_batch[0]["num_tokens"] == sum(len(s.input_ids) for s in samples)
    model = lora(tiny_llama(kv_heads=2))
    set_attention(model, PACKED_SDPA)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    plain = weighted_logps_and_grads(model, plain_batch, chunk_size=5)
    shared = weighted_logps_and_grads(model, shared_batch, chunk_size=5)
    torch.testing.assert_close(shared[0], plain[0], atol=1e-5, rtol=1e-5)
    assert shared[1].tolist() == plain[1].tolist()
    assert shared[2].keys() == plain[2].keys()
    for k in plain[2]:
        torch.testing.assert_close(shared[2][k], plain[2][k], atol=1e-5, rtol=1e-4)


def test_shared_prompt_rows_need_the_packed_attention():
    _, (shared_batch, _, _) = layouts(prompted_pairs(), True)
    with pytest.raises(TunesmithError, match="share_prompt=false"):
        sequence_logps(lora(tiny_llama()), shared_batch)


@pytest.mark.gpu
def test_gpu_shared_prompt_rows_match_the_plain_layout():
    """The real flash kernel with gathered keys (bottom-right causal alignment) against the plain layout, bf16,
    within the plain path's own error against fp32."""
    plain_model, fast, ref = gpu_models()
    for m in (plain_model, fast, ref):
        set_attention(m, PACKED_SDPA)
    samples = prompted_pairs(pairs=((120, 80, 60), (1, 50, 70), (64, 100, 30)), vocab=1000)
    plain_batch, shared_batch = layouts(samples, True, device="cuda")
    q = torch.zeros(1, 4, 8, 16, device="cuda", dtype=torch.bfloat16)
    assert attention.packed_backend(q, q) == "varlen", varlen._varlen_broken

    def run(model, batch):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=next(model.parameters()).dtype != torch.float32):
            return weighted_logps_and_grads(model, batch, chunked=True)

    ref_logps, _, ref_grads = run(ref, plain_batch)
    plain_logps, _, plain_grads = run(plain_model, plain_batch)
    fast_logps, _, fast_grads = run(fast, shared_batch)
    assert varlen._varlen_broken is None
    plain_err = (plain_logps - ref_logps).abs().max().item()
    assert (fast_logps - ref_logps).abs().max().item() <= 2 * plain_err + 1e-2
    assert rel_err(fast_grads, ref_grads) <= 2 * rel_err(plain_grads, ref_grads) + 1e-3


@pytest.mark.gpu
def test_gpu_bf16_chunked_within_the_plain_paths_error():
    plain, fast, ref = gpu_models()
    batch, _ = pair_batch(lengths=((100, 140), (90, 60)), vocab=1000, device="cuda")

    def run(model, chunked):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=next(model.parameters()).dtype != torch.float32):
            logps, _ = sequence_logps(model, batch, chunked=chunked)
        (logps * torch.linspace(-1, 1, logps.shape[0], device="cuda")).sum().backward()
        return logps.detach().float(), grads(model)

    ref_logps, ref_grads = run(ref, False)
    plain_logps, plain_grads = run(plain, False)
    fast_logps, fast_grads = run(fast, True)
    plain_err = (plain_logps - ref_logps).abs().max().item()
    assert (fast_logps - ref_logps).abs().max().item() <= 2 * plain_err + 1e-2
    assert rel_err(fast_grads, ref_grads) <= 2 * rel_err(plain_grads, ref_grads) + 1e-3
