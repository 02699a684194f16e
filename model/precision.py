"""Where the model keeps float32 under bfloat16 autocast.

A training step runs under `torch.autocast(dtype=torch.bfloat16)` on CUDA: convolutions, linear
layers and attention in bfloat16, the rest as autocast decides. bfloat16 keeps 8 bits of
mantissa, about 2.4 significant digits, which is too coarse in three places, so these run in
float32 whatever autocast does:

- sampling locations (deformable attention, the losses' and the matcher's points): a location
  in bfloat16 is off by up to 1/256 of the map, 5 pixels of a 1280-wide input;
- class logits: cosines times a logit scale of 100, so bfloat16's rounding of a cosine
  (about 0.004) would move a logit by 0.4;
- the matching costs and the losses, which sum over thousands of points.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch


def full_precision(device: torch.device) -> AbstractContextManager:
    """A context in which autocast is off on `device` (nothing to turn off on a device without autocast)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return nullcontext()
