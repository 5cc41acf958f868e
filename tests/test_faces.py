"""dlib face backend: availability reporting, detection, and identity on real faces (fixtures)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from diffferv_cli import components
from diffferv_cli.evaluation import faces, metrics


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
