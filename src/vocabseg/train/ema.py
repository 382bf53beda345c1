"""Exponential moving average of a module's weights: weight averaging and momentum teachers.

``shadow = d · shadow + (1 − d) · param`` after each optimiser step, for the parameters that train;
buffers (e.g. normalisation statistics) are copied. The same helper serves as a momentum teacher
(a frozen copy that trails the student), with ``decay`` a number or a function of the step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..errors import CheckpointError

__all__ = ["EMA"]


class EMA:
    """A no-grad shadow copy of ``model`` that trails it by exponential averaging.

    Only parameters that require grad when the EMA is created are averaged (frozen ones never change,
    so the copy's are already right); persistent buffers are copied at every update. The shadow is
    in eval mode.
    """

    def __init__(self, model: nn.Module, decay: float | Callable[[int], float]):
        if not callable(decay) and not 0.0 <= float(decay) <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.model = model
        self.decay = decay
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)
        self._params = [n for n, p in model.named_parameters() if p.requires_grad]
        persistent = set(model.state_dict(keep_vars=True))
        self._buffers = [n for n, _ in model.named_buffers() if n in persistent]

    def decay_at(self, step: int | None) -> float:
        if callable(self.decay):
            if step is None:
                raise ValueError("this EMA's decay depends on the step; pass update(step)")
            return float(self.decay(step))
        return float(self.decay)

    @torch.no_grad()
    def update(self, step: int | None = None) -> None:
        """One averaging step with the model's current weights."""
        d = self.decay_at(step)
        src_p = dict(self.model.named_parameters())
        dst_p = dict(self.shadow.named_parameters())
        for name in self._params:
            shadow, param = dst_p[name], src_p[name].detach()
            if shadow.is_floating_point():
                shadow.mul_(d).add_(param.to(shadow.dtype), alpha=1.0 - d)
            else:
                shadow.copy_(param)
        src_b = dict(self.model.named_buffers())
        dst_b = dict(self.shadow.named_buffers())
        for name in self._buffers:
            dst_b[name].copy_(src_b[name])

    def state_dict(self) -> dict[str, Tensor]:
        """The averaged parameters and copied buffers, by the model's state-dict names."""
        params = dict(self.shadow.named_parameters())
        buffers = dict(self.shadow.named_buffers())
        out = {n: params[n].detach() for n in self._params}
        out.update({n: buffers[n].detach() for n in self._buffers})
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Strict inverse of :meth:`state_dict`."""
        own = self.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        shapes = [n for n in own if n in state and tuple(own[n].shape) != tuple(state[n].shape)]
        if missing or unexpected or shapes:
            raise CheckpointError(
                "The stored EMA weights do not fit the model: "
                f"missing {missing[:4]}, unexpected {unexpected[:4]}, shape mismatch {shapes[:4]}."
            )
        for name, tensor in own.items():
            tensor.copy_(state[name])
