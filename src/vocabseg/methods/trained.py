"""The base of every trained method: a head on an open_clip CLIP, trainable by ``vocabseg train``.

It implements the trainer's model contract (:class:`vocabseg.train.model.TrainableModel`) once:
named parameter groups (the head, and the parts of CLIP a method fine-tunes, so a recipe can give
CLIP a ×0.01 learning rate), the checkpoint config (method, options, base CLIP) and the tensors a
checkpoint stores. Subclasses build their head, say which CLIP parameters they fine-tune, and write
:meth:`logits` (inference) and :meth:`training_step` (the loss).
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from .base import SegmentationMethod


class TrainedCLIPMethod(SegmentationMethod):
    """A trained head on CLIP. CLIP is frozen unless a subclass re-enables gradients on parts of it.

    Attributes:
        clip: the open_clip CLIP model (a registered sub-module: it moves with ``.to()``).
        clip_identity: ``{"model": ..., "pretrained": ...}`` of the base CLIP, written to checkpoints
            so the same base can be rebuilt; set by whoever loaded CLIP.
        store_clip: also store every CLIP tensor in checkpoints (needed when CLIP's weights cannot be
            rebuilt from a name and tag, e.g. random or in-memory models).
    """

    method_name = ""
    method_options: dict[str, Any]

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip
        self.clip.requires_grad_(False)
        self.clip_identity: dict[str, Any] = {"model": None, "pretrained": None}
        self.store_clip = False
        self.method_options = {}
        self.register_buffer("class_text", torch.zeros(0), persistent=False)

    # -- training text ----------------------------------------------------------------------------------
    def set_class_text(self, text: torch.Tensor) -> None:
        """The (K, D) (or (K, P, D)) unit text embeddings of the training classes, in label order."""
        self.class_text = text.detach().to(self.class_text.device)

    def prepare_training(self, clip: Any, dataset: Any) -> None:
        """Called once before training with the base CLIP (a ``LoadedCLIP``: model and tokenizer) and
        the training dataset: whatever the method needs from both. The default suits a frozen text
        tower: the prompt-ensembled embeddings of the dataset's classes (``dataset.vocabulary``), with
        the method's published templates. Methods that fine-tune the text tower (keep the tokenized
        prompts instead) or learn without class labels (prompts of their own, captions) override it.
        """
        from ..text.encoder import TextEncoder
        from ..text.templates import resolve_templates
        from .registry import get_method_spec

        spec = get_method_spec(self.method_name)
        encoder = TextEncoder(clip.model, clip.tokenizer, resolve_templates(spec.templates), cache_dir=None)
        names = [c.names[0] for c in dataset.vocabulary.classes]
        self.set_class_text(encoder.encode(names, per_template=spec.text_input == "per_template"))

    # -- the trainer's contract ---------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """``clip``: fine-tuned CLIP parameters; ``head``: everything else that trains."""
        groups: dict[str, list[nn.Parameter]] = {"head": [], "clip": []}
        for name, p in self.named_parameters():
            if p.requires_grad:
                groups["clip" if name.startswith("clip.") else "head"].append(p)
        return {k: v for k, v in groups.items() if v}

    def _stored_names(self) -> list[str]:
        state = self.state_dict(keep_vars=True)
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        names = []
        for name in state:
            in_clip = name.startswith("clip.")
            if (
                self.store_clip
                and in_clip
                or name in trainable
                or (not in_clip and not self._is_frozen_submodule_tensor(name))
            ):
                names.append(name)
        return names

    def _is_frozen_submodule_tensor(self, name: str) -> bool:
        """Tensors of modules shared with CLIP under another name (e.g. a dense method's tower)."""
        return any(name.startswith(prefix) for prefix in self.shared_clip_prefixes())

    def shared_clip_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of sub-modules that are CLIP itself under another name (not stored)."""
        return ()

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        state = self.state_dict()
        return {n: state[n].detach().clone().contiguous() for n in self._stored_names()}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load stored tensors strictly: a missing, unexpected or mis-shaped tensor is an error."""
        expected = self.state_dict()
        wanted = set(self._stored_names())
        missing = sorted(wanted - set(state))
        unexpected = sorted(set(state) - set(expected))
        shape = [
            f"{n}: checkpoint {tuple(t.shape)} vs model {tuple(expected[n].shape)}"
            for n, t in state.items()
            if n in expected and tuple(t.shape) != tuple(expected[n].shape)
        ]
        problems = []
        if missing:
            problems.append(f"missing {len(missing)} tensor(s), e.g. {', '.join(missing[:4])}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected tensor(s), e.g. {', '.join(unexpected[:4])}")
        if shape:
            problems.append("shape mismatch: " + "; ".join(shape[:4]))
        if problems:
            raise CheckpointError(
                f"These weights do not fit method {self.method_name!r} with options "
                f"{json.dumps(self.method_options, default=str)}: " + "; ".join(problems) + ". Was the checkpoint "
                "trained with another method, head size or CLIP model?"
            )
        self.load_state_dict(state, strict=False)

    def checkpoint_config(self) -> dict[str, Any]:
        return {
            "method": self.method_name,
            "options": {k: v for k, v in self.method_options.items() if _is_json(v)},
            "clip": dict(self.clip_identity),
            "stores_clip": self.store_clip,
        }


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value)
    except TypeError:
        return False
    return True
