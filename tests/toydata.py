"""Tiny clips and shard metadata shared by the data tests."""

import io

import numpy as np
from PIL import Image

from omgseg.core.structures import Category, Task
from omgseg.datasets.clip import Clip, Segment
from omgseg.datasets.manifest import ShardMeta

TOY_META = ShardMeta("toy", "toy-format", "train", (Task.PANOPTIC,), (Category(id=1, name="thing", isthing=True),))
SOURCE = {"format": "toy-format", "src": "/nowhere", "split": "train"}


def tiny_clip(index: int) -> Clip:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), index % 256, dtype=np.uint8)).save(buffer, format="JPEG")
    ids = np.zeros((1, 8, 8), dtype=np.uint32)
    ids[0, 2:5, 2:5] = index + 1
    return Clip(
        dataset="toy",
        source_id=str(index),
        frame_names=(f"{index}.jpg",),
        images=[buffer.getvalue()],
        image_ext="jpg",
        id_maps=ids,
        segments=[Segment(id=index + 1, category_id=1, iscrowd=False, track_id=index + 1, area=(9,))],
        tasks=(Task.PANOPTIC,),
    )
