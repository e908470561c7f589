"""Which layers recompute, and the activation plan of compiled layers."""

from __future__ import annotations

import torch

from tests.models.fast.helpers import (
    tiny_llama,
)
from tunesmith.models.fast import (
    set_checkpointed_layers,
)


def test_set_checkpointed_layers():
    model = tiny_llama(layers=4)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert set_checkpointed_layers(model, 0) == 4
    assert set_checkpointed_layers(model, 3) == 1
    flags = [layer.gradient_checkpointing for layer in model.model.layers]
    assert flags == [True, False, False, False]
    assert set_checkpointed_layers(model, 10) == 0


class _FakeCard:
    """Stands in for a GPU in the activation planner: the peak of a step is ``base`` plus, per layer, the bytes a
    compiled layer keeps at the compiled budget (``per_layer[budget]``) or ``whole`` when checkpointed whole."""

    def __init__(self, model, base, per_layer, whole, fail_above=None):
        import torch._functorch.config as functorch_config

        self.config, self.model = functorch_config, model
        self.base, self.per_layer, self.whole, self.fail_above = base, per_layer, whole, fail_above
        self.compiled_with = []
        self.resets = 0

    def layers(self):
        return [m for m in self.model.modules() if type(m).__name__ == "LlamaDecoderLayer"]

    def budget(self):
        return self.config.activation_memory_budget

    def peak_of(self, step):
        step()
        b = self.budget()
        per = self.per_layer(b) if callable(self.per_layer) else self.per_layer[b]
        peak = self.base + sum(self.whole if layer.gradient_checkpointing else per for layer in self.layers())
        if self.fail_above is not None and peak > self.fail_above:
            raise torch.OutOfMemoryError("probe")
        return peak


def _planner_model(layers=8):
    model = tiny_llama(layers=layers)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def test_activation_plan_keeps_everything_when_it_fits():
    from tunesmith.models.fast.checkpointing import fit_compiled_activations

    gib = 2**30
    model = _planner_model()
    card = _FakeCard(model, 10 * gib, {1.0: 1 * gib}, 0.1 * gib)
    try:
        plan = fit_compiled_activations(model, lambda: None, 40 * gib, peak_of=card.peak_of)
        assert (plan.fraction, plan.whole_layers, plan.fits) == (1.0, 0, True)
        assert len(plan.probes) == 1 and plan.peak == 18 * gib
        assert not any(layer.gradient_checkpointing for layer in card.layers())
        assert "keep 100% of their activations, 0/8 layers checkpointed whole" in plan.describe()
    finally:
        card.config.activation_memory_budget = 1.0


def test_activation_plan_interpolates_a_budget_between_everything_and_whole_layers():
    from tunesmith.models.fast.checkpointing import fit_compiled_activations

    gib = 2**30
    model = _planner_model()
    # kept bytes fall faster near 1 than near 0 (the partitioner drops its least useful activations first)
    card = _FakeCard(model, 10 * gib, lambda b: (0.1 + 0.9 * b**2) * gib, 0.1 * gib)
    try:
        plan = fit_compiled_activations(model, lambda: None, 14 * gib, peak_of=card.peak_of)
        limit = 14 * gib
        assert plan.whole_layers == 0 and 0.01 < plan.fraction < 1.0 and plan.peak <= limit
        assert [(f, w) for f, w, _ in plan.probes] == [(1.0, 0), (1.0, 8), (plan.fraction, 0)]  # two compilations
        assert card.budget() == plan.fraction  # the graphs of the plan stay compiled
    finally:
        card.config.activation_memory_budget = 1.0


def test_activation_plan_adds_whole_layers_when_a_budget_alone_does_not_fit():
    """The issue's cliff: 5 % of the activations did not fit and everything went whole, at more memory than the
    refused option. Now whole layers are added on top of the budget, only as many as needed."""
    from tunesmith.models.fast.checkpointing import fit_compiled_activations

    gib = 2**30
    model = _planner_model()
    per = {1.0: 1.0 * gib}
    card = _FakeCard(model, 10 * gib, lambda b: per.get(b, 0.3 * gib), 0.1 * gib)  # a budget's floor: 0.3 GiB
    try:
        plan = fit_compiled_activations(model, lambda: None, 12.25 * gib, peak_of=card.peak_of)
        limit = 12.25 * gib
        assert plan.fits and plan.peak <= limit and 0 < plan.whole_layers < 8 and plan.fraction < 1.0
        refused = [p for f, w, p in plan.probes if p > limit]
        assert all(p > plan.peak for p in refused)
        flags = [layer.gradient_checkpointing for layer in card.layers()]
        assert flags == [True] * plan.whole_layers + [False] * (8 - plan.whole_layers)
    finally:
        card.config.activation_memory_budget = 1.0


def test_activation_plan_takes_the_least_memory_when_nothing_fits_and_survives_out_of_memory():
    from tunesmith.models.fast.checkpointing import fit_compiled_activations

    gib = 2**30
    model = _planner_model()
    card = _FakeCard(model, 10 * gib, {1.0: 1 * gib}, 0.1 * gib, fail_above=15 * gib)
    try:
        plan = fit_compiled_activations(model, lambda: None, 9 * gib, peak_of=card.peak_of)
        assert plan.probes[0][2] == float("inf")  # the first probe ran out of memory: it does not fit
        assert plan.whole_layers == 8 and not plan.fits and plan.peak == min(p for _, _, p in plan.probes)
        assert "nothing tried fits" in plan.describe()
        assert all(layer.gradient_checkpointing for layer in card.layers())
    finally:
        card.config.activation_memory_budget = 1.0
