"""train_step: a non-finite loss stops the loop with one line naming the step and every term."""

import itertools
import math
from types import SimpleNamespace

import pytest
import torch
from golden_model import golden_inputs

from omgseg.model.config import tiny
from omgseg.model.criterion import LossWeights
from omgseg.model.omgseg import OMGSeg
from omgseg.platform.training.batches import TrainBatch
from omgseg.platform.training.loop import TrainParts, WorkerState, train_loop


def test_a_non_finite_term_stops_the_loop_naming_the_step_and_every_term():
    torch.manual_seed(0)
    model = OMGSeg(tiny().replace(loss=LossWeights(prompt_bce=math.inf)))
    images, vocabulary, prompts, targets = golden_inputs()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    parts = TrainParts(
        config=SimpleNamespace(steps=3, optimizer=SimpleNamespace(grad_clip=0.01, amp=True)), model=model,
        forward=model, optimizer=optimizer, scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
        vocabulary=vocabulary, device=torch.device("cpu"),
        batches=(batch for batch in itertools.repeat(  # a generator: the loop closes its batches
            TrainBatch(images=images, targets=targets, prompts=prompts, datasets=("coco", "coco")))))
    state = WorkerState(step=1, counts={})
    with pytest.raises(FloatingPointError) as caught:
        train_loop(parts, state)
    message = str(caught.value)
    assert message.startswith("step 1: non-finite loss: loss_ce_aux0=") and "\n" not in message
    assert "loss_prompt_mask=inf" in message and "loss_mask=" in message and message.endswith("loss_zero_anchor=0")
    assert message.count("=") == 7 * 5 + 1  # every term of the seven prediction sets, and the anchor
    assert state.step == 1  # the failed step is not counted as done
