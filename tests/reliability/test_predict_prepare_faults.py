"""`omgseg predict` on damaged images and JSON files, and `omgseg prepare` on a config whose
source folder is damaged: one line naming the file and exit 1, or a complete output."""

import json
import shutil

import pytest
import torch
import yaml
from reliability.faults import assert_one_line_error, budget_params, damaged_copy, fault_names, faults, files_under, fuzz, run_cli

from omgseg.datasets.manifest import MANIFEST, read_manifest


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from omgseg.model.checkpoint import save_checkpoint
    from omgseg.model.config import model_config
    from omgseg.model.omgseg import OMGSeg

    torch.manual_seed(0)
    return save_checkpoint(OMGSeg(model_config("tiny")), tmp_path_factory.mktemp("ckpt") / "model.pt")


@pytest.mark.parametrize("examples", budget_params(6, 60))
def test_predict_damaged_inputs(examples, sources, checkpoint, tmp_path):
    clean = tmp_path / "clean"
    shutil.copytree(sources["coco-panoptic"] / "val2017", clean / "images")
    shutil.copy(sources["coco-panoptic"] / "annotations" / "panoptic_val2017.json", clean / "coco.json")

    def check(fault) -> None:
        with damaged_copy(clean, fault, tmp_path) as folder:
            out = folder.parent / "out"
            outcome = run_cli(["predict", "--checkpoint", checkpoint, "--task", "panoptic", "--input",
                               folder / "images", "--out", out, "--coco-json", folder / "coco.json",
                               "--vocabulary", folder / "coco.json"])
            if outcome.code == 0:
                summary = json.loads(outcome.out.strip().splitlines()[-1])
                written = json.loads((out / "panoptic.json").read_text())
                assert summary["inputs"] == len(written["annotations"]) == len(list((out / "panoptic").glob("*.png")))
            else:
                assert_one_line_error(outcome, "predict", fault_names(fault), fault)
                assert not (out / "panoptic.json").exists(), f"{fault}: a failed predict left panoptic.json"

    fuzz(faults(clean, files_under(clean)), check, examples)


@pytest.mark.parametrize("examples", budget_params(4, 40))
def test_prepare_with_a_damaged_source(examples, sources, tmp_path):
    clean = sources["davis"]

    def check(fault) -> None:
        with damaged_copy(clean, fault, tmp_path, "davis") as src:
            case = src.parent
            config = {"name": "damaged", "mix": {"davis": 1},
                      "data": {"root": str(case / "data"),
                               "datasets": {"davis": {"format": "davis", "src": str(src)}}}}
            (case / "config.yaml").write_text(yaml.safe_dump(config))
            outcome = run_cli(["prepare", "--config", case / "config.yaml"])
            shard_dirs = list((case / "data").rglob(MANIFEST))
            if outcome.code == 0:
                assert len(shard_dirs) == 1 and read_manifest(shard_dirs[0].parent).total_samples >= 1
            else:
                assert_one_line_error(outcome, "prepare", fault_names(fault), fault)
                assert not shard_dirs, f"{fault}: a failed prepare left a finished manifest"

    fuzz(faults(clean, files_under(clean, lambda rel: "train" in rel)), check, examples)
