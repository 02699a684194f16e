"""The small study several test files share (tables, MLflow runs, checkpoints): run once."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "studies" / "configs" / "default.yaml"
SMALL = [  # 2 data sets, singletons + pairs, 2 seeds: 6 trials of a few steps
    "train_datasets=[coco, davis]", "seeds=[0, 1]", "train.steps=4", "train.log_every=2", "train.checkpoint_every=2",
    "train.eval_samples=1", "evaluation={coco: [panoptic, semantic], davis: [vos]}", "affinity.every=2",
    "combinations=[singletons, pairs]",
]


def small_overrides(data_root: Path) -> list[str]:
    return [f"data.root={data_root}", *SMALL]
