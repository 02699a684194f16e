"""COCO and ADE20K panoptic readers on tiny fixtures written here in the real layouts, and the
format registry."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omgseg.core.structures import Category, Task
from omgseg.datasets.clip import Segment, encode_id_map_rgb
from omgseg.datasets.formats import FORMATS, get_format

H, W = 6, 8
CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person", "isthing": 1, "color": [220, 20, 60]},
    {"id": 2, "name": "sky", "supercategory": "sky", "isthing": 0, "color": [70, 130, 180]},
]
BIG = 5_000_000  # needs all three bytes of the RGB encoding


def jpeg_bytes(height: int, width: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def id_map_139() -> np.ndarray:
    ids = np.zeros((H, W), dtype=np.uint32)
    ids[:3, :4] = BIG  # 12 px person
    ids[3:, :] = 7  # 24 px sky
    ids[0, 7] = 3  # 1 px crowd person
    return ids  # 11 px void


def id_map_5() -> np.ndarray:
    ids = np.full((H, W), 9, dtype=np.uint32)
    ids[0, 0] = 0
    return ids


def write_panoptic(
    json_path: Path, png_dir: Path, image_dir: Path, image_ids: tuple[object, object], categories: list[dict]
) -> dict:
    """Two images (ids given: the first gets id_map_139, the second id_map_5), return the JSON."""
    png_dir.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)
    first, second = image_ids
    stems = {
        first: f"{first:012d}" if isinstance(first, int) else first,
        second: f"{second:012d}" if isinstance(second, int) else second,
    }
    maps = {first: id_map_139(), second: id_map_5()}
    segments = {
        first: [
            {"id": BIG, "category_id": 1, "iscrowd": 0, "area": 12, "bbox": [0, 0, 4, 3]},
            {"id": 7, "category_id": 2, "iscrowd": 0, "area": 24, "bbox": [0, 3, 8, 3]},
            {"id": 3, "category_id": 1, "iscrowd": 1, "area": 5, "bbox": [7, 0, 1, 1]},  # JSON says 5, PNG 1
        ],
        second: [{"id": 9, "category_id": 2, "iscrowd": 0, "area": 47, "bbox": [0, 0, 8, 6]}],
    }
    data = {"images": [], "annotations": [], "categories": categories}
    for seed, image_id in enumerate((first, second)):
        stem = stems[image_id]
        (image_dir / f"{stem}.jpg").write_bytes(jpeg_bytes(H, W, seed))
        Image.fromarray(encode_id_map_rgb(maps[image_id])).save(png_dir / f"{stem}.png")
        data["images"].append({"id": image_id, "file_name": f"{stem}.jpg", "height": H, "width": W})
        data["annotations"].append(
            {"image_id": image_id, "file_name": f"{stem}.png", "segments_info": segments[image_id]}
        )
    json_path.write_text(json.dumps(data))
    return data


@pytest.fixture
def coco(tmp_path: Path) -> Path:
    write_panoptic(
        tmp_path / "annotations" / "panoptic_val2017.json",
        tmp_path / "annotations" / "panoptic_val2017",
        tmp_path / "val2017",
        (139, 5),
        CATEGORIES,
    )
    return tmp_path


def test_registry_names_every_format_and_lists_them_on_a_bad_name():
    assert sorted(FORMATS) == sorted(
        ["coco-panoptic", "coco-instances", "ade-panoptic", "vipseg", "ytvis", "davis"]
    )
    for name, fmt in FORMATS.items():
        assert fmt.name == name and get_format(name) is fmt
    with pytest.raises(ValueError, match="'coco'.*ade-panoptic, coco-instances, coco-panoptic, davis"):
        get_format("coco")


def test_coco_panoptic_reads_ids_areas_crowd_and_original_bytes(coco: Path):
    fmt = get_format("coco-panoptic")
    assert fmt.dataset == "coco_panoptic"
    assert fmt.tasks == (Task.PANOPTIC, Task.INSTANCE, Task.SEMANTIC, Task.INTERACTIVE)
    assert fmt.categories(coco, "val") == [Category(1, "person", True), Category(2, "sky", False)]
    assert fmt.count(coco, "val") == 2

    clips = list(fmt.clips(coco, "val", None))
    assert [c.source_id for c in clips] == ["5", "139"]  # image-id order, not JSON order
    five, big = clips
    assert big.frame_names == ("000000000139.jpg",)
    assert big.images == [(coco / "val2017" / "000000000139.jpg").read_bytes()]
    assert big.image_ext == "jpg"
    assert big.id_maps.dtype == np.uint32 and big.id_maps.shape == (1, H, W)
    np.testing.assert_array_equal(big.id_maps[0], id_map_139())
    assert big.segments == [
        Segment(id=3, category_id=1, iscrowd=True, track_id=3, area=(1,)),
        Segment(id=7, category_id=2, iscrowd=False, track_id=7, area=(24,)),
        Segment(id=BIG, category_id=1, iscrowd=False, track_id=BIG, area=(12,)),
    ]
    assert big.extra == {"json_area": {"3": 5}}  # only the JSON area that disagrees
    assert big.tasks == fmt.tasks and big.dataset == "coco_panoptic"
    assert five.segments == [Segment(id=9, category_id=2, iscrowd=False, track_id=9, area=(47,))]
    assert five.extra == {}


def edit_json(root: Path, edit) -> None:
    path = root / "annotations" / "panoptic_val2017.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def ann_139(data: dict) -> dict:
    return next(a for a in data["annotations"] if a["image_id"] == 139)


def drop_segment(data):
    ann_139(data)["segments_info"].pop(1)


def add_segment(data):
    ann_139(data)["segments_info"].append({"id": 99, "category_id": 2, "iscrowd": 0, "area": 1})


def unknown_category(data):
    ann_139(data)["segments_info"][0]["category_id"] = 42


def wrong_height(data):
    next(i for i in data["images"] if i["id"] == 139)["height"] = H + 1


def no_file_name(data):
    del next(i for i in data["images"] if i["id"] == 139)["file_name"]


def no_category_id(data):
    del ann_139(data)["segments_info"][0]["category_id"]


def no_isthing(data):
    del data["categories"][0]["isthing"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (drop_segment, r"000000000139\.png.*ids \[7\] are in the PNG but not in segments_info"),
        (add_segment, r"000000000139\.png.*segments_info ids \[99\] do not occur in the PNG"),
        (unknown_category, r"image 139 \(000000000139\.png\).*unknown category id 42"),
        (wrong_height, r"image 139.*000000000139\.png is 6x8 .* says 7x8"),
        (no_file_name, r"panoptic_val2017\.json: images\[0\]: missing required field 'file_name'"),
        (no_category_id, r"panoptic_val2017\.json: image 139 .*missing required field 'category_id'"),
        (no_isthing, r"panoptic_val2017\.json.*'isthing'"),
    ],
)
def test_coco_panoptic_json_errors_name_the_file_and_image(coco: Path, edit, message):
    edit_json(coco, edit)
    with pytest.raises(ValueError, match=message):
        list(get_format("coco-panoptic").clips(coco, "val", None))


def test_coco_panoptic_jpeg_size_differing_from_json_is_an_error(coco: Path):
    (coco / "val2017" / "000000000139.jpg").write_bytes(jpeg_bytes(H, W + 2, 0))
    with pytest.raises(ValueError, match=r"image 139.*000000000139\.jpg is 6x10"):
        list(get_format("coco-panoptic").clips(coco, "val", None))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.unlink(), r"PNG file .*000000000139\.png does not exist"),
        (lambda p: p.write_bytes(b"not a png at all"), r"cannot read PNG .*000000000139\.png"),
        (lambda p: p.write_bytes(p.read_bytes()[:60]), r"cannot read PNG .*000000000139\.png"),
        (
            lambda p: Image.fromarray(np.zeros((H, W), np.uint8)).save(p),
            r"000000000139\.png must be an RGB id PNG, got mode 'L'",
        ),
    ],
    ids=["missing", "garbage", "truncated", "grey"],
)
def test_coco_panoptic_bad_png_is_an_error_naming_it(coco: Path, damage, message):
    damage(coco / "annotations" / "panoptic_val2017" / "000000000139.png")
    with pytest.raises(ValueError, match=message):
        list(get_format("coco-panoptic").clips(coco, "val", None))


def test_coco_panoptic_missing_image_is_an_error_naming_it(coco: Path):
    (coco / "val2017" / "000000000139.jpg").unlink()
    with pytest.raises(ValueError, match=r"image 139.*image file .*000000000139\.jpg does not exist"):
        list(get_format("coco-panoptic").clips(coco, "val", None))


def test_coco_panoptic_missing_json_names_it(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"panoptic_train2017\.json"):
        get_format("coco-panoptic").count(tmp_path, "train")


def test_ade_panoptic_uses_its_own_paths_and_string_image_ids(tmp_path: Path):
    root = tmp_path / "ADEChallengeData2016"
    ade_categories = [
        {"id": 0, "name": "wall", "isthing": 0, "color": [120, 120, 120]},
        {"id": 1, "name": "person", "isthing": 1, "color": [150, 5, 61]},
        {"id": 2, "name": "sky", "isthing": 0, "color": [6, 230, 230]},
    ]
    write_panoptic(
        root / "ade20k_panoptic_train.json",
        root / "ade20k_panoptic_train",
        root / "images" / "training",
        ("ADE_train_00000002", "ADE_train_00000001"),
        ade_categories,
    )
    fmt = get_format("ade-panoptic")
    assert fmt.dataset == "ade20k_panoptic"
    assert fmt.tasks == (Task.PANOPTIC, Task.INSTANCE, Task.SEMANTIC)
    assert [c.id for c in fmt.categories(tmp_path, "train")] == [0, 1, 2]
    clips = list(fmt.clips(tmp_path, "train", None))
    assert [c.source_id for c in clips] == ["ADE_train_00000001", "ADE_train_00000002"]
    assert clips[1].frame_names == ("ADE_train_00000002.jpg",)
    assert clips[1].images == [(root / "images" / "training" / "ADE_train_00000002.jpg").read_bytes()]
    np.testing.assert_array_equal(clips[1].id_maps[0], id_map_139())
    assert [(s.id, s.area) for s in clips[1].segments] == [(3, (1,)), (7, (24,)), (BIG, (12,))]
    with pytest.raises(FileNotFoundError, match=r"ade20k_panoptic_val\.json"):
        fmt.count(tmp_path, "val")
