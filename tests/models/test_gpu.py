"""The GPU side of loading: dtype by hardware, NF4 QLoRA on CUDA, InternLM mapping in bf16 (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from tunesmith.config import TrainConfig
from tunesmith.models import auto_dtype, count_parameters, load_model, prepare_for_training

pytestmark = pytest.mark.gpu


def test_auto_dtype_on_gpu():
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert auto_dtype() is expected


def test_internlm2_bf16_on_gpu_matches_fp32(tiny_internlm2):
    ids = torch.randint(3, 300, (1, 24), generator=torch.Generator().manual_seed(0))
    ref = load_model(tiny_internlm2, dtype="fp32")
    gpu = load_model(tiny_internlm2, device_map={"": 0})
    assert gpu.dtype == auto_dtype() and gpu.device.type == "cuda"
    with torch.no_grad():
        a = ref(ids).logits
        b = gpu(ids.cuda()).logits.float().cpu()
    torch.testing.assert_close(b, a, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_internlm"])
def test_qlora_on_gpu(family, request):
    import bitsandbytes as bnb

    folder = request.getfixturevalue(family)
    model = load_model(folder, bits=4)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.device.type == "cuda" for m in layers)
    assert layers[0].compute_dtype == auto_dtype()
    cfg = TrainConfig(method="qlora", lora={"r": 8})
    model = prepare_for_training(model, cfg)
    trainable, total = count_parameters(model)
    assert 0 < trainable < total
    ids = torch.randint(3, 300, (2, 32), device="cuda")
    with torch.autocast("cuda", dtype=auto_dtype()):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    graded = {n for n, p in model.named_parameters() if p.grad is not None}
    assert graded == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in graded)
