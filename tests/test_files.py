"""files.py: atomic writes, strict JSON, bounded reads of user-named files, the image pixel limit."""

from __future__ import annotations

import io
import os
import stat

import pytest

from diffferv_cli.errors import UserError
from diffferv_cli.files import (
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    open_image,
    read_small_file,
    to_json,
)


def test_atomic_write_replaces_whole_files_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_text(target, "first")
    atomic_write_json(target, {"b": [1, 2.5]})
    assert target.read_text() == '{\n  "b": [\n    1,\n    2.5\n  ]\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0o600


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary_one(tmp_path):
    target = tmp_path / "video.mp4"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as temp:
        assert temp.parent == tmp_path and temp.suffix == ".mp4" and temp.name.startswith(".video.")
        temp.write_text("half")
        raise RuntimeError("the encoder failed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["video.mp4"]


def test_two_writers_never_share_a_temporary_name(tmp_path):
    with atomic_path(tmp_path / "a.txt") as first, atomic_path(tmp_path / "a.txt") as second:
        assert first != second


def test_json_is_strict():
    for bad in (float("nan"), float("inf"), [1, float("-inf")]):
        with pytest.raises(ValueError):
            to_json(bad)


def test_read_small_file_refuses_what_is_not_a_small_regular_file(tmp_path):
    good = tmp_path / "p.toml"
    good.write_bytes(b"x" * 10)
    assert read_small_file(good, 10, "preset file") == b"x" * 10
    with pytest.raises(UserError, match="is 10 bytes; at most 9"):
        read_small_file(good, 9, "preset file")
    with pytest.raises(UserError, match="does not exist"):
        read_small_file(tmp_path / "missing", 10, "preset file")
    with pytest.raises(UserError, match="is a folder"):
        read_small_file(tmp_path, 10, "preset file")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # no writer: a plain open() would block forever
    with pytest.raises(UserError, match="not a regular file"):
        read_small_file(fifo, 10, "preset file")
    if os.path.exists("/dev/zero"):
        with pytest.raises(UserError, match="not a regular file"):
            read_small_file("/dev/zero", 10, "preset file")


def test_open_image_checks_the_pixel_count_before_decoding(monkeypatch):
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (30, 20)).save(buffer, format="PNG")
    with open_image(io.BytesIO(buffer.getvalue())) as image:
        assert image.size == (30, 20)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 599)  # one pixel fewer than the image has
    with pytest.raises(Image.DecompressionBombError, match="30x20"):
        open_image(io.BytesIO(buffer.getvalue()))
