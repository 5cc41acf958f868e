"""Training data (training/data.py) with exact expected values: the three layouts and their errors, the
sample plan, resize/crop and augmentation against written-out references, and the dataset's items.
No model is built here: every test runs in well under a second."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from diffferv_cli.errors import UserError
from diffferv_cli.training.data import (
    MAX_CAPTION_BYTES,
    Draw,
    ImageItem,
    SamplePlan,
    TrainSamples,
    augment_face,
    collate,
    decode_image,
    image_files,
    resize_crop,
    scan_images,
    to_tensor,
)


def _image(seed: int, height: int = 12, width: int = 10) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _png(image: np.ndarray) -> bytes:
    return cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]))[1].tobytes()


def _write_png(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png(image))
    return path


def _tar(path: Path, members: list[tuple[str, bytes | None]]) -> Path:
    """An uncompressed shard; a member whose data is None is a folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _message(error) -> str:
    return str(error.value)


# ------------------------------------------------------------------------------------------ folders


def test_image_files_are_found_recursively_by_suffix_in_any_case_and_sorted(tmp_path):
    for name in ("b.png", "a.JPG", "sub/c.webp", "sub/deeper/d.Jpeg", "e.bmp", "notes.txt", "f.gif"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "folder.png").mkdir()  # a folder with an image suffix is not an image
    found = [path.relative_to(tmp_path).as_posix() for path in image_files(tmp_path)]
    assert found == ["a.JPG", "b.png", "e.bmp", "sub/c.webp", "sub/deeper/d.Jpeg"]


def test_sidecar_captions_are_stripped_and_named_by_relative_path(tmp_path):
    _write_png(tmp_path / "sub" / "a.png", _image(0))
    (tmp_path / "sub" / "a.txt").write_text("  a photo of a man \n")
    images = scan_images(tmp_path)
    assert images.root == tmp_path and len(images) == 1
    (item,) = images.items
    assert (item.path, item.caption, item.offset, item.size, item.name, item.label) == (
        tmp_path / "sub" / "a.png", "a photo of a man", -1, 0, "sub/a.png", "sub/a.png")
    assert np.array_equal(decode_image(item.read_bytes()), _image(0))


def test_missing_and_blank_captions_are_counted_with_three_examples(tmp_path):
    for index in range(5):
        _write_png(tmp_path / f"img{index}.png", _image(index))
    (tmp_path / "img0.txt").write_text("a face")
    (tmp_path / "img1.txt").write_text("   \n")  # blank: no caption
    with pytest.raises(UserError) as error:
        scan_images(tmp_path, option="--prior-captions")
    assert _message(error) == (
        f"4 of 5 images in {tmp_path} have no caption (img1.png, img2.png, img3.png, ...); write sidecar .txt "
        f"captions (`diffferv caption {tmp_path}` does it) or pass --prior-captions FILE (JSONL or CSV with "
        "file,text).")
    (tmp_path / "img3.png").unlink()
    (tmp_path / "img4.png").unlink()
    with pytest.raises(UserError, match=r"have no caption \(img1\.png, img2\.png\); .* pass --captions FILE"):
        scan_images(tmp_path)


def test_missing_empty_and_file_roots_are_clear_errors(tmp_path):
    with pytest.raises(UserError) as error:
        scan_images(tmp_path / "nowhere")
    assert _message(error) == f"{tmp_path / 'nowhere'} does not exist."
    with pytest.raises(UserError) as error:
        scan_images(tmp_path)
    assert _message(error) == (f"No images found in {tmp_path} (looked for .jpg, .jpeg, .png, .webp, .bmp files "
                               "and .tar shards).")
    image = _write_png(tmp_path / "a.png", _image(0))
    with pytest.raises(UserError) as error:
        scan_images(image)
    assert _message(error) == f"{image} is a file; give a folder of images or .tar shards."


# ------------------------------------------------------------------------------------------ manifests


def test_manifests_take_either_key_name_and_match_relative_paths_then_file_names(tmp_path):
    root = tmp_path / "faces"
    for name in ("a.png", "sub/b.png", "sub/c.png", "d.png"):
        _write_png(root / name, _image(len(name)))
    rows = [{"image": "a.png", "caption": "first"},                    # the second key names
            {"file": "sub/b.png", "text": "second", "caption": "not this"},  # the first key wins
            {"path": "c.png", "text": "third"},                        # a bare file name matches sub/c.png
            {"file": str(root.resolve() / "d.png"), "text": "fourth"}]  # absolute, inside the root
    manifest = tmp_path / "captions.JSONL"  # the suffix in any case
    manifest.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    images = scan_images(root, manifest)
    assert [(item.name, item.caption) for item in images.items] == [
        ("a.png", "first"), ("d.png", "fourth"), ("sub/b.png", "second"), ("sub/c.png", "third")]
    outside = tmp_path / "outside.json"  # an absolute path elsewhere is matched by its file name
    outside.write_text("\n".join(json.dumps({"file": f"/elsewhere/{name}", "text": name}) for name in
                                 ("a.png", "b.png", "c.png", "d.png")))
    assert [item.caption for item in scan_images(root, outside).items] == ["a.png", "d.png", "b.png", "c.png"]


def test_csv_manifests(tmp_path):
    _write_png(tmp_path / "faces" / "a.png", _image(0))
    manifest = tmp_path / "captions.txt"  # anything not .json/.jsonl is read as CSV
    manifest.write_text('image,caption\na.png,"a man, smiling"\n')
    assert [item.caption for item in scan_images(tmp_path / "faces", manifest).items] == ["a man, smiling"]


@pytest.mark.parametrize("line, expected", [
    ('["a.png", "x"]', 'Caption manifest {m}, row 2: expected an object such as {{"file": "a.jpg", "text": '
                       '"..."}}, not a list.'),
    ('"a.png"', "Caption manifest {m}, row 2: expected an object such as {{\"file\": \"a.jpg\", \"text\": "
                "\"...\"}}, not a string."),
    ('{"file": "a.png", "text": 3}', "Caption manifest {m}, row 2: 'text' must be a string, not a number."),
    ('{"file": null, "text": "x"}', "Caption manifest {m}, row 2: 'file' must be a string, not null."),
    ('{"file": "a.png", "caption": true}', "Caption manifest {m}, row 2: 'caption' must be a string, not true/false."),
    ('{"file": "a.png", "text": {}}', "Caption manifest {m}, row 2: 'text' must be a string, not an object."),
    ('{"file": "a.png"}', "Caption manifest {m}, row 2: needs a file and a text field (one of file/image/path "
                          "and text/caption)."),
    ('{"file": " ", "text": "x"}', "Caption manifest {m}, row 2: needs a file and a text field (one of "
                                   "file/image/path and text/caption)."),
    ('{"file": "a.png", "text": "x"', "Cannot read caption manifest {m} (JSONDecodeError: Expecting ',' "
                                      "delimiter: line 1 column 30 (char 29))."),
])
def test_manifest_rows_that_are_not_captions_are_named(tmp_path, line, expected):
    _write_png(tmp_path / "faces" / "a.png", _image(0))
    manifest = tmp_path / "captions.jsonl"
    manifest.write_text('{"file": "a.png", "text": "fine"}\n' + line + "\n")
    with pytest.raises(UserError) as error:
        scan_images(tmp_path / "faces", manifest)
    assert _message(error) == expected.format(m=manifest)


def test_a_manifest_that_is_not_there_is_named(tmp_path):
    _write_png(tmp_path / "faces" / "a.png", _image(0))
    with pytest.raises(UserError, match=r"^The caption manifest .*missing\.jsonl does not exist\.$"):
        scan_images(tmp_path / "faces", tmp_path / "missing.jsonl")


# ------------------------------------------------------------------------------------------ shards


def test_shards_group_members_by_key_and_read_images_by_offset(tmp_path):
    images = [_image(seed) for seed in range(5)]
    shard = _tar(tmp_path / "shards" / "000.tar", [
        ("dir", None),                                                  # folders are skipped
        ("dir/one.png", _png(images[0])), ("dir/one.txt", b"  a caption  \n"),
        ("two.PNG", _png(images[1])), ("two.caption", b"from .caption"),
        ("three.jpg", _png(images[2])), ("three.json", json.dumps({"text": "from json"}).encode()),
        ("four.png", _png(images[3])), ("four.json", json.dumps({"text": " ", "caption": "the second key"}).encode()),
        ("five.png", _png(images[4])), ("five.txt", b"x" * (MAX_CAPTION_BYTES + 1)),  # too long: no caption
        ("notes.md", b"ignored"),
    ])
    with pytest.raises(UserError, match=r"^1 of 5 images in .*shards have no caption \(000\.tar:five\); "):
        scan_images(tmp_path / "shards")
    _tar(shard, [(name, data) for name, data in tarfile_members(shard) if not name.startswith("five")])
    found = scan_images(shard)  # one shard given as the root
    assert [(item.name, item.caption) for item in found.items] == [
        ("000.tar:dir/one.png", "a caption"), ("000.tar:two.PNG", "from .caption"),
        ("000.tar:three.jpg", "from json"), ("000.tar:four.png", "the second key")]
    for item, image in zip(found.items, images, strict=False):
        assert item.path == shard and item.offset > 0 and item.size == len(_png(image))
        assert item.label == item.name and np.array_equal(decode_image(item.read_bytes()), image)


def tarfile_members(shard: Path) -> list[tuple[str, bytes | None]]:
    with tarfile.open(shard) as tar:
        return [(member.name, tar.extractfile(member).read() if member.isfile() else None) for member in tar]


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b'{"caption": 5}', b"{}"])
def test_json_captions_that_are_not_text_count_as_missing(tmp_path, raw):
    _tar(tmp_path / "s" / "0.tar", [("a.png", _png(_image(0))), ("a.json", raw),
                                    ("b.png", _png(_image(1))), ("b.txt", b"b")])
    with pytest.raises(UserError, match=r"^1 of 2 images in .* have no caption \(0\.tar:a\); "):
        scan_images(tmp_path / "s")


def test_several_shards_are_read_in_name_order_and_a_broken_one_is_named(tmp_path):
    for name, caption in (("001.tar", b"second"), ("000.tar", b"first")):
        _tar(tmp_path / "s" / name, [("a.png", _png(_image(0))), ("a.txt", caption)])
    assert [item.caption for item in scan_images(tmp_path / "s").items] == ["first", "second"]
    broken = tmp_path / "s" / "002.tar"
    broken.write_bytes(b"\x1f\x8b" + b"\0" * 600)  # not an uncompressed tar
    with pytest.raises(UserError) as error:
        scan_images(tmp_path / "s")
    assert _message(error).startswith(f"Cannot read tar shard {broken} (")
    assert _message(error).endswith("); shards must be uncompressed .tar files.")


def test_an_item_inside_a_shard_reads_exactly_its_bytes(tmp_path):
    blob = tmp_path / "blob"
    blob.write_bytes(b"0123456789")
    assert ImageItem(blob, "c", offset=3, size=4).read_bytes() == b"3456"
    assert ImageItem(blob, "c", offset=0, size=2).read_bytes() == b"01"
    assert ImageItem(blob, "c").read_bytes() == b"0123456789"
    assert ImageItem(blob, "c").label == str(blob) and ImageItem(blob, "c", name="n").label == "n"


# ------------------------------------------------------------------------------------------ sample plan


def test_sample_plan_by_hand():
    """ratio 0.25: samples 3, 7, 11, ... are prior pairs (floor((n+1)/4) > floor(n/4)); each pool walks a
    permutation seeded by (seed, pool, epoch)."""
    plan = SamplePlan(faces=3, prior=2, prior_ratio=0.25, seed=7)
    draws = [plan(n) for n in range(12)]
    assert [draw.prior for draw in draws] == [False, False, False, True] * 3
    assert [plan.prior_before(n) for n in (0, 3, 4, 7, 8, 12)] == [0, 0, 1, 1, 2, 3]
    face_order = [*np.random.default_rng([7, 0, 0]).permutation(3), *np.random.default_rng([7, 0, 1]).permutation(3),
                  *np.random.default_rng([7, 0, 2]).permutation(3)]
    prior_order = [*np.random.default_rng([7, 1, 0]).permutation(2), *np.random.default_rng([7, 1, 1]).permutation(2)]
    assert [draw.index for draw in draws if not draw.prior] == face_order
    assert [draw.index for draw in draws if draw.prior] == prior_order[:3]
    assert draws[3] == Draw(True, int(prior_order[0]), (7, 1, 3))
    assert draws[4] == Draw(False, int(face_order[3]), (7, 0, 4))


def test_sample_plan_shares_that_are_exact_in_floating_point():
    """0.29 * 100 is 28.999999999999996 and 0.7 * 10 is 7.000000000000001: the plan counts whole shares
    whatever the rounding."""
    assert SamplePlan(10, 10, 0.29, 0).prior_before(100) == 29
    assert sum(SamplePlan(10, 10, 0.29, 0)(n).prior for n in range(100)) == 29
    assert SamplePlan(10, 10, 0.7, 0).prior_before(10) == 7


def test_a_prior_share_without_a_prior_set_draws_faces_only():
    plan = SamplePlan(faces=4, prior=0, prior_ratio=0.5, seed=1)
    assert plan.ratio == 0.0 and not any(plan(n).prior for n in range(20))
    assert SamplePlan(faces=4, prior=3, prior_ratio=0.5, seed=1).ratio == 0.5


# ------------------------------------------------------------------------------------------ pixels


def test_resize_crop_shrinks_with_area_and_crops_the_centre():
    image = _image(3, 48, 40)  # short side 40 -> 32: scale 0.8, 38x32, area filter, rows 3..35
    expected = cv2.resize(image, (32, 38), interpolation=cv2.INTER_AREA)[3:35, 0:32]
    assert np.array_equal(resize_crop(image, 32, None), expected)
    wide = _image(4, 40, 50)  # 32x40, columns 4..36
    assert np.array_equal(resize_crop(wide, 32, None), cv2.resize(wide, (40, 32), interpolation=cv2.INTER_AREA)[:, 4:36])


def test_resize_crop_enlarges_with_cubic():
    image = _image(5, 20, 30)  # short side 20 -> 32: scale 1.6, 32x48, cubic, columns 8..40
    expected = cv2.resize(image, (48, 32), interpolation=cv2.INTER_CUBIC)[:, 8:40]
    assert np.array_equal(resize_crop(image, 32, None), expected)
    square = _image(6, 32, 32)  # already the size: unchanged
    assert np.array_equal(resize_crop(square, 32, None), square)


def test_resize_crop_random_offsets_cover_every_position():
    image = _image(7, 16, 24)  # short side 16 stays: 16x24, left in 0..8
    lefts = set()
    for seed in range(200):
        crop = resize_crop(image, 16, np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        top, left = int(rng.integers(0, 1)), int(rng.integers(0, 9))
        assert top == 0 and np.array_equal(crop, image[:, left:left + 16])
        lefts.add(left)
    assert lefts == set(range(9))
    tall = _image(8, 24, 16)
    tops = {int(np.flatnonzero((tall[:, :, 0] == resize_crop(tall, 16, np.random.default_rng(s))[0, :, 0]).all(1))[0])
            for s in range(200)}
    assert tops <= set(range(9)) and {0, 8} <= tops


def _bilinear_reflect(image: np.ndarray, x: float, y: float) -> np.ndarray:
    """One bilinear sample with reflect-101 borders, written out."""
    height, width = image.shape[:2]

    def reflect(index: int, size: int) -> int:
        while not 0 <= index < size:
            index = -index if index < 0 else 2 * (size - 1) - index
        return index

    x0, y0 = math.floor(x), math.floor(y)
    fx, fy = x - x0, y - y0
    value = np.zeros(image.shape[2:], np.float64)
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            value += wy * wx * image[reflect(y0 + dy, height), reflect(x0 + dx, width)]
    return value


def test_augment_face_zooms_and_rotates_about_the_pixel_centre():
    """out(p) = in(c + R(-degrees) (p - c) / zoom) with c the centre of the pixel grid ((w-1)/2, (h-1)/2);
    cv2's positive angles turn the picture counter-clockwise on screen."""
    # smooth (gradients <= 0.15 per pixel): cv2 quantises sample positions to 1/32 pixel
    ys, xs = np.mgrid[0:6, 0:8].astype(np.float32)
    image = np.stack([0.1 * xs + 0.05 * ys, 0.15 * ys - 0.02 * xs, 0.01 * xs * ys], -1).astype(np.float32)
    for zoom, degrees in ((1.0, 0.0), (1.5, 0.0), (1.0, 30.0), (1.25, -12.0)):
        out = augment_face(image, zoom, degrees)
        assert out.shape == image.shape and out.dtype == np.float32
        centre_x, centre_y = (8 - 1) / 2, (6 - 1) / 2
        angle = math.radians(degrees)
        for y in range(6):
            for x in range(8):
                dx, dy = (x - centre_x) / zoom, (y - centre_y) / zoom
                source_x = centre_x + math.cos(angle) * dx - math.sin(angle) * dy
                source_y = centre_y + math.sin(angle) * dx + math.cos(angle) * dy
                assert out[y, x] == pytest.approx(_bilinear_reflect(image, source_x, source_y), abs=6e-3), (zoom, degrees, x, y)
    square = _image(10, 6, 6)
    assert np.array_equal(augment_face(square, 1.0, 90.0), np.rot90(square))  # a quarter turn counter-clockwise


def test_to_tensor_maps_levels_to_minus_one_one_channels_first():
    image = np.array([[[0, 51, 255], [255, 0, 102]]], np.uint8)  # (1, 2, 3)
    tensor = to_tensor(image)
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 1, 2)
    expected = torch.tensor([[[0, 255]], [[51, 0]], [[255, 102]]], dtype=torch.float32) / 127.5 - 1
    assert torch.equal(tensor, expected)


def test_decode_image_gives_rgb_and_refuses_what_is_not_an_image():
    grey = cv2.imencode(".png", np.full((2, 3), 77, np.uint8))[1].tobytes()
    assert decode_image(grey).shape == (2, 3, 3) and (decode_image(grey) == 77).all()
    with pytest.raises(OSError):
        decode_image(b"not an image")


# ------------------------------------------------------------------------------------------ the dataset


def _pools(tmp_path: Path, faces: int = 3, prior: int = 2):
    for index in range(faces):
        _write_png(tmp_path / "faces" / f"{index}.png", _image(index, 20, 24))
        (tmp_path / "faces" / f"{index}.txt").write_text(f"face {index}")
    for index in range(prior):
        _write_png(tmp_path / "prior" / f"{index}.png", _image(50 + index, 24, 20))
        (tmp_path / "prior" / f"{index}.txt").write_text(f"prior {index}")
    return scan_images(tmp_path / "faces"), scan_images(tmp_path / "prior") if prior else None


@pytest.mark.parametrize("center_crop", [True, False])
def test_items_follow_the_plan_and_its_seed(tmp_path, center_crop):
    faces, prior = _pools(tmp_path)
    dataset = TrainSamples(faces, prior, length=8, resolution=16, prior_ratio=0.25, seed=4, max_zoom=1.4,
                           max_rotation=10.0, center_crop=center_crop)
    assert len(dataset) == 8
    for n in range(8):
        draw = dataset.plan(n)
        pool = prior if draw.prior else faces
        item = pool.items[draw.index]
        rng = np.random.default_rng(list(draw.seed))
        image = resize_crop(decode_image(item.read_bytes()), 16, None if center_crop else rng)
        zoom, degrees = 1.0, 0.0
        if not draw.prior:
            zoom, degrees = float(rng.uniform(1.0, 1.4)), float(rng.uniform(-10.0, 10.0))
            image = augment_face(image, zoom, degrees)
        sample = dataset[n]
        assert sample["caption"] == item.caption and sample["prior"] == draw.prior and sample["skipped"] == []
        assert sample["augment"] == (zoom, degrees) and torch.equal(sample["pixels"], to_tensor(image))


def test_faces_without_augmentation_are_only_resized(tmp_path):
    faces, _ = _pools(tmp_path, prior=0)
    dataset = TrainSamples(faces, None, length=4, resolution=16, prior_ratio=0.0, seed=0, max_zoom=1.0,
                           max_rotation=0.0, center_crop=True)
    for n in range(4):
        item = faces.items[dataset.plan(n).index]
        sample = dataset[n]
        assert sample["augment"] == (1.0, 0.0)
        assert torch.equal(sample["pixels"], to_tensor(resize_crop(decode_image(item.read_bytes()), 16, None)))


def test_an_unreadable_image_is_replaced_by_the_next_of_its_pool(tmp_path):
    faces, _ = _pools(tmp_path, faces=3, prior=0)
    (tmp_path / "faces" / "1.png").write_bytes(b"broken")
    (tmp_path / "faces" / "2.png").write_bytes(b"broken too")
    dataset = TrainSamples(faces, None, length=6, resolution=16, prior_ratio=0.0, seed=2, max_zoom=1.0,
                           max_rotation=0.0, center_crop=True)
    for n in range(6):
        index = dataset.plan(n).index
        sample = dataset[n]
        skipped = [f"{i}.png" for i in range(index, 3)] if index else []  # 1, 2 skipped, then 0 (wrapping)
        assert sample["skipped"] == skipped and sample["caption"] == "face 0"
    (tmp_path / "faces" / "0.png").write_bytes(b"")
    with pytest.raises(UserError) as error:
        dataset[0]
    assert _message(error) == f"None of the 3 images in {tmp_path / 'faces'} can be read."


def test_collate_stacks_pixels_and_keeps_captions_prior_flags_and_skips_in_order():
    samples = [{"pixels": torch.full((3, 2, 2), float(i)), "caption": f"c{i}", "prior": i == 1,
                "skipped": [f"s{i}"] * i} for i in range(3)]
    batch = collate(samples)
    assert torch.equal(batch["pixels"], torch.stack([torch.full((3, 2, 2), float(i)) for i in range(3)]))
    assert batch["captions"] == ["c0", "c1", "c2"]
    assert batch["prior"].tolist() == [False, True, False] and batch["prior"].dtype == torch.bool
    assert batch["skipped"] == ["s1", "s2", "s2"]


# ------------------------------------------------------------------------------------------ edges


def test_exactly_three_missing_captions_are_all_named_without_an_ellipsis(tmp_path):
    for index in range(4):
        _write_png(tmp_path / f"img{index}.png", _image(index))
    (tmp_path / "img0.txt").write_text("a face")
    with pytest.raises(UserError) as error:
        scan_images(tmp_path)
    assert "3 of 4 images" in _message(error) and "(img1.png, img2.png, img3.png); " in _message(error)


def test_captions_that_are_not_utf8_are_read_with_replacement_characters(tmp_path):
    _write_png(tmp_path / "faces" / "a.png", _image(0))
    (tmp_path / "faces" / "a.txt").write_bytes(b"caf\xe9 au lait")  # Latin-1, not UTF-8
    assert scan_images(tmp_path / "faces").items[0].caption == "caf\ufffd au lait"
    manifest = tmp_path / "captions.csv"
    manifest.write_bytes(b"file,text\na.png,na\xefve\n")
    assert scan_images(tmp_path / "faces", manifest).items[0].caption == "na\ufffdve"
    _tar(tmp_path / "s" / "0.tar", [("a.png", _png(_image(0))), ("a.txt", b"\xff smiling")])
    assert scan_images(tmp_path / "s").items[0].caption == "\ufffd smiling"


def test_a_sidecar_caption_that_is_too_long_is_named(tmp_path):
    _write_png(tmp_path / "a.png", _image(0))
    (tmp_path / "a.txt").write_bytes(b"x" * (MAX_CAPTION_BYTES + 1))
    with pytest.raises(UserError) as error:
        scan_images(tmp_path)
    assert _message(error) == (f"The caption file {tmp_path / 'a.txt'} is {MAX_CAPTION_BYTES + 1} bytes; at most "
                               f"{MAX_CAPTION_BYTES} are accepted.")


def test_a_number_with_a_fraction_is_named_a_number(tmp_path):
    _write_png(tmp_path / "faces" / "a.png", _image(0))
    manifest = tmp_path / "captions.jsonl"
    manifest.write_text('{"file": "a.png", "text": 1.5}\n')
    with pytest.raises(UserError) as error:
        scan_images(tmp_path / "faces", manifest)
    assert _message(error) == f"Caption manifest {manifest}, row 1: 'text' must be a string, not a number."


def test_shard_keys_keep_their_folders_and_end_at_the_first_dot(tmp_path):
    """webdataset keys: "a/x" and "b/x" are two samples; "my.set/x" keeps its dotted folder; "x.seg.png" has
    the key "x" and the extension "seg.png", which is not an image; a caption of exactly the limit counts."""
    shard = _tar(tmp_path / "s" / "0.tar", [
        ("a/x.png", _png(_image(0))), ("a/x.txt", b"first"),
        ("b/x.png", _png(_image(1))), ("b/x.txt", b"second"),
        ("my.set/x.png", _png(_image(2))), ("my.set/x.txt", b"third"),
        ("x.png", _png(_image(3))), ("x.seg.png", _png(_image(4))), ("x.txt", b"y" * MAX_CAPTION_BYTES),
    ])
    found = scan_images(shard)
    assert [(item.name, item.caption[:6]) for item in found.items] == [
        ("0.tar:a/x.png", "first"), ("0.tar:b/x.png", "second"), ("0.tar:my.set/x.png", "third"),
        ("0.tar:x.png", "yyyyyy")]


def test_a_compressed_shard_is_refused(tmp_path):
    shard = tmp_path / "s" / "0.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w:gz") as tar:  # named .tar, but gzip inside: offsets would point into gzip data
        for name, data in (("a.png", _png(_image(0))), ("a.txt", b"a face")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(UserError, match=r"shards must be uncompressed \.tar files\.$"):
        scan_images(shard)


def test_a_prior_share_without_a_prior_set_gives_faces(tmp_path):
    faces, _ = _pools(tmp_path, prior=0)
    dataset = TrainSamples(faces, None, length=8, resolution=16, prior_ratio=0.5, seed=0, max_zoom=1.0,
                           max_rotation=0.0, center_crop=True)
    assert [dataset[n]["prior"] for n in range(8)] == [False] * 8


def test_a_zoom_without_rotation_is_still_applied(tmp_path):
    faces, _ = _pools(tmp_path, prior=0)
    dataset = TrainSamples(faces, None, length=2, resolution=16, prior_ratio=0.0, seed=0, max_zoom=1.5,
                           max_rotation=0.0, center_crop=True)
    sample = dataset[0]
    zoom, degrees = sample["augment"]
    assert zoom > 1.0 and degrees == 0.0
    image = resize_crop(decode_image(faces.items[dataset.plan(0).index].read_bytes()), 16, None)
    assert torch.equal(sample["pixels"], to_tensor(augment_face(image, zoom, 0.0)))
    assert not torch.equal(sample["pixels"], to_tensor(image))
