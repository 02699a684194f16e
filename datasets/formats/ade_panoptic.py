"""ADE20K panoptic (`ade-panoptic`), as detectron2's `prepare_ade20k_pan_seg.py` lays it out.

    DIR/ADEChallengeData2016/ade20k_panoptic_{train,val}.json
    DIR/ADEChallengeData2016/ade20k_panoptic_{train,val}/<name>.png
    DIR/ADEChallengeData2016/images/{training,validation}/<name>.jpg

The JSON and PNGs are COCO panoptic's, so the COCO panoptic reader does the work; only the
paths differ (and image ids are strings such as "ADE_train_00000001").
"""

from __future__ import annotations

from pathlib import Path

from omgseg.core.structures import Task
from omgseg.datasets.formats.coco_panoptic import PanopticLayout, panoptic_format

_IMAGE_FOLDERS = {"train": "training", "val": "validation"}


def ade_layout(src: Path, split: str) -> PanopticLayout:
    if split not in _IMAGE_FOLDERS:
        raise ValueError(f"ADE20K panoptic split must be one of {sorted(_IMAGE_FOLDERS)}, got {split!r}")
    root = Path(src) / "ADEChallengeData2016"
    return PanopticLayout(
        json_path=root / f"ade20k_panoptic_{split}.json",
        png_dir=root / f"ade20k_panoptic_{split}",
        image_dir=root / "images" / _IMAGE_FOLDERS[split],
    )


FORMAT = panoptic_format(
    "ade-panoptic", "ade20k_panoptic", (Task.PANOPTIC, Task.INSTANCE, Task.SEMANTIC), ade_layout
)
