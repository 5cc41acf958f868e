"""editing/region.py: the clip's face box (tracking, margins, working aspect), `--region` parsing, and
`--region auto` on real faces (fixtures)."""

from __future__ import annotations

import numpy as np
import pytest
from media import decode_all, make_test_clip
from typer.testing import CliRunner

from diffferv_cli.config import ClipSpec
from diffferv_cli.editing import region as regions
from diffferv_cli.editing.region import fit_working_aspect, head_box, parse_region, track_faces
from diffferv_cli.errors import UserError
from diffferv_cli.evaluation.faces import Box
from diffferv_cli.video.geometry import working_geometry

SPEC = ClipSpec()  # short side 512, multiple 64


@pytest.mark.parametrize("text, expected", [("full", "full"), ("AUTO", "auto"), ("10,20,300,400", (10, 20, 300, 400)),
                                            (" 0,0,8,8 ", (0, 0, 8, 8))])
def test_parse_region(text, expected):
    assert parse_region(text) == expected


@pytest.mark.parametrize("text", ["face", "1,2,3", "1,2,3,4,5", "-1,0,20,20", "0,0,4,20", "a,b,c,d", ""])
def test_parse_region_rejects(text):
    with pytest.raises(UserError, match="--region must be full, auto or X,Y,W,H"):
        parse_region(text)


def test_track_follows_the_largest_face_and_ignores_far_detections():
    face = [Box(100 + 5 * i, 50, 180 + 5 * i, 130) for i in range(5)]  # moving right, 80 px
    stranger = Box(400, 300, 430, 330)  # small, far away
    detections = [[face[0]], [stranger, face[1]], [], [face[3], stranger], [stranger]]
    assert track_faces(detections) == [face[0], face[1], None, face[3], None]
    assert track_faces([[], []]) == [None, None]
    # the seed is the largest face of the clip, here in the last frame: tracked backwards from it
    big = Box(0, 0, 100, 100)
    assert track_faces([[stranger, Box(10, 5, 100, 95)], [big]]) == [Box(10, 5, 100, 95), big]


def test_head_box_adds_margins_and_stays_in_the_frame():
    faces = [Box(300, 200, 400, 320), None, Box(320, 210, 420, 330)]
    side = 120  # the largest face side
    box = head_box(faces, (1000, 800))
    left, top = 300 - 0.75 * side, 200 - 1.0 * side
    right, bottom = 420 + 0.75 * side, 330 + 0.75 * side
    assert box == (left, top, right - left, bottom - top) == (210, 80, 300, 340)
    assert head_box(faces, (450, 400)) == (210, 80, 240, 320)  # clipped to the frame
    assert head_box([None, None], (300, 300)) is None


@pytest.mark.parametrize("box, frame", [((500, 200, 400, 460), (1920, 1080)),  # tall box, room around
                                        ((100, 100, 300, 301), (1920, 1080)),
                                        ((0, 0, 700, 500), (720, 1280)),  # at the corner of a portrait frame
                                        ((10, 10, 600, 1000), (640, 1100))])  # hardly any room
def test_fit_working_aspect_grows_to_real_pixels(box, frame):
    fitted = fit_working_aspect(box, frame, SPEC)
    x, y, width, height = fitted
    assert 0 <= x and 0 <= y and x + width <= frame[0] and y + height <= frame[1]
    assert x <= box[0] and y <= box[1] and x + width >= box[0] + box[2] and y + height >= box[1] + box[3]
    before, after = working_geometry(box[2:], SPEC), working_geometry(fitted[2:], SPEC)
    assert after.working_size == before.working_size  # same work for the UNet
    room = frame[0] - box[2] if box[2] >= box[3] else frame[1] - box[3]
    pad = sum(after.working_size) - sum(after.scaled_size)
    assert pad <= 1 or (room < 64 and pad < sum(before.working_size) - sum(before.scaled_size))


class FakeFaces:
    """Detections by call order; no landmarks."""

    name = "fake"

    def __init__(self, per_frame):
        self.per_frame = list(per_frame)
        self.sizes = []

    def detect(self, frame):
        self.sizes.append(frame.shape[:2])
        return self.per_frame.pop(0)


def test_find_face_region_maps_detections_back_to_source_pixels(tmp_path, monkeypatch):
    path = make_test_clip(tmp_path / "clip.mp4", width=192, height=128, frames=5)
    monkeypatch.setattr(regions, "DETECT_SHORT_SIDE", 64)  # search at half size
    fake = FakeFaces([[Box(40, 20, 60, 44)], [], [Box(42, 20, 62, 44)]])
    found = regions.find_face_region(path, ClipSpec(stride=2, short_side=64, multiple=16), analyzer=fake,
                                     landmarks=None)
    assert fake.sizes == [(64, 96)] * 3  # frames 0, 2, 4 at half size
    assert (found.frames_with_face, found.frames) == (2, 3)
    faces = [Box(80, 40, 120, 88), None, Box(84, 40, 124, 88)]  # doubled
    expected = fit_working_aspect(head_box(faces, (192, 128)), (192, 128), ClipSpec(short_side=64, multiple=16))
    assert found.box == expected
    assert "2 of 3 frames" in found.message


def test_no_face_means_the_whole_frame_with_a_message(tmp_path):
    path = make_test_clip(tmp_path / "clip.mp4", width=96, height=64, frames=2)
    found = regions.find_face_region(path, ClipSpec(), analyzer=FakeFaces([[], []]), landmarks=None)
    assert found.box is None
    assert found.message.startswith("No face found in the 2 selected frames") and "full frame" in found.message
    assert "\n" not in found.message


def test_cli_region_auto_without_a_face_edits_the_full_frame(tmp_path):
    from diffferv_cli.cli import app
    from diffferv_cli.models.auxiliary import load_face_backend

    if load_face_backend().analyzer is None:
        pytest.skip(load_face_backend().reason)
    path = make_test_clip(tmp_path / "clip.mp4", width=96, height=64, frames=2)
    result = CliRunner().invoke(app, ["invert", str(path), "--region", "auto", "--model", "tiny-random", "--size", "32",
                                      "--steps", "1", "--flow-preset", "ultrafast", "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert "No face found in the 2 selected frames" in result.output
    import json

    (manifest,) = (tmp_path / "c").glob("*/manifest.json")
    assert "region" not in json.loads(manifest.read_text())["request"]


# Real faces -----------------------------------------------------------------------------------------------

@pytest.mark.fixtures
def test_region_auto_holds_every_frames_face(fixtures_dir):
    from diffferv_cli.models.auxiliary import load_face_backend

    analyzer = load_face_backend().analyzer
    if analyzer is None:
        pytest.skip(load_face_backend().reason)
    path = fixtures_dir / "single_face.mp4"
    spec = ClipSpec(stride=6)
    found = regions.find_face_region(path, spec)
    assert found.frames == 12 and found.frames_with_face == 12, found.message
    x, y, width, height = found.box
    frames = decode_all(path)[::6]
    for frame in frames:
        (face,) = analyzer.detect(frame)[:1]
        landmarks = analyzer.landmarks(frame, face)
        assert x <= face.left and y <= face.top and face.right <= x + width and face.bottom <= y + height
        assert x <= landmarks[:, 0].min() and landmarks[:, 0].max() <= x + width
        assert y <= landmarks[:, 1].min() and landmarks[:, 1].max() <= y + height
        # generous: at least half a face side of room on every side the frame allows
        side = max(face.right - face.left, face.bottom - face.top)
        assert face.left - x >= min(face.left, side / 2) and (x + width) - face.right >= min(640 - face.right, side / 2)
    assert width * height < 0.95 * 640 * 360  # smaller than the frame: the rest is the source's own


@pytest.mark.fixtures
def test_cli_edit_region_auto_keeps_the_source_outside_the_box(fixtures_dir, tmp_path):
    from diffferv_cli.cli import app

    path = fixtures_dir / "single_face.mp4"
    out = tmp_path / "edit.mp4"
    result = CliRunner().invoke(app, ["edit", str(path), "--preset", "age", "--region", "auto", "--lossless",
                                      "--model", "tiny-random", "--size", "64", "--steps", "2", "--frames", "3",
                                      "--flow-preset", "ultrafast", "--cache-dir", str(tmp_path / "c"), "-o", str(out)],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("Face region"))
    x, y, width, height = (int(value) for value in line.split()[2].split(","))
    source, written = decode_all(path)[:3], decode_all(out)
    outside = np.ones(source.shape[1:3], bool)
    outside[y:y + height, x:x + width] = False
    assert outside.any()
    assert np.array_equal(written[:, outside], source[:, outside])
    assert not np.array_equal(written[:, ~outside], source[:, ~outside])
