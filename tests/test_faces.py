"""dlib face backend: availability reporting, detection, and identity on real faces (fixtures)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from diffferv_cli.evaluation import faces, metrics
from diffferv_cli.models import auxiliary as components


@pytest.fixture(scope="session")
def analyzer():
    backend = components.load_face_backend()
    if backend.analyzer is None:
        pytest.skip(f"face analyzer unavailable: {backend.reason}")
    return backend.analyzer


def _image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _video_frames(path: Path, indices: list[int]) -> list[np.ndarray]:
    import cv2

    capture = cv2.VideoCapture(str(path))
    frames, index = {}, 0
    while len(frames) < len(indices):
        ok, frame = capture.read()
        if not ok:
            break
        if index in indices:
            frames[index] = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        index += 1
    capture.release()
    assert len(frames) == len(indices), f"could not read frames {indices} of {path}"
    return [frames[i] for i in indices]


def test_missing_dlib_is_reported_not_raised(monkeypatch):
    real_find_spec = components.importlib.util.find_spec
    monkeypatch.setattr(components.importlib.util, "find_spec",
                        lambda name, *a: None if name == "dlib" else real_find_spec(name, *a))
    backend = components.load_face_backend.__wrapped__()
    assert backend.analyzer is None
    assert "dlib is not installed" in backend.reason and "pip install" in backend.reason


def test_landmark_backend_never_downloads(monkeypatch, tmp_path):
    import torch

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty hub cache
    backend, reason = components.load_landmark_backend()
    assert backend is None and reason


def test_no_face_in_a_flat_or_noisy_frame(analyzer):
    rng = np.random.default_rng(0)
    assert analyzer.detect(np.full((128, 160, 3), 127, np.uint8)) == []
    assert faces.largest_face_descriptor(analyzer, rng.integers(0, 256, (128, 160, 3), dtype=np.uint8)) is None


def test_rejects_non_rgb_frames(analyzer):
    with pytest.raises(ValueError, match="uint8 RGB"):
        analyzer.detect(np.zeros((32, 32), np.float32))


@pytest.mark.fixtures
def test_same_person_is_more_similar_than_different_people(analyzer, fixtures_dir):
    first, later = _video_frames(fixtures_dir / "single_face.mp4", [0, 40])
    boxes = analyzer.detect(first)
    assert boxes and boxes[0].area > 0
    same = metrics.similarity(faces.largest_face_descriptor(analyzer, first),
                              faces.largest_face_descriptor(analyzer, later))
    people = [faces.largest_face_descriptor(analyzer, _image(fixtures_dir / name))
              for name in ("0-f1-su-ph.jpg", "45-m7-di-ph.jpg", "15-f13-anc-ph.jpg")]
    assert all(descriptor is not None and descriptor.shape == (128,) for descriptor in people)
    different = [metrics.similarity(people[i], people[j]) for i, j in ((0, 1), (0, 2), (1, 2))]
    assert same > 0.4  # dlib's rule: the same person is less than 0.6 apart
    assert same > max(different) + 0.1


@pytest.mark.fixtures
def test_landmarks_lie_inside_the_face_box(analyzer, fixtures_dir):
    frame = _image(fixtures_dir / "single_face.jpg")
    box = analyzer.detect(frame)[0]
    points = analyzer.landmarks(frame, box)
    assert points.shape == (68, 2)
    center = points.mean(axis=0)
    assert box.left <= center[0] <= box.right and box.top <= center[1] <= box.bottom


# The quick look for a face before editing -------------------------------------------------------------


def _astronaut(side: int) -> np.ndarray:
    """scikit-image's bundled portrait (512x512, public domain), resized: its face is ~87 px at 512."""
    import cv2
    from skimage.data import astronaut

    image = astronaut()
    return image if side == 512 else cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA)


def test_look_for_a_face_samples_first_middle_last_and_stops_at_one():
    pytest.importorskip("dlib")
    flat = np.full((512, 512, 3), 127, np.uint8)
    assert faces.look_for_a_face(np.stack([flat, flat, _astronaut(512), flat, flat])) == faces.FaceCheck((0, 2, 4), 2)
    assert faces.look_for_a_face(np.stack([_astronaut(512), flat, flat])) == faces.FaceCheck((0, 1, 2), 0)
    assert faces.look_for_a_face(np.stack([flat] * 8)) == faces.FaceCheck((0, 4, 7), None)
    assert faces.look_for_a_face(flat[None]) == faces.FaceCheck((0,), None)
    assert faces.look_for_a_face(np.stack([flat, _astronaut(512)])) == faces.FaceCheck((0, 1), 1)


@pytest.mark.parametrize("side", [192, 1024])  # small frames are upsampled once, large ones shrunk to 512
def test_look_for_a_face_at_small_and_large_sizes(side):
    pytest.importorskip("dlib")
    assert faces.look_for_a_face(_astronaut(side)[None]).found_in == 0


def test_look_for_a_face_without_dlib_says_nothing(monkeypatch):
    real_find_spec = faces.importlib.util.find_spec
    monkeypatch.setattr(faces.importlib.util, "find_spec",
                        lambda name, *a: None if name == "dlib" else real_find_spec(name, *a))
    assert faces.look_for_a_face(_astronaut(192)[None]) is None


def _invert(clip: Path, tmp_path: Path, size: str):
    from typer.testing import CliRunner

    from diffferv_cli.cli import app

    return CliRunner().invoke(app, ["invert", str(clip), "--model", "tiny-random", "--size", size, "--steps", "1",
                                    "--flow-preset", "ultrafast", "--cache-dir", str(tmp_path / "cache"),
                                    "--device", "cpu"])


def test_cli_warns_once_when_the_clip_has_no_face(tmp_path, monkeypatch):
    pytest.importorskip("dlib")
    from media import make_test_clip

    monkeypatch.delenv("DIFFFERV_NO_FACE_CHECK")
    clip = make_test_clip(tmp_path / "pattern.mp4", frames=4)
    result = _invert(clip, tmp_path, "64")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "face" in line]
    assert warnings == ["Warning: no face found in frames 0, 2, 3 of pattern.mp4; diffferv edits faces, so expect "
                        "little change."]
    monkeypatch.setenv("DIFFFERV_NO_FACE_CHECK", "1")
    assert "no face" not in _invert(clip, tmp_path, "64").stderr


def test_cli_says_nothing_when_the_clip_has_a_face(tmp_path, monkeypatch):
    pytest.importorskip("dlib")
    from diffferv_cli.video.io import write_video

    monkeypatch.delenv("DIFFFERV_NO_FACE_CHECK")
    flat = np.full((512, 512, 3), 127, np.uint8)
    clip = write_video(np.stack([flat, _astronaut(512)]), tmp_path / "portrait.mp4", 24)
    result = _invert(clip, tmp_path, "256")
    assert result.exit_code == 0, result.output
    assert "face" not in result.stderr
