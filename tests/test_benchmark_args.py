"""The model benchmarks refuse what would give meaningless numbers, with a one-line reason."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).parent / "benchmarks"


def _script(name: str):
    sys.path.insert(0, str(BENCHMARKS))  # profile_model imports bench_model from its folder
    try:
        spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


@pytest.mark.parametrize("name", ["bench_model", "profile_model"])
def test_amp_is_refused_on_a_cpu_without_bfloat16_instructions(name, monkeypatch, capsys):
    script = _script(name)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    with pytest.raises(SystemExit):
        script.main(["--amp", "--sizes", "tiny"])
    assert "no bfloat16 instructions" in capsys.readouterr().err


def test_bench_model_needs_a_step(capsys):
    with pytest.raises(SystemExit):
        _script("bench_model").main(["--steps", "0"])
    assert "--steps must be at least 1" in capsys.readouterr().err


def test_profile_model_puts_mask2former_beside_ours_part_by_part(capsys):
    # One step at the tiny size: every part both models have is found in Mask2Former too (its
    # modules were marked), and the tables name both models. Needs the bench extra.
    pytest.importorskip("transformers")
    _script("profile_model").main(["--sizes", "tiny", "--steps", "1", "--mask2former"])
    out = capsys.readouterr().out
    common = json.loads(out.strip().splitlines()[-1])["tiny"]["by_common_part_ms"]
    shared = {"backbone", "pixel decoder: deformable attention", "matching", "optimizer (AdamW)",
              "losses (with the uncertain point selection)", "decoder layers: cross-attention, self-attention, FFN",
              "decoder: queries, heads, mask logits, attention masks",
              "pixel decoder: encoder FFN, norms, projections, stride-4 convolutions"}
    assert shared <= set(common["omgseg_train"]) and shared <= set(common["mask2former_train"])
    assert all(common["mask2former_train"][part] > 0 for part in shared)
    assert "post-processing and upsampling (ours only)" not in common["omgseg_infer"]
    assert "| part | omgseg | Mask2Former | ours / theirs |" in out
