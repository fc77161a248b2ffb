"""Gradient clipping with the reference's semantics at the cost of a one-sided step.

The paper's code clips the global norm of encoder and decoder gradients together,
then steps one side. ``joint-exact`` does the same (a one-sided step then computes
both sides' gradients); ``joint`` takes the other side's norm from its latest
computed gradient, so a guide-only step never computes the model's gradients;
``separate`` clips each side's gradients alone.
"""
from __future__ import annotations

from typing import Iterable

import torch

CLIP_SCOPES = ("joint", "joint-exact", "separate")
SIDES = ("guide", "model")


def _other(side: str) -> str:
    return "model" if side == "guide" else "guide"


def grad_norm(params: Iterable[torch.Tensor]) -> torch.Tensor | None:
    """The global 2-norm of these parameters' gradients (None when none has one)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    return torch.nn.utils.get_total_norm(grads).detach()


class GradientClipper:
    """Scales one side's gradients so that the joint norm is at most ``max_norm`` (None: never).

    Keeps each side's latest gradient norm; ``needs_other_side(side)`` says whether a
    step of ``side`` must compute the other side's gradients too.
    """

    def __init__(self, max_norm: float | None, scope: str = "joint-exact") -> None:
        if max_norm is not None and not max_norm > 0:
            raise ValueError("clip_norm must be positive or None")
        if scope not in CLIP_SCOPES:
            raise ValueError(f"clip_scope must be one of {', '.join(CLIP_SCOPES)}, got {scope!r}")
        self.max_norm = max_norm
        self.scope = scope
        self.last_norm: dict[str, torch.Tensor | None] = {side: None for side in SIDES}

    def needs_other_side(self, side: str) -> bool:
        if self.max_norm is None or self.scope == "separate":
            return False
        return self.scope == "joint-exact" or self.last_norm[_other(side)] is None

    def clip_all(self, params: Iterable[torch.Tensor]) -> None:
        """A joint step: clip every gradient together, as ``clip_grad_norm_`` does."""
        if self.max_norm is None:
            return
        with_grad = [p for p in params if p.grad is not None]
        if with_grad:
            torch.nn.utils.clip_grad_norm_(with_grad, self.max_norm)

    def clip_side(self, side: str, stepped: list[torch.Tensor], other: list[torch.Tensor]) -> None:
        """Clip the gradients of ``stepped`` (one side); ``other`` holds the other side's, when computed.
        Without clipping there is nothing to do (the norms are kept for clipping only)."""
        if self.max_norm is None:
            return
        own = grad_norm(stepped)
        other_norm = grad_norm(other)
        if own is not None:
            self.last_norm[side] = own
        if other_norm is not None:
            self.last_norm[_other(side)] = other_norm
        if own is None:
            return
        if self.scope == "separate":
            total = own
        else:
            known = self.last_norm[_other(side)]
            total = own if known is None else torch.linalg.vector_norm(torch.stack([own, known.to(own.device)]))
        torch.nn.utils.clip_grads_with_norm_([p for p in stepped if p.grad is not None], self.max_norm, total)

    def state_dict(self) -> dict:
        return {side: None if n is None else float(n) for side, n in self.last_norm.items()}

    def load_state_dict(self, state: dict) -> None:
        for side in SIDES:
            value = state.get(side)
            self.last_norm[side] = None if value is None else torch.tensor(value, dtype=torch.float32)
