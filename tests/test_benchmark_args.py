"""The model benchmarks refuse what would give meaningless numbers, with a one-line reason;
profile_model's side-by-side profile finds Mask2Former's parts."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).parent / "benchmarks"


def _script(name: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # profile_model imports bench_model from its folder
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["bench_model", "profile_model"])
def test_amp_is_refused_on_a_cpu_without_bfloat16_instructions(name, monkeypatch, capsys):
    script = _script(name, monkeypatch)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    with pytest.raises(SystemExit):
        script.main(["--amp", "--sizes", "tiny"])
    assert "no bfloat16 instructions" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["bench_model", "profile_model"])
def test_the_model_benchmarks_need_a_step(name, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        _script(name, monkeypatch).main(["--steps", "0"])
    assert "--steps must be at least 1" in capsys.readouterr().err


def test_profile_model_puts_mask2former_beside_ours_part_by_part():
    # One step at the tiny size: every part both models have is found in Mask2Former too (its
    # modules were marked), and the tables name both models. Needs the bench extra. In a
    # process of its own: marking the parts wraps functions of omgseg's modules.
    pytest.importorskip("transformers")
    run = subprocess.run([sys.executable, str(BENCHMARKS / "profile_model.py"), "--sizes", "tiny", "--steps", "1",
                          "--mask2former"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    common = json.loads(out.strip().splitlines()[-1])["tiny"]["by_common_part_ms"]
    shared = {"backbone", "pixel decoder: deformable attention", "matching", "optimizer (AdamW)",
              "losses (with the uncertain point selection)", "decoder layers: cross-attention, self-attention, FFN",
              "decoder: queries, heads, mask logits, attention masks",
              "pixel decoder: encoder FFN, norms, projections, stride-4 convolutions"}
    assert shared <= set(common["omgseg_train"]) and shared <= set(common["mask2former_train"])
    assert all(common["mask2former_train"][part] > 0 for part in shared)
    assert "post-processing and upsampling (ours only)" not in common["omgseg_infer"]
    assert "| part | omgseg | Mask2Former | ours / theirs |" in out
