"""The small study several test files share (tables, MLflow runs, checkpoints): run once."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "studies" / "configs" / "default.yaml"
SMALL = [  # 2 data sets, singletons + pairs, 2 seeds: 6 trials of a few steps
    "train_datasets=[coco, davis]", "seeds=[0, 1]", "train.steps=4", "train.log_every=2", "train.checkpoint_every=2",
    "train.eval_samples=1", "train.val_samples=4", "evaluation={coco: [panoptic, semantic], davis: [vos]}",
    "train.affinity={enabled: true, every: 2, batch_size: 2, heldout_samples: 2}", "affinity_seeds=null",
    "combinations=[singletons, pairs]",
]


def small_overrides(data_root: Path) -> list[str]:
    return [f"data.root={data_root}", *SMALL]
