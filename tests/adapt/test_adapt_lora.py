"""The LoRA baseline (peft): the adapted model starts as the base, only A and B train,
the trainable count is r·(m + n) per matrix, and the SVF training loop trains it."""

from __future__ import annotations

import pytest
import torch

from shoal.adapt.lora import ATTENTION_PROJECTIONS, wrap_lora
from shoal.adapt.svf import AdaptError


def test_starts_as_the_base_and_counts_r_times_m_plus_n(make_llama, input_ids) -> None:
    base = make_llama(0)
    with torch.no_grad():
        want = base(input_ids).logits.clone()
    shapes = {
        n: (m.out_features, m.in_features)
        for n, m in base.named_modules()
        if n.rsplit(".", 1)[-1] in ATTENTION_PROJECTIONS
    }
    lora = wrap_lora(base, rank=4)
    with torch.no_grad():
        assert torch.equal(lora(input_ids=input_ids).logits, want)  # B = 0 at the start
    assert len(shapes) == 8  # q, k, v, o in two blocks
    assert lora.num_trainable() == sum(4 * (m + n) for m, n in shapes.values())
    trainable = {n for n, p in lora.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_gradient_reaches_only_the_adapters_and_state_round_trips(make_llama, input_ids) -> None:
    lora = wrap_lora(make_llama(0), rank=2, seed=3)
    saved = lora.get_z()
    loss = lora(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    for n, p in lora.model.named_parameters():
        assert (p.grad is not None) == ("lora_" in n), n
    opt = torch.optim.SGD(list(lora.parameters()), lr=1.0)
    opt.step()
    moved = lora.get_z()
    assert any(not torch.equal(saved[k], moved[k]) for k in saved)
    lora.set_z(saved)
    assert all(torch.equal(saved[k], v) for k, v in lora.get_z().items())
    with pytest.raises(AdaptError, match="names differ"):
        lora.set_z({"nope": torch.zeros(1)})


def test_seed_fixes_the_initialisation(make_llama) -> None:
    a = wrap_lora(make_llama(0), rank=2, seed=7).get_z()
    b = wrap_lora(make_llama(0), rank=2, seed=7).get_z()
    c = wrap_lora(make_llama(0), rank=2, seed=8).get_z()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [({"rank": 0}, "rank: 0 must be positive"), ({"targets": ("nope",)}, "no module")],
)
def test_bad_options_are_one_line(make_llama, kwargs, needle) -> None:
    with pytest.raises(AdaptError, match=needle):
        wrap_lora(make_llama(0), **kwargs)
