"""VIPSeg, YouTube-VIS and DAVIS readers on tiny fixtures written here in the real layouts:
clip cutting, absent frames, void values, overlaps and every error path."""

import io
import json
import warnings
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

from omgseg.core.structures import Category, Task
from omgseg.datasets.formats import get_format


def jpeg_bytes(height: int, width: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def summary(clip) -> list[tuple[int, int, bool, int, tuple[int, ...]]]:
    return [(s.id, s.category_id, s.iscrowd, s.track_id, s.area) for s in clip.segments]


# ---------------------------------------------------------------------------------- VIPSeg

VH, VW = 4, 5
VIPSEG_CATEGORIES = [
    {"id": 0, "name": "wall", "isthing": 0, "color": [120, 120, 120]},
    {"id": 1, "name": "ceiling", "isthing": 0, "color": [180, 120, 120]},
    {"id": 2, "name": "door", "isthing": 1, "color": [6, 230, 230]},
    {"id": 3, "name": "person", "isthing": 1, "color": [80, 50, 50]},
]


def vipseg_rows(*values: int) -> np.ndarray:
    return np.repeat(np.array(values, dtype=np.uint16)[:, None], VW, axis=1)


# wall = 1, ceiling = 2, door instances 300 and 301, a door region without instance = 3,
# person = 400, 200 = the release's stray value (void).
VIPSEG_B = [vipseg_rows(1, 300, 200, 400), vipseg_rows(1, 300, 0, 3), vipseg_rows(2, 301, 0, 0)]


def write_vipseg(root: Path) -> None:
    base = root / "VIPSeg_720P"
    base.mkdir(parents=True)
    (base / "panoVIPSeg_categories.json").write_text(json.dumps(VIPSEG_CATEGORIES))
    (root / "train.txt").write_text("vid_b\nvid_a\n")
    videos = {"vid_b": VIPSEG_B, "vid_a": [vipseg_rows(1, 1, 1, 1)]}
    for seed, (video, masks) in enumerate(videos.items()):
        (base / "images" / video).mkdir(parents=True)
        (base / "panomasks" / video).mkdir(parents=True)
        for t, mask in enumerate(masks):
            stem = f"{t * 5:05d}"
            (base / "images" / video / f"{stem}.jpg").write_bytes(jpeg_bytes(VH, VW, 10 * seed + t))
            Image.fromarray(mask).save(base / "panomasks" / video / f"{stem}.png")


@pytest.fixture
def vipseg(tmp_path: Path) -> Path:
    write_vipseg(tmp_path)
    return tmp_path


def test_vipseg_reads_raw_values_as_ids_with_200_as_void(vipseg: Path):
    fmt = get_format("vipseg")
    assert fmt.dataset == "vipseg" and fmt.tasks == (Task.VIDEO_PANOPTIC, Task.VIDEO_INSTANCE)
    assert fmt.categories(vipseg, "train")[2] == Category(2, "door", True)
    assert fmt.count(vipseg, "train") == 2

    vid_a, vid_b = list(fmt.clips(vipseg, "train", None))
    assert vid_a.source_id == "vid_a" and summary(vid_a) == [(1, 0, False, 1, (20,))]
    assert vid_b.source_id == "vid_b"
    assert vid_b.frame_names == ("vid_b/00000.jpg", "vid_b/00005.jpg", "vid_b/00010.jpg")
    assert vid_b.images[1] == (vipseg / "VIPSeg_720P" / "images" / "vid_b" / "00005.jpg").read_bytes()
    want = np.stack(VIPSEG_B).astype(np.uint32)
    want[want == 200] = 0
    np.testing.assert_array_equal(vid_b.id_maps, want)
    assert summary(vid_b) == [
        (1, 0, False, 1, (5, 5, 0)),
        (2, 1, False, 2, (0, 0, 5)),
        (3, 2, False, 3, (0, 5, 0)),
        (300, 2, False, 300, (5, 5, 0)),
        (301, 2, False, 301, (0, 0, 5)),
        (400, 3, False, 400, (5, 0, 0)),
    ]


def test_vipseg_cuts_clips_and_lists_only_segments_present_in_them(vipseg: Path):
    clips = list(get_format("vipseg").clips(vipseg, "train", 2))
    assert [c.source_id for c in clips] == ["vid_a@0", "vid_b@0", "vid_b@2"]
    assert [c.num_frames for c in clips] == [1, 2, 1]
    assert [s.id for s in clips[1].segments] == [1, 3, 300, 400]
    assert summary(clips[2]) == [(2, 1, False, 2, (5,)), (301, 2, False, 301, (5,))]
    assert clips[2].frame_names == ("vid_b/00010.jpg",)


def write_mask(root: Path, values: np.ndarray) -> None:
    Image.fromarray(values).save(root / "VIPSeg_720P" / "panomasks" / "vid_b" / "00005.png")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (vipseg_rows(1, 1, 1, 9900), r"vid_b/00005\.png has value 9900 of unknown category 98"),
        (vipseg_rows(1, 1, 1, 77), r"vid_b/00005\.png has value 77 of unknown category 76"),
        (vipseg_rows(1, 1, 1, 150), r"vid_b/00005\.png has thing value 150 for stuff category 0 \(wall\)"),
        (
            np.zeros((VH + 1, VW), np.uint16),
            r"vid_b/00005\.png is 5x5 \(HxW\) but its frame 00005\.jpg is 4x5",
        ),
        (np.zeros((VH, VW, 3), np.uint8), r"vid_b/00005\.png must be a single-channel integer PNG"),
    ],
    ids=["unknown-thing", "unknown-stuff", "thing-of-stuff", "size", "rgb"],
)
def test_vipseg_bad_mask_values_are_errors_naming_file_and_value(vipseg: Path, values, message):
    write_mask(vipseg, values)
    with pytest.raises(ValueError, match=message):
        list(get_format("vipseg").clips(vipseg, "train", None))


def test_vipseg_missing_files_are_errors_naming_them(vipseg: Path):
    (vipseg / "VIPSeg_720P" / "panomasks" / "vid_b" / "00010.png").unlink()
    with pytest.raises(
        ValueError, match=r"video vid_b frame 00010\.jpg: PNG file .*vid_b/00010\.png does not exist"
    ):
        list(get_format("vipseg").clips(vipseg, "train", None))
    with pytest.raises(FileNotFoundError, match=r"val\.txt"):
        get_format("vipseg").count(vipseg, "val")
    (vipseg / "VIPSeg_720P" / "panoVIPSeg_categories.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"panoVIPSeg_categories\.json"):
        get_format("vipseg").categories(vipseg, "train")


# ------------------------------------------------------------------------------ YouTube-VIS

YH, YW = 4, 6
FULL_POLYGON = [[0.0, 0.0, 6.0, 0.0, 6.0, 4.0, 0.0, 4.0]]


def ybox(rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((YH, YW), dtype=bool)
    mask[rows, cols] = True
    return mask


def compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(mask.shape), "counts": rle["counts"].decode("ascii")}


def uncompressed_rle(mask: np.ndarray) -> dict:
    """Column-major run lengths starting with a background run (YouTube-VIS 2019 style)."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


with warnings.catch_warnings():  # pycocotools' numpy-2 deprecation noise
    warnings.simplefilter("ignore", DeprecationWarning)
    # What pycocotools rasterises the polygon to: the fixture's ground truth.
    FULL_MASK = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(FULL_POLYGON, YH, YW))).astype(bool)

A5 = [ybox(slice(0, 2), slice(0, 4)), ybox(slice(0, 2), slice(1, 5)), None]  # 8 px, 8 px, absent
A6 = [None, ybox(slice(1, 3), slice(2, 4)), FULL_MASK]  # 4 px overlapping A5 by 2, then a polygon
A7 = [None, None, ybox(slice(3, 4), slice(0, 6))]  # 6 px inside the polygon
A8 = [ybox(slice(2, 4), slice(0, 6))] * 2  # crowd, 12 px


def write_ytvis(root: Path) -> dict:
    names = {
        2: ["vid_b/00000.jpg", "vid_b/00005.jpg", "vid_b/00010.jpg"],
        1: ["vid_a/00000.jpg", "vid_a/00005.jpg"],
    }
    for vid, files in names.items():
        for t, name in enumerate(files):
            path = root / "train" / "JPEGImages" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(jpeg_bytes(YH, YW, 10 * vid + t))
    data = {
        "info": {"description": "fixture"},
        "videos": [
            {"id": vid, "width": YW, "height": YH, "length": len(files), "file_names": files}
            for vid, files in names.items()
        ],
        "annotations": [
            {
                "id": 5,
                "video_id": 2,
                "category_id": 1,
                "iscrowd": 0,
                "segmentations": [compressed_rle(A5[0]), compressed_rle(A5[1]), None],
                "areas": [8, 8, None],
                "bboxes": [[0, 0, 4, 2], [1, 0, 4, 2], None],
            },
            {
                "id": 6,
                "video_id": 2,
                "category_id": 2,
                "iscrowd": 0,
                "segmentations": [None, uncompressed_rle(A6[1]), FULL_POLYGON],
                "areas": [None, 4, 24],
                "bboxes": [None, [2, 1, 2, 2], [0, 0, 6, 4]],
            },
            {
                "id": 7,
                "video_id": 2,
                "category_id": 1,
                "iscrowd": 0,
                "segmentations": [None, None, compressed_rle(A7[2])],
                "areas": [None, None, 6],
                "bboxes": [None, None, [0, 3, 6, 1]],
            },
            {
                "id": 8,
                "video_id": 1,
                "category_id": 2,
                "iscrowd": 1,
                "segmentations": [uncompressed_rle(A8[0]), compressed_rle(A8[1])],
                "areas": [12, 12],
                "bboxes": [[0, 2, 6, 2], [0, 2, 6, 2]],
            },
        ],
        "categories": [
            {"id": 1, "name": "person", "supercategory": "object"},
            {"id": 2, "name": "giraffe", "supercategory": "object"},
        ],
    }
    (root / "train.json").write_text(json.dumps(data))
    return data


def expected_ytvis_b() -> np.ndarray:
    """Video 2 by hand, each frame painted larger mask first so the smaller one stays on top."""
    maps = np.zeros((3, YH, YW), dtype=np.uint32)
    maps[0][A5[0]] = 5
    maps[1][A5[1]] = 5
    maps[1][A6[1]] = 6
    maps[2][A6[2]] = 6
    maps[2][A7[2]] = 7
    return maps


@pytest.fixture
def ytvis(tmp_path: Path) -> Path:
    write_ytvis(tmp_path)
    return tmp_path


def test_ytvis_decodes_rle_and_polygons_with_null_frames_and_overlaps(ytvis: Path):
    fmt = get_format("ytvis")
    assert fmt.dataset == "ytvis" and fmt.tasks == (Task.VIDEO_INSTANCE,)
    assert fmt.categories(ytvis, "train") == [Category(1, "person", True), Category(2, "giraffe", True)]
    assert fmt.count(ytvis, "train") == 2

    vid_1, vid_2 = list(fmt.clips(ytvis, "train", None))
    assert vid_1.source_id == "1" and summary(vid_1) == [(8, 2, True, 8, (12, 12))]
    assert vid_1.extra == {"overlap_pixels": 0}
    assert vid_2.source_id == "2"
    assert vid_2.frame_names == ("vid_b/00000.jpg", "vid_b/00005.jpg", "vid_b/00010.jpg")
    assert vid_2.images == [(ytvis / "train" / "JPEGImages" / n).read_bytes() for n in vid_2.frame_names]
    np.testing.assert_array_equal(vid_2.id_maps, expected_ytvis_b())
    full = int(FULL_MASK.sum())
    assert summary(vid_2) == [
        (5, 1, False, 5, (8, 6, 0)),  # loses 2 px to the smaller annotation 6 in frame 1
        (6, 2, False, 6, (0, 4, full - 6)),  # loses 6 px to annotation 7 in frame 2
        (7, 1, False, 7, (0, 0, 6)),
    ]
    assert vid_2.extra == {"overlap_pixels": 2 + 6}


def test_ytvis_cuts_clips_keeping_video_track_ids(ytvis: Path):
    clips = list(get_format("ytvis").clips(ytvis, "train", 2))
    assert [c.source_id for c in clips] == ["1@0", "2@0", "2@2"]
    first, last = clips[1], clips[2]
    assert [(s.id, s.area) for s in first.segments] == [(5, (8, 6)), (6, (0, 4))]
    assert first.extra == {"overlap_pixels": 2}
    assert [(s.id, s.track_id, s.area) for s in last.segments] == [
        (6, 6, (int(FULL_MASK.sum()) - 6,)),
        (7, 7, (6,)),
    ]
    assert last.frame_names == ("vid_b/00010.jpg",)


def test_ytvis_valid_split_without_annotations_gives_unlabelled_videos(tmp_path: Path):
    data = write_ytvis(tmp_path)
    del data["annotations"]
    (tmp_path / "valid.json").write_text(json.dumps(data))
    (tmp_path / "train").rename(tmp_path / "valid")
    clips = list(get_format("ytvis").clips(tmp_path, "val", None))
    assert [c.source_id for c in clips] == ["1", "2"] and all(c.segments == [] for c in clips)


def edit_ytvis(root: Path, edit) -> None:
    path = root / "train.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def short_segmentations(data):
    data["annotations"][1]["segmentations"].pop()


def wrong_rle_size(data):
    data["annotations"][0]["segmentations"][1]["size"] = [YH, YW + 1]


def unknown_category(data):
    data["annotations"][2]["category_id"] = 42


def no_segmentations(data):
    del data["annotations"][3]["segmentations"]


def wrong_length(data):
    data["videos"][0]["length"] = 5


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (short_segmentations, r"train\.json: video 2 annotation 6 has 2 segmentations for 3 frames"),
        (
            wrong_rle_size,
            r"train\.json: video 2 annotation 5 frame 1 \(vid_b/00005\.jpg\): RLE size \[4, 7\]",
        ),
        (unknown_category, r"train\.json: video 2 annotation 7 has unknown category id 42"),
        (no_segmentations, r"train\.json: annotations\[3\]: missing required field 'segmentations'"),
        (wrong_length, r"train\.json: video 2 has length 5 but 3 file_names"),
    ],
)
def test_ytvis_json_errors_name_file_video_and_annotation(ytvis: Path, edit, message):
    edit_ytvis(ytvis, edit)
    with pytest.raises(ValueError, match=message):
        list(get_format("ytvis").clips(ytvis, "train", None))


def test_ytvis_missing_or_resized_frame_is_an_error_naming_it(ytvis: Path):
    frame = ytvis / "train" / "JPEGImages" / "vid_b" / "00005.jpg"
    frame.write_bytes(jpeg_bytes(YH, YW + 1, 0))
    with pytest.raises(ValueError, match=r"vid_b/00005\.jpg is 4x7 \(HxW\) but the annotation says 4x6"):
        list(get_format("ytvis").clips(ytvis, "train", None))
    frame.unlink()
    with pytest.raises(
        ValueError, match=r"train\.json: video 2 .*image file .*vid_b/00005\.jpg does not exist"
    ):
        list(get_format("ytvis").clips(ytvis, "train", None))


# ------------------------------------------------------------------------------------ DAVIS

DH, DW = 3, 4
DOG = [
    np.array([[0, 1, 1, 0], [0, 2, 2, 0], [255, 255, 0, 0]], dtype=np.uint8),
    np.array([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 255]], dtype=np.uint8),
    np.array([[0, 0, 0, 0], [2, 2, 2, 0], [0, 0, 0, 0]], dtype=np.uint8),
]
PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0, 0, 0] * 252 + [224, 224, 192]


def palette_png(path: Path, indices: np.ndarray) -> None:
    image = Image.fromarray(indices, mode="P")
    image.putpalette(PALETTE)
    image.save(path)


def write_davis(root: Path) -> None:
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("dog\nbear\n")
    videos = {"dog": DOG, "bear": [np.ones((DH, DW), dtype=np.uint8)]}
    for seed, (name, masks) in enumerate(videos.items()):
        (root / "JPEGImages" / "480p" / name).mkdir(parents=True)
        (root / "Annotations" / "480p" / name).mkdir(parents=True)
        for t, mask in enumerate(masks):
            (root / "JPEGImages" / "480p" / name / f"{t:05d}.jpg").write_bytes(
                jpeg_bytes(DH, DW, 10 * seed + t)
            )
            palette_png(root / "Annotations" / "480p" / name / f"{t:05d}.png", mask)


@pytest.fixture
def davis(tmp_path: Path) -> Path:
    write_davis(tmp_path)
    return tmp_path


def test_davis_reads_palette_indices_with_255_as_void(davis: Path):
    fmt = get_format("davis")
    assert fmt.dataset == "davis" and fmt.tasks == (Task.VOS,)
    assert fmt.categories(davis, "val") == [Category(1, "object", True)]
    assert fmt.count(davis, "val") == 2
    bear, dog = list(fmt.clips(davis, "val", None))
    assert bear.source_id == "bear" and summary(bear) == [(1, 1, False, 1, (12,))]
    assert dog.frame_names == ("dog/00000.jpg", "dog/00001.jpg", "dog/00002.jpg")
    assert dog.images[2] == (davis / "JPEGImages" / "480p" / "dog" / "00002.jpg").read_bytes()
    want = np.stack(DOG).astype(np.uint32)
    want[want == 255] = 0
    np.testing.assert_array_equal(dog.id_maps, want)
    assert summary(dog) == [(1, 1, False, 1, (2, 2, 0)), (2, 1, False, 2, (2, 0, 3))]


def test_davis_cuts_clips(davis: Path):
    clips = list(get_format("davis").clips(davis, "val", 2))
    assert [c.source_id for c in clips] == ["bear@0", "dog@0", "dog@2"]
    assert summary(clips[2]) == [(2, 1, False, 2, (3,))]
    with pytest.raises(ValueError, match="clip_length must be at least 1, got 0"):
        list(get_format("davis").clips(davis, "val", 0))


def test_davis_bad_annotations_are_errors_naming_the_file(davis: Path):
    png = davis / "Annotations" / "480p" / "dog" / "00001.png"
    Image.fromarray(np.zeros((DH, DW, 3), dtype=np.uint8)).save(png)
    with pytest.raises(
        ValueError, match=r"dog/00001\.png must be a palette PNG of object indices, got mode 'RGB'"
    ):
        list(get_format("davis").clips(davis, "val", None))
    palette_png(png, np.zeros((DH + 1, DW), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"dog/00001\.png is 4x4 \(HxW\) but its frame 00001\.jpg is 3x4"):
        list(get_format("davis").clips(davis, "val", None))
    png.unlink()
    with pytest.raises(
        ValueError, match=r"video dog frame 00001\.jpg: PNG file .*dog/00001\.png does not exist"
    ):
        list(get_format("davis").clips(davis, "val", None))
    with pytest.raises(FileNotFoundError, match=r"ImageSets/2017/train\.txt"):
        get_format("davis").count(davis, "train")


def test_davis_frames_of_one_clip_must_share_a_size(davis: Path):
    (davis / "JPEGImages" / "480p" / "dog" / "00002.jpg").write_bytes(jpeg_bytes(DH, DW + 1, 0))
    palette_png(davis / "Annotations" / "480p" / "dog" / "00002.png", np.ones((DH, DW + 1), dtype=np.uint8))
    with pytest.raises(
        ValueError, match=r"dog/00002\.jpg is 3x5 \(HxW\) but the clip's first frame 00000\.jpg is 3x4"
    ):
        list(get_format("davis").clips(davis, "val", None))
    assert len(list(get_format("davis").clips(davis, "val", 2))) == 3  # its own clip is fine


def test_ytvis_ids_beyond_24_bits_are_renumbered_but_track_ids_stay(ytvis: Path):
    big = 1 << 24
    edit_ytvis(ytvis, lambda data: data["annotations"][2].update(id=big))  # was 7
    clip = list(get_format("ytvis").clips(ytvis, "train", None))[1]
    # Video 2's annotations 5, 6, big -> 1, 2, 3; the map uses the new ids.
    assert [(s.id, s.track_id) for s in clip.segments] == [(1, 5), (2, 6), (3, big)]
    assert set(np.unique(clip.id_maps).tolist()) == {0, 1, 2, 3}
    assert clip.extra["annotation_ids"] == {"1": 5, "2": 6, "3": big}
