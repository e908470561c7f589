"""The frozen input embedding kept in host memory (``speed.embeddings_on_host``).

LoRA and QLoRA never update the input embedding, and a step only reads one row of it per token: 2,048 rows of a
103,168 x 4,096 bf16 table (0.8 GiB on the GPU for InternLM-7B, a sixth of a QLoRA 7B run's memory) come to
16 MiB. Kept in host memory, the rows are looked up on the CPU and copied to the GPU, which costs about a
millisecond a micro-batch; the table no longer takes GPU memory. The training step hands the token ids over on
the host (no device-to-host copy, no synchronisation); ids that arrive on the GPU (generation during training)
are copied back first.

Applied by giving the ``nn.Embedding`` a subclass of its own class (parameter names and state-dict keys stay), only
when the table is frozen, not tied to the output head, and one process without DeepSpeed owns the model (DDP and
DeepSpeed move every parameter to the device).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class HostEmbedding(nn.Embedding):
    """An ``nn.Embedding`` whose table stays on the CPU; its output goes to ``output_device``."""

    output_device: torch.device

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        table = self.weight
        rows = F.embedding(ids.to(table.device), table, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)
        return rows.to(self.output_device, non_blocking=True)


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def host_embedding_possible(model: nn.Module) -> bool:
    """The input embedding is a plain, frozen ``nn.Embedding`` that does not share its table with the head."""
    base = _base(model)
    embed = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(embed) is not nn.Embedding or embed.weight.requires_grad:
        return False
    return head is None or getattr(head, "weight", None) is not embed.weight


def move_embeddings_to_host(model: nn.Module, device: torch.device) -> bool:
    """Keep the input embedding's table on the CPU, its output on ``device``; returns whether it was done."""
    if not host_embedding_possible(model):
        return False
    embed = _base(model).get_input_embeddings()
    embed.weight.data = embed.weight.data.to("cpu")
    embed.__class__ = HostEmbedding
    embed.output_device = torch.device(device)
    return True
