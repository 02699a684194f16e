"""Tensors that depend only on sizes (position encodings, reference points), built once per
size, device and dtype. At the small model's size, building them on every forward costs about
as much as one decoder layer."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable[..., torch.Tensor])


def sized_constant(build: F) -> F:
    """Cache `build`'s tensor by its positional arguments (sizes, device, dtype: all hashable).

    The tensor is built outside inference mode and without gradients, so one first built
    during `predict` serves a training step too; callers must not modify it in place. Under
    torch.compile the function runs uncached, so the compiled graph computes (and folds) it.
    """
    cached = functools.lru_cache(maxsize=64)(build)

    @functools.wraps(build)
    def get(*args):
        if torch.compiler.is_compiling():
            return build(*args)
        with torch.inference_mode(False), torch.no_grad():
            return cached(*args)

    return get  # type: ignore[return-value]
