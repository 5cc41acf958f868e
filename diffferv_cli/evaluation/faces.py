"""Face detection and identity descriptors for the evaluation (paper section 4.2: IDP, TL-ID, TG-ID).

One interface, `FaceAnalyzer`: `detect(frame) -> [Box]` and `descriptor(frame, box) -> (128,)`.
The backend is dlib (`DlibFaces`): its HOG frontal-face detector, the 68-point shape predictor and the
ResNet face-recognition model (128-D descriptor; same person < 0.6 Euclidean distance), with the model
files of the `face-recognition-models` package (`pip install dlib-bin face-recognition-models`).

Optional landmarks from `face-alignment` (`FaceAlignmentLandmarks`) only when the package is installed
AND its weights are already in the torch hub cache.

The models are loaded by `models.auxiliary.load_face_backend` / `load_landmark_backend` (never downloading);
this module holds the algorithms on them.

Frames are uint8 RGB (H, W, 3); boxes are pixel (left, top, right, bottom), right/bottom exclusive.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np


class Box(NamedTuple):
    left: int
    top: int
    right: int
    bottom: int

    @property
    def area(self) -> int:
        return max(self.right - self.left, 0) * max(self.bottom - self.top, 0)


class FaceAnalyzer(Protocol):
    name: str

    def detect(self, frame: np.ndarray) -> list[Box]: ...

    def descriptor(self, frame: np.ndarray, box: Box) -> np.ndarray: ...


def _rgb(frame: np.ndarray) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"frames must be uint8 RGB (H, W, 3), got {frame.dtype} {frame.shape}")
    return np.ascontiguousarray(frame)


class DlibFaces:
    """dlib HOG detector + 68-point landmarks + ResNet descriptor (~0.1 s per 512-pixel frame on a CPU).

    Takes the loaded dlib objects (`models.auxiliary.load_face_backend` loads them). `upsample` > 0 lets the
    HOG detector find faces smaller than ~80 px, at ~4x the cost per step."""

    name = "dlib"

    def __init__(self, detector, shape_predictor, recognition, upsample: int = 0) -> None:
        self.upsample = upsample
        self._detector = detector
        self._landmarks = shape_predictor
        self._recognition = recognition

    def detect(self, frame: np.ndarray) -> list[Box]:
        """Faces, largest first."""
        rectangles = self._detector(_rgb(frame), self.upsample)
        boxes = [Box(r.left(), r.top(), r.right() + 1, r.bottom() + 1) for r in rectangles]
        return sorted(boxes, key=lambda box: -box.area)

    def landmarks(self, frame: np.ndarray, box: Box) -> np.ndarray:
        """(68, 2) float64 (x, y) points of the iBUG 300-W layout."""
        shape = self._landmarks(_rgb(frame), self._rectangle(box))
        return np.array([(point.x, point.y) for point in shape.parts()], dtype=np.float64)

    def descriptor(self, frame: np.ndarray, box: Box) -> np.ndarray:
        """(128,) float64 dlib face descriptor of the face in `box` (aligned with the 68 landmarks)."""
        frame = _rgb(frame)
        shape = self._landmarks(frame, self._rectangle(box))
        return np.asarray(self._recognition.compute_face_descriptor(frame, shape), dtype=np.float64)

    @staticmethod
    def _rectangle(box: Box):
        import dlib

        return dlib.rectangle(int(box.left), int(box.top), int(box.right) - 1, int(box.bottom) - 1)


def largest_face_descriptor(analyzer: FaceAnalyzer, frame: np.ndarray) -> np.ndarray | None:
    """Descriptor of the largest detected face, or None when no face is found."""
    boxes = analyzer.detect(frame)
    return analyzer.descriptor(frame, boxes[0]) if boxes else None


# A quick look for faces in a clip -------------------------------------------------------------------


@dataclass(frozen=True)
class FaceCheck:
    checked: tuple[int, ...]  # positions in the clip of the frames looked at
    found_in: int | None  # the position of the first with a face, None when none had one


@functools.lru_cache(maxsize=1)
def _hog_detector():
    import dlib

    return dlib.get_frontal_face_detector()


def look_for_a_face(frames: np.ndarray, samples: int = 3, max_short_side: int = 512) -> FaceCheck | None:
    """Look for a face in `samples` evenly spaced frames of (m, H, W, 3) uint8 RGB `frames` (first and last
    included), stopping at the first found: dlib's HOG detector only (no landmark or descriptor model),
    frames shrunk to `max_short_side`, upsampled once below 400 px, so faces down to ~80 px at 512 px
    (~40 px in small frames) count. About 0.04 s per 512x912 frame on one CPU core. None when dlib is
    not installed."""
    if importlib.util.find_spec("dlib") is None:
        return None
    import cv2

    detector = _hog_detector()
    count = len(frames)
    looks = min(samples, count)
    positions = tuple(sorted({round(i * (count - 1) / max(looks - 1, 1)) for i in range(looks)}))
    for position in positions:
        frame = _rgb(frames[position])
        short = min(frame.shape[:2])
        if short > max_short_side:
            scale = max_short_side / short
            frame = cv2.resize(frame, (round(frame.shape[1] * scale), round(frame.shape[0] * scale)),
                               interpolation=cv2.INTER_AREA)
        if len(detector(frame, 1 if min(frame.shape[:2]) < 400 else 0)):
            return FaceCheck(positions, position)
    return FaceCheck(positions, None)


# Availability ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FaceBackend:
    """The analyzer, or None with the reason it cannot be built here (`models.auxiliary.load_face_backend`)."""

    analyzer: FaceAnalyzer | None
    reason: str | None = None


# Optional landmark backend ----------------------------------------------------------------------------


class FaceAlignmentLandmarks:
    """68 landmarks from face-alignment's 2D-FAN (more robust to pose than dlib's), boxes from dlib or
    any detector. Takes the loaded `face_alignment.FaceAlignment` (`models.auxiliary.load_landmark_backend`)."""

    name = "face-alignment"

    def __init__(self, model) -> None:
        self._model = model

    def landmarks(self, frame: np.ndarray, box: Box) -> np.ndarray:
        points = self._model.get_landmarks_from_image(_rgb(frame), detected_faces=[list(box)])
        if not points:
            raise ValueError("face-alignment found no landmarks in the given box")
        return np.asarray(points[0][:, :2], dtype=np.float64)
