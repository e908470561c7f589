"""Preference objectives (``training.objective`` dpo / orpo): the losses, and the module the training step runs.

Every pair k of a micro-batch has the summed log-probability of its chosen answer ``c_k`` and of its rejected
answer ``r_k`` under the model being trained (models/fast/logps.py), and their token counts ``n_c``, ``n_r``.

DPO (Rafailov et al. 2023), sigmoid form with the reference model's ``c_ref``, ``r_ref``::

    z = beta * ((c - c_ref) - (r - r_ref))
    loss = -(1 - eps) * log sigmoid(z) - eps * log sigmoid(-z)       eps = label_smoothing (conservative DPO)
         + sft_weight * (-c / n_c)                                    RPO: the chosen answer's per-token NLL

    rewards: beta * (c - c_ref) and beta * (r - r_ref); accuracy: chosen reward > rejected reward.

ORPO (Hong et al. 2024), reference-free, on per-token means ``a_c = c / n_c`` and ``a_r = r / n_r``::

    log odds(a) = a - log(1 - exp(a))
    loss = -a_c - lambda * log sigmoid(log odds(a_c) - log odds(a_r))

    rewards: lambda * a_c and lambda * a_r (as TRL logs them).

Both are means over pairs (the NLL terms per pair, as the papers write them, so a pair's weight does not depend on
which micro-batch it lands in); the training step divides each micro-batch's summed loss by the pairs of the whole
accumulation window, the pair analogue of SFT's token weighting.

The reference: with LoRA / QLoRA the same model with its adapter switched off (models.fast.lora.adapter_off; no
second copy in memory), computed each step without gradients; or log-probabilities precomputed once before training
(reference.py) and carried in the batch as ``reference_logps``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.models.fast.lora import adapter_off

STAT_KEYS = ("pairs", "loss", "reward_chosen", "reward_rejected", "reward_correct", "logp_chosen", "logp_rejected",
             "ranked_correct", "ranked_margin")


def dpo_losses(c: torch.Tensor, r: torch.Tensor, c_ref: torch.Tensor, r_ref: torch.Tensor, *, beta: float,
               label_smoothing: float = 0.0, sft_weight: float = 0.0, chosen_tokens: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and the chosen / rejected rewards (module docstring)."""
    chosen_reward = beta * (c - c_ref)
    rejected_reward = beta * (r - r_ref)
    z = chosen_reward - rejected_reward
    losses = -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    if sft_weight:
        if chosen_tokens is None:
            raise ValueError("the SFT term of DPO (sft_weight) needs the chosen answers' token counts")
        losses = losses + sft_weight * (-c / chosen_tokens.clamp(min=1))
    return losses, chosen_reward.detach(), rejected_reward.detach()


def log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) of a per-token mean log-probability, stable near p = 1 (log1p(-exp(a)) needs a < 0)."""
    return mean_logp - torch.log1p(-torch.exp(mean_logp.clamp(max=-1e-6)))


def orpo_losses(c: torch.Tensor, r: torch.Tensor, chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor, *,
                lam: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair ORPO losses and the chosen / rejected rewards (module docstring)."""
    a_c = c / chosen_tokens.clamp(min=1)
    a_r = r / rejected_tokens.clamp(min=1)
    ratio = F.logsigmoid(log_odds(a_c) - log_odds(a_r))
    losses = -a_c - lam * ratio
    return losses, (lam * a_c).detach(), (lam * a_r).detach()


class PreferenceLoss(nn.Module):
    """Wraps a causal LM so that ``forward(batch) -> (loss_sum, pairs)`` for a pair batch, like
    :class:`~tunesmith.train.loss.CausalLMLoss` for SFT; the numbers of the micro-batches since the last
    :meth:`take_stats` are summed there (``STAT_KEYS``; detached)."""

    count_key = "num_pairs"

    def __init__(self, model: nn.Module, objective: str, options: Any, reference: str,
                 loss_options: dict[str, Any] | None = None):
        super().__init__()
        if objective not in ("dpo", "orpo"):
            raise ValueError(f"not a preference objective: {objective}")
        self.model = model
        self.objective, self.options, self.reference = objective, options, reference
        self.loss_options = {k: v for k, v in (loss_options or {}).items() if k in ("chunked", "chunk_size")}
        self._stats: dict[str, torch.Tensor] = {}

    def sequence_logps(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        from tunesmith.models.fast.logps import sequence_logps

        return sequence_logps(self.model, batch, **self.loss_options)

    def reference_logps(self, batch: dict[str, Any]) -> torch.Tensor:
        """The reference's summed log-probabilities of the batch's sequences (no gradients)."""
        if "reference_logps" in batch:
            return batch["reference_logps"].to(torch.float32)
        if self.reference != "adapter_off":
            raise ValueError("the batch carries no precomputed reference log-probabilities")
        with torch.no_grad(), adapter_off(self.model):
            logps, _ = self.sequence_logps(batch)
        return logps

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        o = self.options
        ref = self.reference_logps(batch) if self.objective == "dpo" else None  # first: less memory at its peak
        logps, tokens = self.sequence_logps(batch)
        c, r = logps[0::2], logps[1::2]
        n_c, n_r = tokens[0::2], tokens[1::2]
        if self.objective == "dpo":
            losses, chosen_reward, rejected_reward = dpo_losses(
                c, r, ref[0::2], ref[1::2], beta=o.beta, label_smoothing=o.label_smoothing,
                sft_weight=o.sft_weight, chosen_tokens=n_c)
        else:
            losses, chosen_reward, rejected_reward = orpo_losses(c, r, n_c, n_r, lam=o.orpo_lambda)
        pairs = c.shape[0]
        with torch.no_grad():
            mean_c, mean_r = c / n_c.clamp(min=1), r / n_r.clamp(min=1)
            numbers = {"pairs": float(pairs), "loss": losses.sum(), "reward_chosen": chosen_reward.sum(),
                       "reward_rejected": rejected_reward.sum(),
                       "reward_correct": (chosen_reward > rejected_reward).sum(),
                       "logp_chosen": c.sum(), "logp_rejected": r.sum(), "ranked_correct": (mean_c > mean_r).sum(),
                       "ranked_margin": (mean_c - mean_r).sum()}
            for key, value in numbers.items():
                value = torch.as_tensor(value, dtype=torch.float64, device=c.device).detach()
                self._stats[key] = self._stats[key] + value if key in self._stats else value
        return losses.sum(), torch.tensor(pairs, device=c.device)

    def take_stats(self) -> dict[str, torch.Tensor]:
        """The summed numbers since the last call (and start again from nothing)."""
        stats, self._stats = self._stats, {}
        return stats


def summarize(stats: dict[str, float], prefix: str = "") -> dict[str, float]:
    """Means per pair of summed ``STAT_KEYS`` numbers: what the logs show (``prefix`` "val_" for validation).

    ``reward_accuracy``: share of pairs whose chosen reward is higher (TRL's rewards/accuracies);
    ``reward_margin``: mean chosen minus rejected reward; ``preference_accuracy``: share of pairs whose chosen answer
    has the higher per-token log-probability under the trained model itself, and ``preference_margin`` the mean of
    that difference (they need no reference, so they mean the same before and after training)."""
    pairs = stats.get("pairs", 0.0)
    if not pairs:
        return {}
    out = {"reward_accuracy": stats["reward_correct"] / pairs,
           "reward_margin": (stats["reward_chosen"] - stats["reward_rejected"]) / pairs,
           "reward_chosen": stats["reward_chosen"] / pairs, "reward_rejected": stats["reward_rejected"] / pairs,
           "logp_chosen": stats["logp_chosen"] / pairs, "logp_rejected": stats["logp_rejected"] / pairs,
           "preference_accuracy": stats["ranked_correct"] / pairs,
           "preference_margin": stats["ranked_margin"] / pairs}
    return {prefix + k: float(v) for k, v in out.items()}


def objective_module(model: nn.Module, cfg: Any, loss_options: dict[str, Any]) -> nn.Module:
    """The module the training step runs for ``cfg``: :class:`PreferenceLoss` for dpo / orpo, else SFT's."""
    from tunesmith.train.loss import CausalLMLoss

    objective = cfg.training.objective
    if objective == "sft":
        return CausalLMLoss(model, loss_options)
    return PreferenceLoss(model, objective, cfg.preference, cfg.preference.reference_mode(cfg.method), loss_options)

