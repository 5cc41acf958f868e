"""Face detection and identity descriptors for the evaluation (paper section 4.2: IDP, TL-ID, TG-ID).

One interface, `FaceAnalyzer`: `detect(frame) -> [Box]` and `descriptor(frame, box) -> (128,)`.
The backend is dlib (`DlibFaces`): its HOG frontal-face detector, the 68-point shape predictor and the
ResNet face-recognition model (128-D descriptor; same person < 0.6 Euclidean distance), with the model
files of the `face-recognition-models` package (`pip install dlib-bin face-recognition-models`). Those
files are read from the package folder directly: its `__init__` needs `pkg_resources`, which recent
setuptools no longer ships.

Optional landmarks from `face-alignment` (`FaceAlignmentLandmarks`) only when the package is installed
AND its weights are already in the torch hub cache: it downloads them at run time otherwise, and this
module never triggers a download.

Frames are uint8 RGB (H, W, 3); boxes are pixel (left, top, right, bottom), right/bottom exclusive.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np

DLIB_MODEL_FILES = {
    "landmarks": "shape_predictor_68_face_landmarks.dat",
    "recognition": "dlib_face_recognition_resnet_model_v1.dat",
}
INSTALL_HINT = "pip install dlib-bin face-recognition-models"


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

    `upsample` > 0 lets the HOG detector find faces smaller than ~80 px, at ~4x the cost per step."""

    name = "dlib"

    def __init__(self, model_dir: Path, upsample: int = 0) -> None:
        import dlib

        self.upsample = upsample
        self._detector = dlib.get_frontal_face_detector()
        self._landmarks = dlib.shape_predictor(str(model_dir / DLIB_MODEL_FILES["landmarks"]))
        self._recognition = dlib.face_recognition_model_v1(str(model_dir / DLIB_MODEL_FILES["recognition"]))

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
    """The analyzer, or None with the reason it cannot be built here."""

    analyzer: FaceAnalyzer | None
    reason: str | None = None


def dlib_model_dir() -> Path | None:
    """The models/ folder of the installed face-recognition-models package, without importing it."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "models"


@functools.lru_cache(maxsize=4)
def load_face_backend(upsample: int = 0) -> FaceBackend:
    """Build `DlibFaces` once per process (loading the models takes ~1 s), or say why it cannot be."""
    if importlib.util.find_spec("dlib") is None:
        return FaceBackend(None, f"dlib is not installed ({INSTALL_HINT})")
    model_dir = dlib_model_dir()
    if model_dir is None:
        return FaceBackend(None, f"face-recognition-models is not installed ({INSTALL_HINT})")
    missing = [name for name in DLIB_MODEL_FILES.values() if not (model_dir / name).is_file()]
    if missing:
        return FaceBackend(None, f"{', '.join(missing)} missing from {model_dir} (reinstall face-recognition-models)")
    try:
        return FaceBackend(DlibFaces(model_dir, upsample=upsample))
    except Exception as err:  # noqa: BLE001 - a broken install is reported, not raised
        return FaceBackend(None, f"dlib could not load its models ({type(err).__name__}: {err})")


def get_face_analyzer(upsample: int = 0) -> FaceAnalyzer | None:
    """The face analyzer, or None when unavailable (`face_analyzer_unavailable_reason()` says why)."""
    return load_face_backend(upsample).analyzer


def face_analyzer_unavailable_reason(upsample: int = 0) -> str | None:
    return load_face_backend(upsample).reason


# Optional landmark backend ----------------------------------------------------------------------------

# What face-alignment 1.4/1.5 fetch on first use (torch hub cache, checkpoints/).
FACE_ALIGNMENT_WEIGHTS = ("2DFAN4-cd938726ad.zip", "s3fd-619a316812.pth")


class FaceAlignmentLandmarks:
    """68 landmarks from face-alignment's 2D-FAN (more robust to pose than dlib's), boxes from dlib or
    any detector. Built only by `get_landmark_backend()`, when the weights are already cached."""

    name = "face-alignment"

    def __init__(self, device: str = "cpu") -> None:
        import face_alignment

        landmarks_type = getattr(face_alignment.LandmarksType, "TWO_D", None) or face_alignment.LandmarksType._2D
        self._model = face_alignment.FaceAlignment(landmarks_type, device=device, face_detector="sfd")

    def landmarks(self, frame: np.ndarray, box: Box) -> np.ndarray:
        points = self._model.get_landmarks_from_image(_rgb(frame), detected_faces=[list(box)])
        if not points:
            raise ValueError("face-alignment found no landmarks in the given box")
        return np.asarray(points[0][:, :2], dtype=np.float64)


def get_landmark_backend(device: str = "cpu") -> tuple[FaceAlignmentLandmarks | None, str | None]:
    """face-alignment landmarks when installed and its weights are cached (never downloads)."""
    if importlib.util.find_spec("face_alignment") is None:
        return None, "face-alignment is not installed (pip install face-alignment)"
    import torch

    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    missing = [name for name in FACE_ALIGNMENT_WEIGHTS if not (checkpoints / name).is_file()]
    if missing:
        return None, f"face-alignment weights {', '.join(missing)} are not in {checkpoints} (it would download them)"
    try:
        return FaceAlignmentLandmarks(device), None
    except Exception as err:  # noqa: BLE001
        return None, f"face-alignment could not load ({type(err).__name__}: {err})"
