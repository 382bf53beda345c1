"""EMA: the averaging equation, buffers, frozen parameters and a strict state round trip."""

from __future__ import annotations

import pytest
import torch

from vocabseg.errors import CheckpointError
from vocabseg.train import EMA

from .toy import ToySegModel


def test_update_is_the_ema_equation():
    model = ToySegModel(seed=0)
    ema = EMA(model, decay=0.9)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = dict(start)
    for k in range(3):
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(k)))
        model.seen += 5
        ema.update()
        for n, p in model.named_parameters():
            if p.requires_grad:
                expected[n] = 0.9 * expected[n] + 0.1 * p.detach()
    shadow = dict(ema.shadow.named_parameters())
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(shadow[n], expected[n], rtol=1e-6, atol=1e-7)
            assert not torch.allclose(shadow[n], p) and not torch.allclose(shadow[n], start[n])
        else:
            assert torch.equal(shadow[n], start[n])  # frozen parameters are not averaged
        assert not shadow[n].requires_grad
    assert int(ema.shadow.seen) == 15  # buffers are copied
    assert not ema.shadow.training


def test_decay_may_depend_on_the_step():
    model = ToySegModel(seed=0)
    ema = EMA(model, decay=lambda step: 0.0 if step < 2 else 1.0)
    with torch.no_grad():
        model.head.bias.fill_(3.0)
    ema.update(step=1)  # decay 0: the shadow becomes the model
    assert torch.equal(ema.shadow.head.bias, model.head.bias)
    with torch.no_grad():
        model.head.bias.fill_(-1.0)
    ema.update(step=2)  # decay 1: the shadow stays
    assert torch.equal(ema.shadow.head.bias, torch.full((3,), 3.0))
    with pytest.raises(ValueError, match="pass update"):
        ema.update()


def test_state_round_trip_is_strict():
    model = ToySegModel(seed=0)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model.body.weight.add_(1.0)
    ema.update()
    state = {k: v.clone() for k, v in ema.state_dict().items()}
    assert sorted(state) == ["body.bias", "body.weight", "head.bias", "head.weight", "seen"]  # no frozen stem
    other = EMA(ToySegModel(seed=0), decay=0.5)
    other.load_state_dict(state)
    for k, v in other.state_dict().items():
        assert torch.equal(v, state[k])
    with pytest.raises(CheckpointError, match="missing.*head.bias"):
        other.load_state_dict({k: v for k, v in state.items() if k != "head.bias"})
    with pytest.raises(CheckpointError, match="shape mismatch.*body.bias"):
        other.load_state_dict({**state, "body.bias": torch.zeros(3)})
