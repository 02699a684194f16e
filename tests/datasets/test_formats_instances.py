"""COCO instances reader and its overlap rule, on tiny fixtures written here in the real layout."""

import io
import json
import warnings
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

from omgseg.core.structures import Category, Task
from omgseg.datasets.clip import Segment
from omgseg.datasets.formats import get_format
from omgseg.datasets.formats.coco_instances import resolve_overlaps

H, W = 10, 12
POLYGON = [0.0, 0.0, 8.0, 0.0, 8.0, 6.0, 0.0, 6.0]


def jpeg_bytes(height: int, width: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def box(rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[rows, cols] = True
    return mask


def compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [H, W], "counts": rle["counts"].decode("ascii")}


def uncompressed_rle(mask: np.ndarray) -> dict:
    """Column-major run lengths starting with a background run, as COCO stores crowds."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return {"size": [H, W], "counts": counts}


with warnings.catch_warnings():  # pycocotools' numpy-2 deprecation noise
    warnings.simplefilter("ignore", DeprecationWarning)
    # What pycocotools rasterises the polygon to: the fixture's ground truth.
    POLY_MASK = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([POLYGON], H, W))).astype(bool)
SMALL = box(slice(4, 8), slice(6, 10))  # 16 px, overlaps the polygon
CROWD = box(slice(5, 7), slice(5, 8))  # 6 px: smaller than SMALL, but crowd loses anyway


def write_coco(root: Path, crowd_id: int = 13) -> None:
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    for seed, image_id in enumerate((7, 2)):
        (root / "val2017" / f"{image_id:012d}.jpg").write_bytes(jpeg_bytes(H, W, seed))
    data = {
        "images": [
            {"id": 7, "file_name": "000000000007.jpg", "height": H, "width": W},
            {"id": 2, "file_name": "000000000002.jpg", "height": H, "width": W},
        ],
        "annotations": [
            {
                "id": 12,
                "image_id": 7,
                "category_id": 2,
                "iscrowd": 0,
                "segmentation": compressed_rle(SMALL),
                "area": 16,
                "bbox": [6, 4, 4, 4],
            },
            {
                "id": 11,
                "image_id": 7,
                "category_id": 1,
                "iscrowd": 0,
                "segmentation": [POLYGON],
                "area": 48,
                "bbox": [0, 0, 8, 6],
            },
            {
                "id": crowd_id,
                "image_id": 7,
                "category_id": 1,
                "iscrowd": 1,
                "segmentation": uncompressed_rle(CROWD),
                "area": 6,
                "bbox": [5, 5, 3, 2],
            },
            # Two points enclose nothing: listed in the JSON, absent from the map.
            {
                "id": 14,
                "image_id": 7,
                "category_id": 2,
                "iscrowd": 0,
                "segmentation": [[1, 1, 3, 3]],
                "area": 0,
                "bbox": [1, 1, 2, 2],
            },
        ],
        "categories": [
            {"id": 1, "name": "person", "supercategory": "person"},
            {"id": 2, "name": "dog", "supercategory": "animal"},
        ],
    }
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(data))


def expected_map(ids: tuple[int, int, int]) -> tuple[np.ndarray, int]:
    """The resolution rule by hand: crowd painted first, then larger before smaller."""
    poly_id, small_id, crowd_id = ids
    out = np.zeros((H, W), dtype=np.uint32)
    out[CROWD] = crowd_id
    out[POLY_MASK] = poly_id
    out[SMALL] = small_id
    coverage = CROWD.astype(int) + POLY_MASK + SMALL
    return out, int((coverage > 1).sum())


@pytest.fixture
def coco(tmp_path: Path) -> Path:
    write_coco(tmp_path)
    return tmp_path


def test_coco_instances_decodes_every_encoding_and_resolves_overlaps(coco: Path):
    fmt = get_format("coco-instances")
    assert fmt.dataset == "coco_instances" and fmt.tasks == (Task.INSTANCE, Task.INTERACTIVE)
    assert fmt.categories(coco, "val") == [Category(1, "person", True), Category(2, "dog", True)]
    assert fmt.count(coco, "val") == 2

    empty, clip = list(fmt.clips(coco, "val", None))
    assert empty.source_id == "2" and empty.segments == [] and not empty.id_maps.any()
    assert empty.extra == {"overlap_pixels": 0}

    assert clip.source_id == "7" and clip.frame_names == ("000000000007.jpg",)
    assert clip.images == [(coco / "val2017" / "000000000007.jpg").read_bytes()]
    want, overlap = expected_map((11, 12, 13))
    np.testing.assert_array_equal(clip.id_maps[0], want)
    assert overlap > 0
    crowd_left = int((CROWD & ~POLY_MASK & ~SMALL).sum())
    assert clip.segments == [
        Segment(id=11, category_id=1, iscrowd=False, track_id=11, area=(int((POLY_MASK & ~SMALL).sum()),)),
        Segment(id=12, category_id=2, iscrowd=False, track_id=12, area=(16,)),
        Segment(id=13, category_id=1, iscrowd=True, track_id=13, area=(crowd_left,)),
    ]
    assert clip.extra == {"overlap_pixels": overlap, "hidden_annotations": [14]}


def test_coco_crowd_ids_beyond_24_bits_renumber_the_image(tmp_path: Path):
    crowd = 900100000001
    write_coco(tmp_path, crowd_id=crowd)
    clip = list(get_format("coco-instances").clips(tmp_path, "val", None))[1]
    # Annotation ids 11, 12, 14, crowd -> 1, 2, 3, 4 in id order.
    np.testing.assert_array_equal(clip.id_maps[0], expected_map((1, 2, 4))[0])
    assert [(s.id, s.track_id, s.iscrowd) for s in clip.segments] == [
        (1, 1, False),
        (2, 2, False),
        (4, 4, True),
    ]
    assert clip.extra["annotation_ids"] == {"1": 11, "2": 12, "3": 14, "4": crowd}


def test_resolve_overlaps_prefers_non_crowd_then_smaller_then_lower_id():
    a = box(slice(0, 4), slice(0, 4))  # 16 px
    b = box(slice(0, 2), slice(0, 2))  # 4 px, inside a
    c = box(slice(0, 2), slice(0, 2))  # same size as b, higher id
    crowd = box(slice(0, 1), slice(0, 1))  # 1 px, inside all
    id_map, overlap = resolve_overlaps(H, W, [(5, a, False), (9, c, False), (8, b, False), (1, crowd, True)])
    assert id_map[0, 0] == 8 and id_map[1, 1] == 8 and id_map[3, 3] == 5
    assert int((id_map == 1).sum()) == 0 and overlap == 4
    assert resolve_overlaps(H, W, [])[1] == 0


def edit_json(root: Path, edit) -> None:
    path = root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def set_ann(key, value, index=0):
    def edit(data):
        data["annotations"][index][key] = value

    return edit


def drop_ann_field(key):
    def edit(data):
        del data["annotations"][0][key]

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            set_ann("category_id", 42),
            r"instances_val2017\.json: image 7 \(000000000007\.jpg\) annotation 12 .*unknown category id 42",
        ),
        (
            drop_ann_field("segmentation"),
            r"instances_val2017\.json: annotations\[0\]: missing required field 'segmentation'",
        ),
        (set_ann("image_id", 99), r"instances_val2017\.json: annotation 12 .*unknown image id 99"),
        (
            set_ann("segmentation", {"size": [H + 1, W], "counts": "abc"}),
            r"instances_val2017\.json: image 7 \(000000000007\.jpg\) annotation 12: RLE size \[11, 12\]",
        ),
        (
            set_ann("segmentation", {"size": [H, W], "counts": [3, 4]}, index=2),
            r"000000000007\.jpg\) annotation 13: uncompressed RLE runs sum to 7, expected 120",
        ),
        (set_ann("segmentation", "oops"), r"000000000007\.jpg\) annotation 12: segmentation must be"),
    ],
)
def test_coco_instances_errors_name_the_file(coco: Path, edit, message):
    edit_json(coco, edit)
    with pytest.raises(ValueError, match=message):
        list(get_format("coco-instances").clips(coco, "val", None))


def test_coco_instances_missing_or_resized_image_is_an_error_naming_it(coco: Path):
    image = coco / "val2017" / "000000000007.jpg"
    image.write_bytes(jpeg_bytes(H + 2, W, 0))
    with pytest.raises(ValueError, match=r"000000000007\.jpg is 12x12 \(HxW\) but the annotation says 10x12"):
        list(get_format("coco-instances").clips(coco, "val", None))
    image.unlink()
    with pytest.raises(ValueError, match=r"image file .*000000000007\.jpg does not exist"):
        list(get_format("coco-instances").clips(coco, "val", None))
