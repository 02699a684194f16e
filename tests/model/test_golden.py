"""The tiny model computes what it computed before its speed work (tests/golden_model.py).

Tolerance: float32 sums taken in another order (fused attention, batched sampling and
matching) differ by rounding only: loss terms and gradient norms agree to 1e-4 relative,
logits to 2e-3 absolute (class logits are cosines x 100), probabilities to 1e-5.
"""

import pytest
import torch
from golden_model import GOLDEN, golden_model, golden_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.manual_seed(0)
    return golden_run(golden_model(tmp_path_factory.mktemp("golden")))


@pytest.fixture(scope="module")
def reference():
    return torch.load(GOLDEN, weights_only=True)


def _close(key: str, got: torch.Tensor, want: torch.Tensor) -> None:
    if key.startswith(("loss/", "grad/")):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=lambda m: f"{key}: {m}")
    elif "probs" in key:
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=lambda m: f"{key}: {m}")
    else:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-3, msg=lambda m: f"{key}: {m}")


def test_the_same_tensors_are_recorded(run, reference):
    assert sorted(run) == sorted(reference)


@pytest.mark.parametrize("group", ["loss/", "grad/", "set", "predict"])
def test_outputs_match_the_reference(run, reference, group):
    keys = [k for k in reference if k.startswith(group)]
    assert keys
    for key in keys:
        _close(key, run[key], reference[key])
