"""The face region: one fixed box per clip, holding the head in every frame, edited at working size.

`--region auto` runs the face detector (dlib's HOG, `evaluation/faces.py`) on every selected frame,
follows one face through the clip (`track_faces`), widens each frame's face box by its landmarks
(face-alignment's when installed with its weights cached, else dlib's 68 points) and takes the union
over the clip, grown by generous margins (`HEAD_MARGINS`: hair above, neck below, some background at
the sides; the paper's point is that the edit is not confined to a tight face crop). The box is then
grown, where the frame allows, to the working size's aspect ratio, so that the working frames are real
pixels rather than mirrored pad. One box for the whole clip: the edit sees a steady crop, so motion
and the temporal attention work as on a whole frame.

Boxes are (x, y, width, height) in displayed source pixels, as `ClipSpec.region` holds them; the
detector's `Box` is (left, top, right, bottom).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffferv_cli.config import ClipSpec
from diffferv_cli.errors import UserError
from diffferv_cli.evaluation.faces import Box

Region = tuple[int, int, int, int]  # x, y, width, height
Progress = Callable[[int, int], None] | None

# Margins around the union of the face boxes, in units of the largest face box side: dlib's box runs
# from the eyebrows to the chin, so the hair needs the most room above.
HEAD_MARGINS = {"left": 0.75, "top": 1.0, "right": 0.75, "bottom": 0.75}
DETECT_SHORT_SIDE = 720  # frames are searched at most this size (short side): HOG finds faces >= ~80 px


@dataclass(frozen=True)
class FaceRegion:
    box: Region | None  # None: no face found, the whole frame is edited
    frames_with_face: int
    frames: int
    backend: str

    @property
    def message(self) -> str:
        if self.box is None:
            return f"No face found in the {self.frames} selected frames ({self.backend}); editing the full frame."
        x, y, width, height = self.box
        seen = "every frame" if self.frames_with_face == self.frames else \
            f"{self.frames_with_face} of {self.frames} frames"
        return f"Face region {x},{y},{width},{height} (x,y,width,height), face found in {seen} ({self.backend})."


def parse_region(text: str) -> str | Region:
    """'full', 'auto' or 'X,Y,W,H' (integers) from the command line; a `UserError` otherwise."""
    value = text.strip().lower()
    if value in ("full", "auto"):
        return value
    parts = value.split(",")
    try:
        numbers = tuple(int(part) for part in parts)
    except ValueError:
        numbers = ()
    if len(numbers) != 4 or min(numbers) < 0 or min(numbers[2:]) < 8:
        raise UserError(f"--region must be full, auto or X,Y,W,H (whole pixels, a box of at least 8x8), "
                        f"not {text!r}.")
    return numbers  # type: ignore[return-value]


def track_faces(detections: Sequence[Sequence[Box]]) -> list[Box | None]:
    """One face per frame from each frame's detections: start from the largest face of the clip, then
    walk forward and backward frame by frame, taking the detection nearest to the last face followed
    when its centre moved less than that face's size (else the frame has none)."""
    sizes = [(box.area, frame, index) for frame, boxes in enumerate(detections) for index, box in enumerate(boxes)]
    track: list[Box | None] = [None] * len(detections)
    if not sizes:
        return track
    _, seed_frame, seed_index = max(sizes, key=lambda item: (item[0], -item[1], -item[2]))
    track[seed_frame] = detections[seed_frame][seed_index]
    for order in (range(seed_frame + 1, len(detections)), range(seed_frame - 1, -1, -1)):
        last = track[seed_frame]
        for frame in order:
            candidates = detections[frame]
            if not candidates:
                continue
            centre = np.array([(last.left + last.right) / 2, (last.top + last.bottom) / 2])
            centres = np.array([((box.left + box.right) / 2, (box.top + box.bottom) / 2) for box in candidates])
            distances = np.linalg.norm(centres - centre, axis=1)
            nearest = int(np.argmin(distances))
            if distances[nearest] < max(last.right - last.left, last.bottom - last.top):
                track[frame] = last = candidates[nearest]
    return track


def head_box(faces: Sequence[Box | None], frame_size: tuple[int, int],
             margins: dict[str, float] = HEAD_MARGINS) -> Region | None:
    """The union of the frames' face boxes grown by `margins` (times the largest face side), clipped to
    the frame; None when no frame has a face."""
    found = [face for face in faces if face is not None]
    if not found:
        return None
    side = max(max(face.right - face.left, face.bottom - face.top) for face in found)
    left = min(face.left for face in found) - margins["left"] * side
    top = min(face.top for face in found) - margins["top"] * side
    right = max(face.right for face in found) + margins["right"] * side
    bottom = max(face.bottom for face in found) + margins["bottom"] * side
    width, height = frame_size
    left, top = max(0, math.floor(left)), max(0, math.floor(top))
    right, bottom = min(width, math.ceil(right)), min(height, math.ceil(bottom))
    return (left, top, right - left, bottom - top)


def fit_working_aspect(box: Region, frame_size: tuple[int, int], spec: ClipSpec) -> Region:
    """Grow the box's long side (centred, shifted to stay inside the frame) so that it scales to the
    working size with (almost) no mirrored pad. A box that cannot grow enough keeps what fits. A box more
    elongated than the working size allows (`MAX_ASPECT`: a small face moving across a wide frame) first
    grows its short side to fit."""
    from diffferv_cli.video.geometry import MAX_ASPECT, working_geometry

    x, y, width, height = box
    if width > MAX_ASPECT * height:
        height = min(math.ceil(width / MAX_ASPECT), frame_size[1])
        y = _centred(y, box[3], height, frame_size[1])
    elif height > MAX_ASPECT * width:
        width = min(math.ceil(height / MAX_ASPECT), frame_size[0])
        x = _centred(x, box[2], width, frame_size[0])
    geometry = working_geometry((width, height), spec)
    (work_width, work_height), (scaled_width, scaled_height) = geometry.working_size, geometry.scaled_size
    short = min(width, height)

    def longest(working_long: int) -> int:  # the longest side that still scales to <= working_long
        side = math.floor(short * working_long / spec.short_side)
        while side > 0 and math.floor(side * spec.short_side / short + 0.5) > working_long:
            side -= 1
        return side

    if width >= height and scaled_width < work_width:
        grown = min(longest(work_width), frame_size[0])
        x, width = _centred(x, width, grown, frame_size[0]), grown
    elif height > width and scaled_height < work_height:
        grown = min(longest(work_height), frame_size[1])
        y, height = _centred(y, height, grown, frame_size[1]), grown
    return (x, y, width, height)


def _centred(start: int, length: int, grown: int, limit: int) -> int:
    """Where a span [start, start + length) grown to `grown` (<= `limit`) starts: centred on the old one,
    shifted to stay inside [0, limit)."""
    return min(max(0, start - (grown - length) // 2), limit - grown)


def _landmark_source():
    """face-alignment's landmarks when installed with cached weights (never downloads), else None."""
    from diffferv_cli.models.auxiliary import load_landmark_backend

    backend, _ = load_landmark_backend()
    return backend


def find_face_region(path, spec: ClipSpec, *, analyzer=None, landmarks=None, progress: Progress = None) -> FaceRegion:
    """Search the frames `spec` selects for the face and return the clip's head box (or no box).

    `analyzer` (default: dlib, `models.auxiliary.load_face_backend`) detects; `landmarks` (default: face-alignment
    when available, else the analyzer's own 68 points) widens each frame's box to the whole face."""
    from diffferv_cli.models.auxiliary import load_face_backend
    from diffferv_cli.video.geometry import frame_selection
    from diffferv_cli.video.probe import probe
    from diffferv_cli.video.stream import stream_frames

    path = Path(path)
    if analyzer is None:
        backend = load_face_backend()
        if backend.analyzer is None:
            raise UserError(f"--region auto needs the face detector, which cannot load: {backend.reason}.")
        analyzer = backend.analyzer
    if landmarks is None:
        landmarks = _landmark_source() or (analyzer if hasattr(analyzer, "landmarks") else None)
    if landmarks is None:
        names = f"{analyzer.name} detector"
    else:
        names = f"{analyzer.name} detector, {'its' if landmarks is analyzer else landmarks.name} 68 landmarks"
    info = probe(path)
    indices = frame_selection(info.frame_count, spec, name=path.name)
    scale = min(1.0, DETECT_SHORT_SIDE / min(info.width, info.height))
    size = (max(1, round(info.width * scale)), max(1, round(info.height * scale)))
    detections: list[list[Box]] = []  # per frame, in source pixels, widened by the landmarks
    for done, frame in enumerate(stream_frames(path, indices, spec.stride, info=info, size=size), start=1):
        boxes = [_with_landmarks(frame, box, landmarks) for box in analyzer.detect(frame)]
        detections.append([Box(math.floor(box.left / scale), math.floor(box.top / scale),
                               math.ceil(box.right / scale), math.ceil(box.bottom / scale)) for box in boxes])
        if progress:
            progress(done, len(indices))
    faces = track_faces(detections)
    box = head_box(faces, (info.width, info.height))
    if box is not None:
        box = fit_working_aspect(box, (info.width, info.height), spec)
    return FaceRegion(box, sum(face is not None for face in faces), len(indices), names)


def _with_landmarks(frame: np.ndarray, box: Box, landmarks) -> Box:
    """The detector's box grown to hold the face's 68 landmarks (jaw line, brows)."""
    if landmarks is None:
        return box
    points = landmarks.landmarks(frame, box)  # (68, 2) x, y
    return Box(min(box.left, math.floor(points[:, 0].min())), min(box.top, math.floor(points[:, 1].min())),
               max(box.right, math.ceil(points[:, 0].max()) + 1), max(box.bottom, math.ceil(points[:, 1].max()) + 1))


def resolve_region(path, spec: ClipSpec, region: str | Region, *, progress: Progress = None) -> tuple[ClipSpec, str | None]:
    """The spec with its region set from a `parse_region` value, and a line for the user (None if
    nothing to say). 'auto' searches the face; no face gives the whole frame."""
    if region == "full":
        return spec.model_copy(update={"region": None}), None
    if region == "auto":
        found = find_face_region(path, spec, progress=progress)
        return spec.model_copy(update={"region": found.box}), found.message
    try:
        return ClipSpec(**{**spec.model_dump(), "region": tuple(region)}), None
    except ValueError as err:
        raise UserError(f"Invalid --region: {err.errors()[0]['msg']}.") from None
