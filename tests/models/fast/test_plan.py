"""Which fast paths a model gets for the device it trains on, and all of them together against plain."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.models.fast.helpers import (
    apply_paths,
    assert_close_dicts,
    assert_same_loss_and_grads,
    check_against_fp32,
    gpu_batch,
    gpu_models,
    grads,
    lora,
    needs_cuda,
    packed_batch,
    plan_paths,
    rel_err,
    run_loss,
    tiny_llama,
)
from tunesmith.errors import TunesmithError
from tunesmith.models.fast import (
    PACKED_SDPA,
    model_loss_sum,
)


def test_apply_fast_paths_on_cpu_end_to_end_matches_plain():
    from tunesmith.config.schema import TrainConfig

    cfg = TrainConfig(method="lora")
    batch = packed_batch()
    ref_model = lora(tiny_llama(), dropout=0.1)
    fast_model = copy.deepcopy(ref_model)
    fast = apply_paths(fast_model, cfg)
    assert fast.attention == PACKED_SDPA
    assert not fast.liger_modules and "rms_norm" not in fast.counts  # no CUDA here: auto is a clean no-op
    assert fast.counts["fused_lora_layers"] == 14
    opts = fast.loss_options()
    assert opts == {"chunked": True, "use_liger": False}
    torch.manual_seed(5)
    loss_ref, n_ref = model_loss_sum(ref_model, batch, chunked=False)
    loss_ref.backward()
    torch.manual_seed(5)
    loss, n = model_loss_sum(fast_model, batch, **opts)
    loss.backward()
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-6)
    assert int(n) == int(n_ref)
    assert_close_dicts(grads(fast_model), grads(ref_model), atol=1e-5, rtol=1e-5)


def test_apply_fast_paths_all_off_leaves_model_alone():
    from tunesmith.config.schema import TrainConfig

    cfg = TrainConfig(
        method="lora", speed={"packed_attention": False, "liger_kernel": "off", "chunked_loss": False}
    )
    cfg.speed.fused_lora = False
    model = lora(tiny_llama())
    fast = apply_paths(model, cfg)
    assert model.get_base_model().config._attn_implementation == "sdpa"
    assert fast.loss_options() == {"chunked": False, "use_liger": False} and fast.counts == {}
    assert not any(type(m).__name__.startswith("Fused") for m in model.modules())


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_fast_paths_decided_for_a_cuda_target_on_any_machine(method):
    """What `tunesmith train` decides for a model that will train on a GPU, pinned here on the CPU: compiled
    layers (also under ZeRO-1/2), fused LoRA, packed attention, chunked loss; eager under ZeRO-3."""
    from tunesmith.config.schema import TrainConfig

    cfg = TrainConfig(method=method)
    fast = plan_paths(cfg, device=torch.device("cuda"))
    assert fast.compiled and fast.compile_reason == "compile auto" and fast.device == "cuda"
    assert fast.fused_lora and fast.packed_attention and fast.chunked_loss
    for stage in (1, 2):
        assert plan_paths(cfg, device="cuda", deepspeed_stage=stage).compiled
    zero3 = plan_paths(cfg, device="cuda", deepspeed_stage=3)
    assert not zero3.compiled and "ZeRO-3" in zero3.compile_reason and not zero3.fused_lora
    cpu = plan_paths(cfg, device="cpu")
    assert not cpu.compiled and "not on a CUDA GPU" in cpu.compile_reason and not cpu.liger_loss
    unpacked = TrainConfig(method=method, data={"pack_to_max_length": False})
    assert not plan_paths(unpacked, device="cuda").compiled
    assert plan_paths(TrainConfig(method=method, speed={"compile": "on"}), "cuda", 3).compiled
    assert not plan_paths(TrainConfig(method=method, speed={"compile": False}), "cuda").compiled
    line = fast.describe()
    assert "fast paths on cuda" in line and "compiled layers" in line and "fused LoRA" in line


def test_embeddings_on_host_only_where_one_process_owns_a_gpu_model():
    from tunesmith.config.schema import TrainConfig

    cfg = TrainConfig(method="qlora", speed={"embeddings_on_host": True})
    assert plan_paths(cfg, device="cuda").embeddings_on_host
    assert not plan_paths(cfg, device="cuda", deepspeed_stage=2).embeddings_on_host  # DeepSpeed moves it back
    assert not plan_paths(cfg, device="cpu").embeddings_on_host
    assert not plan_paths(cfg, device="cuda", world_size=2).embeddings_on_host  # DDP moves it too
    assert not plan_paths(TrainConfig(method="qlora"), device="cuda").embeddings_on_host  # off by default


def test_host_embedding_is_the_same_lookup_and_keeps_its_keys():
    from tunesmith.models.fast.host_embedding import (
        HostEmbedding,
        host_embedding_possible,
        move_embeddings_to_host,
    )

    batch = packed_batch()
    ref_model = lora(tiny_llama())
    fast_model = copy.deepcopy(ref_model)
    keys = set(fast_model.state_dict())
    assert move_embeddings_to_host(fast_model, torch.device("cpu"))
    assert isinstance(fast_model.get_base_model().get_input_embeddings(), HostEmbedding)
    assert set(fast_model.state_dict()) == keys
    assert_same_loss_and_grads(fast_model, ref_model, batch)
    tied = tiny_llama()
    tied.lm_head.weight = tied.model.embed_tokens.weight
    tied.requires_grad_(False)
    assert not host_embedding_possible(tied)  # the head reads the same table
    assert not host_embedding_possible(tiny_llama())  # trainable (full fine-tuning)


@pytest.mark.gpu
@needs_cuda
def test_gpu_host_embedding_step_matches_the_device_embedding():
    """A training step with the table on the host and the token ids handed over there: same loss and gradients,
    and the table takes no GPU memory."""
    from tunesmith.config.schema import TrainConfig
    from tunesmith.train.loss import CausalLMLoss
    from tunesmith.train.step import LocalBackend, TrainStep

    torch.manual_seed(0)
    plain, fast, _ = gpu_models()
    cfg = TrainConfig(method="lora", speed={"embeddings_on_host": True, "compile": "off"})
    applied = apply_paths(fast, cfg, "cuda")
    apply_paths(plain, TrainConfig(method="lora", speed={"compile": "off"}), "cuda")
    assert applied.counts["embeddings_on_host"] == 1 and applied.host_inputs == ("input_ids",)
    assert fast.get_base_model().get_input_embeddings().weight.device.type == "cpu"
    batch = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in gpu_batch().items()}
    batch["num_loss_tokens"] = int((batch["labels"][:, 1:] != -100).sum())
    losses, all_grads = [], []
    for model, host in ((plain, ()), (fast, applied.host_inputs)):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.0)
        step = TrainStep(LocalBackend(CausalLMLoss(model, applied.loss_options()), opt, params, precision="bf16",
                                      device=torch.device("cuda"), max_norm=None), torch.device("cuda"), host)
        for p in params:  # keep the gradients for the comparison (the step clears them)
            p.register_post_accumulate_grad_hook(lambda p: all_grads.append(p.grad.detach().clone()))
        losses.append(step([batch]).loss)
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    half = len(all_grads) // 2
    for a, b in zip(all_grads[:half], all_grads[half:]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_liger_on_for_a_cpu_target_is_a_user_error():
    from tunesmith.config.schema import TrainConfig

    with pytest.raises(TunesmithError, match="liger_kernel"):
        plan_paths(TrainConfig(method="lora", speed={"liger_kernel": "on"}), device="cpu")


@pytest.mark.gpu
@needs_cuda
def test_gpu_all_fast_paths_match_plain():
    from tunesmith.config.schema import TrainConfig

    cfg = TrainConfig(method="lora")
    plain, fast, ref = gpu_models()
    opts = apply_paths(fast, cfg, "cuda").loss_options()
    check_against_fp32(plain, fast, ref, gpu_batch(), opts)


@pytest.mark.gpu
@needs_cuda
def test_gpu_qlora_fast_paths_match_plain():
    """NF4 base: fused LoRA over bitsandbytes' Linear4bit, liger, packed attention, fused CE."""
    pytest.importorskip("bitsandbytes")
    from tunesmith.bench.baseline import quantize_nf4
    from tunesmith.config.schema import TrainConfig

    base = tiny_llama(dtype=torch.bfloat16, device="cuda", vocab=1000, layers=2)
    quantize_nf4(base, torch.bfloat16)
    plain = lora(base)
    fast = copy.deepcopy(plain)
    cfg = TrainConfig(method="qlora")
    applied = apply_paths(fast, cfg, "cuda")
    assert applied.counts["fused_lora_layers"] == 2 * 7
    batch = gpu_batch()
    l_plain, g_plain = run_loss(plain, batch, chunked=False)
    l_fast, g_fast = run_loss(fast, batch, **applied.loss_options())
    assert abs(l_fast - l_plain) < 3e-2
    assert rel_err(g_fast, g_plain) < 5e-2
