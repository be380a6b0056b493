"""Activation checkpointing that leaves module names (and so state dicts) untouched."""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def enable_checkpointing(modules: Iterable[nn.Module]) -> None:
    """Recompute each module's activations in backward instead of storing them.

    The module's bound ``forward`` is wrapped in place (no wrapper module), so parameter names
    and saved checkpoints are the same with and without checkpointing. Only applies while
    gradients are enabled: inference runs the plain forward.
    """
    for module in modules:
        if getattr(module, "_caldm_checkpointed", False):
            continue
        plain = module.forward

        @functools.wraps(plain)
        def forward(*args, _plain=plain, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_plain, *args, use_reentrant=False, **kwargs)
            return _plain(*args, **kwargs)

        module.forward = forward
        module._caldm_checkpointed = True
