"""`diffferv eval`: compare an edited video with its original (paper section 4.2), honestly.

Both inputs are videos or folders of frames (png/jpg/webp/bmp, natural sort order). Frames are compared
at the native size, or with `size` at that short side, through `video.read_clip`'s geometry with
multiples of 8: the short side rounded down to a multiple of 8 (so native sizes like 640x360 stay
untouched), the long side mirror-padded up to one. Folders of frames go through the same geometry, so a
video and its frames compare equal. The original and the edited video must have the same native size:
anything else is a `UserError`.

Which frames are compared: `start`/`frames`/`stride` select frames of the EDITED video. Its frame j is
frame `original_start + j * original_stride` of the original, where the two come from the options, else
from the frame selection diffferv records in every output's metadata (`edit --start 100 --stride 2`
gives an output whose frame 0 is frame 100 of its source), else they are 0 and 1. Without either (a
folder of frames, another tool's video), the same selection applies to both sides and both must have
the same number of selected frames.

Groups of metrics (definitions in `metrics.py`):

* reconstruction: MSE, PSNR (capped at 100 dB), SSIM, LPIPS (when installed with its weights);
* identity (dlib): IDP, TL-ID, TG-ID, with the frames without a face counted and skipped;
* temporal: flow-warping error of the edit under the ORIGINAL's flow (and of the original itself, for
  reference);
* attributes (TACR, NAPR) and CLIP-IQA only from models the user passes; otherwise "unavailable".

Nothing is ever downloaded; what cannot be computed is reported as unavailable with the reason.

Memory does not grow with the clip's length: everything that can be refused (sizes, frame counts, the
alignment, the models) is checked from the probed frame counts and folder listings before a frame is
decoded; then both inputs are read in step, `CHUNK` frames at a time, and every metric is computed as the
frames go by (per-frame values kept, the previous frame for the flow). A decoder that gives fewer frames
than its container promised ends in a `UserError`.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from diffferv_cli.config import MAX_SHORT_SIDE, ClipSpec, EvalConfig
from diffferv_cli.errors import UserError
from diffferv_cli.evaluation import metrics

Progress = Callable[[str, int, int], None] | None
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
SIZE_MULTIPLE = 8
CLIP_IQA_PROMPTS = ("Good photo.", "Bad photo.")
CLIP_IQA_BATCH = 8
CHUNK = 32  # frames read at a time from each side; a multiple of CLIP_IQA_BATCH, so CLIP-IQA sees the
# batches of a whole-clip run


@dataclass(frozen=True)
class MetricResult:
    group: str
    name: str
    value: float | None  # None when unavailable
    note: str = ""
    better: Literal["lower", "higher", ""] = ""
    per_frame: Sequence[float] | None = None

    def to_json(self) -> dict:
        entry: dict = {"group": self.group, "value": _finite(self.value), "note": self.note}
        if self.better:
            entry["better"] = self.better
        if self.per_frame is not None:
            entry["per_frame"] = [_finite(v) for v in self.per_frame]
        return entry


@dataclass
class EvalReport:
    original: str
    edited: str
    frames: int
    height: int
    width: int
    config: EvalConfig
    results: list[MetricResult] = field(default_factory=list)
    original_frames: tuple[int, ...] = ()  # frame numbers of the original that were compared
    alignment: str = "same selection on both sides"  # how they were chosen
    # the original's own per-frame values beside an edit's ("tl_id": sim(S_i, S_i+1), "warp_error")
    reference_per_frame: dict[str, list[float]] = field(default_factory=dict)
    faces: dict[str, list[bool]] | None = None  # "original" / "edited": a face found in frame i

    def add(self, group: str, name: str, value: float | metrics.Unavailable | None, note: str = "",
            better: Literal["lower", "higher", ""] = "", per_frame: Sequence[float] | None = None) -> None:
        if isinstance(value, metrics.Unavailable):
            self.results.append(MetricResult(group, name, None, str(value), better))
        else:
            self.results.append(MetricResult(group, name, None if value is None else float(value), note, better,
                                              None if per_frame is None else [float(v) for v in per_frame]))

    def value(self, name: str) -> float | None:
        return next(result.value for result in self.results if result.name == name)

    def to_json(self) -> dict:
        return {
            "original": self.original,
            "edited": self.edited,
            "frames": self.frames,
            "size": {"height": self.height, "width": self.width},
            "selection": {"start": self.config.start, "frames": self.config.frames, "stride": self.config.stride},
            "original_frames": list(self.original_frames),
            "alignment": self.alignment,
            "scale": "pixel metrics on frames in [0, 1]; PSNR capped at 100 dB",
            "metrics": {result.name: result.to_json() for result in self.results},
            "reference_per_frame": {name: [_finite(v) for v in values]
                                    for name, values in self.reference_per_frame.items()},
            "faces": self.faces,
        }


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else value


# Reading ----------------------------------------------------------------------------------------------


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def _frame_files(folder: Path) -> list[Path]:
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                   key=_natural_key)
    if not files:
        raise UserError(f"{folder} holds no frames ({', '.join(IMAGE_SUFFIXES)}).")
    return files


def native_size(path: Path) -> tuple[int, int]:
    """(width, height) of a video or of the first frame of a folder, as displayed."""
    if not path.exists():
        raise UserError(f"{path} does not exist.")
    if path.is_dir():
        first = _frame_files(path)[0]
        with _open_frame(first) as image:
            return image.size
    from diffferv_cli.video.probe import probe

    info = probe(path)
    return int(info.width), int(info.height)


def _open_frame(path: Path):
    """A frame image opened (header only), refused when it cannot be read or has more pixels than PIL's
    decompression-bomb limit: nothing is decoded before that check."""
    from PIL import Image, UnidentifiedImageError

    from diffferv_cli.files import open_image

    try:
        return open_image(path)
    except Image.DecompressionBombError as err:
        raise UserError(f"The frame {path} is too large to decode ({err}).") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise UserError(f"Cannot read the frame {path} ({err}).") from None


def _short_side(width: int, height: int, size: int | None) -> int:
    if size is None and min(width, height) > MAX_SHORT_SIDE:
        raise UserError(f"The videos are {width}x{height}, larger than eval compares at native size (short side "
                        f"up to {MAX_SHORT_SIDE}); pass --size {MAX_SHORT_SIDE // 4} or another short side.")
    short = size if size is not None else min(width, height)
    return max(short // SIZE_MULTIPLE * SIZE_MULTIPLE, 2 * SIZE_MULTIPLE)


def _spec(start: int, frames: int | None, stride: int, short_side: int) -> ClipSpec:
    return ClipSpec(start=start, frames=frames, stride=stride, short_side=short_side, multiple=SIZE_MULTIPLE)


def frame_count(path: Path) -> int:
    """Frames in a video or a folder of frames."""
    if path.is_dir():
        return len(_frame_files(path))
    from diffferv_cli.video.probe import probe

    return probe(path).frame_count


def _fit(image: np.ndarray, geometry) -> np.ndarray:
    """One frame of a folder through the same geometry `video.read_clip` applies to a video: resize to
    the scaled size, then the centered crop (>0) / mirrored pad (<0) of `geometry.crop`."""
    import cv2

    height, width = image.shape[:2]
    scaled_width, scaled_height = geometry.scaled_size
    if (scaled_width, scaled_height) != (width, height):
        shrinking = scaled_width <= width and scaled_height <= height
        image = cv2.resize(image, (scaled_width, scaled_height),
                           interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)
    left, top, right, bottom = geometry.crop
    image = image[max(top, 0):scaled_height - max(bottom, 0), max(left, 0):scaled_width - max(right, 0)]
    pads = ((max(-top, 0), max(-bottom, 0)), (max(-left, 0), max(-right, 0)), (0, 0))
    return np.ascontiguousarray(np.pad(image, pads, mode="reflect") if any(map(any, pads)) else image)


def _folder_frames(folder: Path, spec: ClipSpec) -> Iterator[np.ndarray]:
    """The frames `spec` selects from a folder of frames, one at a time, at the comparison size."""
    from diffferv_cli.video.geometry import frame_selection, working_geometry

    files = _frame_files(folder)
    size = native_size(folder)
    geometry = working_geometry(size, spec)
    width, height = geometry.working_size
    for index in frame_selection(len(files), spec, name=folder.name):
        with _open_frame(files[index]) as image:
            if image.size != size:  # never stretched into the first frame's size and scored
                raise UserError(f"The frame {files[index]} is {image.size[0]}x{image.size[1]} but {files[0]} "
                                f"is {size[0]}x{size[1]}; eval compares frames of one size.")
            try:
                frame = _fit(np.asarray(image.convert("RGB")), geometry)
            except (OSError, ValueError) as err:
                raise UserError(f"Cannot read the frame {files[index]} ({err}).") from None
        if frame.shape != (height, width, 3):
            raise UserError(f"The frames in {folder} do not all have the same size.")
        yield frame


def _video_frames(path: Path, spec: ClipSpec) -> Iterator[np.ndarray]:
    """The frames `spec` selects from a video, decoded one at a time at the comparison size exactly as
    `video.read_clip`'s frames are (the same ffmpeg graph: select, one scale straight from the decoded
    pixels; `video.stream.stream_frames` with `size=` scales the RGB frame instead, up to ~200 levels
    apart at edges). Stops early, without an error, when the decoder gives fewer frames than the
    container promised: the caller says which side fell short."""
    from diffferv_cli.video.geometry import frame_selection, working_geometry
    from diffferv_cli.video.io import _decode_working
    from diffferv_cli.video.probe import probe

    info = probe(path)
    indices = frame_selection(info.frame_count, spec, name=path.name)
    yield from _decode_working(path, info, working_geometry((info.width, info.height), spec), spec, indices)


def frames_of(path: Path, spec: ClipSpec) -> Iterator[np.ndarray]:
    """The frames `spec` (a `ClipSpec` at the comparison size) selects from a video or folder, one at a
    time as uint8 RGB (H, W, 3): memory holds one frame, whatever the clip's length."""
    if not path.exists():
        raise UserError(f"{path} does not exist.")
    return _folder_frames(path, spec) if path.is_dir() else _video_frames(path, spec)


def _selected_count(path: Path, spec: ClipSpec) -> int:
    from diffferv_cli.video.geometry import frame_selection

    return len(frame_selection(frame_count(path), spec, name=path.name))


def alignment(edited: Path, config: EvalConfig):
    """(`SourceFrames` mapping the edited video's frames to the original's, how it was found), or
    (None, ...) when nothing says how they line up."""
    from diffferv_cli.video.geometry import SourceFrames

    recorded = None
    if not edited.is_dir():
        from diffferv_cli.video.probe import probe

        recorded = probe(edited).source_frames
    options = config.original_start is not None or config.original_stride is not None
    if recorded is None and not options:
        return None, "same selection on both sides"
    start = config.original_start if config.original_start is not None else (recorded.start if recorded else 0)
    stride = config.original_stride if config.original_stride is not None else (recorded.stride if recorded else 1)
    origin = "--original-start/--original-stride" if options else "the edited file's metadata"
    if options and recorded is not None:
        origin += " (over the edited file's metadata)"
    mapping = SourceFrames(start=start, stride=stride, count=frame_count(edited))
    return mapping, f"original frame = {start} + {stride} x edited frame, from {origin}"


@dataclass(frozen=True)
class Pairing:
    """Which frames of the original and the edited video are compared, and at what size: everything eval
    checks before it decodes a frame (from the probed frame counts and the folder listings)."""

    original: Path
    edited: Path
    original_spec: ClipSpec
    edited_spec: ClipSpec
    count: int  # frames compared
    numbers: tuple[int, ...]  # the original's frame numbers, one per compared frame
    alignment: str  # how they were chosen
    size: tuple[int, int]  # (width, height) of the compared frames

    def shortfall(self, side: Literal["original", "edited"], received: int) -> UserError:
        """The error when a decoder gives only `received` of the frames its container promised."""
        if side == "original":
            return UserError(f"Only {received} of the original's frames {self.numbers[0]}..{self.numbers[-1]} "
                             f"could be decoded, for {self.count} edited frames.")
        return UserError(f"Only {received} of the {self.count} selected frames of {self.edited} could be decoded; "
                         "the file may be damaged or have changed.")


def pair_inputs(original: Path, edited: Path, config: EvalConfig) -> Pairing:
    """The frames to compare (`Pairing`); a `UserError` when the two cannot be compared. Decodes nothing."""
    from diffferv_cli.video.geometry import working_geometry

    original_size, edited_size = native_size(original), native_size(edited)
    if original_size != edited_size:
        raise UserError(f"The original is {original_size[0]}x{original_size[1]} but the edited video is "
                        f"{edited_size[0]}x{edited_size[1]}; eval compares videos of the same size.")
    short_side = _short_side(*original_size, config.size)
    mapping, how = alignment(edited, config)
    edited_spec = _spec(config.start, config.frames, config.stride, short_side)
    count = _selected_count(edited, edited_spec)
    if mapping is None:
        original_spec = edited_spec
        original_count = _selected_count(original, original_spec)
        if original_count != count:
            raise UserError(f"The original has {original_count} selected frames but the edited video has {count}; "
                            "select the same frames on both sides (--start/--frames/--stride), or say which "
                            "frames of the original the edit holds (--original-start/--original-stride).")
        numbers = tuple(range(config.start, config.start + config.stride * count, config.stride))
    else:
        wanted = mapping.then(config.start, config.stride, count)
        available = frame_count(original)
        if wanted.indices[-1] >= available:
            raise UserError(f"The edited frames are frames {wanted.start}..{wanted.indices[-1]} of the original "
                            f"({how}), but the original has {available} frames; pass the video the edit was made "
                            "from, or --original-start/--original-stride.")
        original_spec = _spec(wanted.start, wanted.count, wanted.stride, short_side)
        numbers = wanted.indices
    size = working_geometry(original_size, edited_spec).working_size
    return Pairing(original, edited, original_spec, edited_spec, count, numbers, how, size)


def paired_chunks(pairing: Pairing, original: Iterator[np.ndarray], edited: Iterator[np.ndarray],
                  chunk: int) -> Iterator[tuple[list[np.ndarray], list[np.ndarray]]]:
    """The compared frames read in step from both sides, `chunk` (or the rest) at a time: (original
    frames, edited frames), lists of (H, W, 3). A side that ends early is a `UserError`."""
    done = 0
    while done < pairing.count:
        wanted = min(chunk, pairing.count - done)
        source = list(itertools.islice(original, wanted))
        if len(source) < wanted:
            raise pairing.shortfall("original", done + len(source))
        result = list(itertools.islice(edited, wanted))
        if len(result) < wanted:
            raise pairing.shortfall("edited", done + len(result))
        for frame_source, frame_result in zip(source, result, strict=True):
            if frame_source.shape != frame_result.shape:  # same native size: only a reader disagreement
                raise UserError(f"The frames differ in size after reading ({frame_source.shape[:2]} vs "
                                f"{frame_result.shape[:2]}).")
        yield source, result
        done += wanted
        del source, result  # the caller is done with them: not held while the next chunk is read


# Evaluation -------------------------------------------------------------------------------------------


class FramesHook(Protocol):
    """Sees a few of the compared frames as they go by (the HTML report's strip keeps them)."""

    def select(self, count: int) -> Sequence[int]:
        """The positions (0-based, among the `count` compared frames) it wants to be shown."""

    def keep(self, position: int, original: np.ndarray, edited: np.ndarray) -> None:
        """Frame `position` of both sides, (H, W, 3) uint8, in increasing order of position; valid only
        during the call (copy what is kept)."""


def evaluate(original: Path, edited: Path, config: EvalConfig, progress: Progress = None,
             frames_hook: FramesHook | None = None) -> EvalReport:
    """All metrics of section 4.2 that can be computed here, as an `EvalReport`.

    Both inputs are read in step, `CHUNK` frames at a time, and every metric is computed as the frames go
    by (per-frame values, the previous frame for the flow), so memory does not grow with the clip (only
    the per-frame values and 128-number face descriptors do). `progress("frames", done, total)` after
    each chunk; `frames_hook` is shown the frames it selects."""
    report_progress = progress or (lambda stage, done, total: None)
    original, edited = Path(original), Path(edited)
    pairing = pair_inputs(original, edited, config)
    width, height = pairing.size
    report = EvalReport(str(original), str(edited), pairing.count, height, width, config,
                        original_frames=pairing.numbers, alignment=pairing.alignment)
    shown = set(frames_hook.select(pairing.count)) if frames_hook is not None else set()
    metrics_in_order = [_Reconstruction(), _Identity(config), *([_Temporal(config)] if config.temporal else []),
                        _Attributes(config), _ClipIqa(config)]  # models loaded (and refused) before decoding
    done = 0
    with contextlib.closing(frames_of(original, pairing.original_spec)) as source_frames, \
            contextlib.closing(frames_of(edited, pairing.edited_spec)) as edited_frames:
        for source, result in paired_chunks(pairing, source_frames, edited_frames, CHUNK):
            for position in sorted(shown & set(range(done, done + len(source)))):
                frames_hook.keep(position, source[position - done], result[position - done])
            for metric in metrics_in_order:
                metric.update(source, result)
            done += len(source)
            report_progress("frames", done, pairing.count)
            del source, result  # let this chunk go before the next is read: one chunk a side in memory
    for metric in metrics_in_order:
        metric.finish(report)
    return report


class _Reconstruction:
    """MSE, PSNR, SSIM and LPIPS frame by frame."""

    def __init__(self) -> None:
        self.mse: list[float] = []
        self.ssim: list[float] = []
        self.lpips: list[float] | metrics.Unavailable = []

    def update(self, source: list[np.ndarray], result: list[np.ndarray]) -> None:
        for frame_source, frame_result in zip(source, result, strict=True):
            self.mse.append(float(metrics.mse_per_frame(frame_source, frame_result)[0]))
            self.ssim.append(float(metrics.ssim_per_frame(frame_source, frame_result)[0]))
            if not isinstance(self.lpips, metrics.Unavailable):
                lpips = metrics.lpips_per_frame(frame_source, frame_result)
                if isinstance(lpips, metrics.Unavailable):
                    self.lpips = lpips
                else:
                    self.lpips.append(float(lpips[0]))

    def finish(self, report: EvalReport) -> None:
        mse = np.asarray(self.mse, dtype=np.float64)
        psnr = metrics.psnr_from_mse(mse)
        ssim = np.asarray(self.ssim, dtype=np.float64)
        report.add("reconstruction", "mse", mse.mean(), "frames in [0, 1]", "lower", mse)
        report.add("reconstruction", "psnr", psnr.mean(), "dB, peak 1, per-frame capped at 100", "higher", psnr)
        report.add("reconstruction", "ssim", ssim.mean(), "Gaussian window 1.5, channels averaged", "higher", ssim)
        if isinstance(self.lpips, metrics.Unavailable):
            report.add("reconstruction", "lpips", self.lpips, better="lower")
        else:
            lpips = np.asarray(self.lpips, dtype=np.float64)
            report.add("reconstruction", "lpips", lpips.mean(), "AlexNet", "lower", lpips)


class _Identity:
    """IDP, TL-ID and TG-ID from the largest face's descriptor in every frame (128 numbers a frame)."""

    def __init__(self, config: EvalConfig) -> None:
        from diffferv_cli.models.auxiliary import load_face_backend

        self.similarity = config.similarity
        backend = load_face_backend()
        self.analyzer = backend.analyzer
        self.reason = backend.reason or "no face analyzer"
        self.source: list[np.ndarray | None] = []
        self.edited: list[np.ndarray | None] = []

    def update(self, source: list[np.ndarray], result: list[np.ndarray]) -> None:
        from diffferv_cli.evaluation.faces import largest_face_descriptor

        if self.analyzer is None:
            return
        for frame_source, frame_result in zip(source, result, strict=True):
            self.source.append(largest_face_descriptor(self.analyzer, frame_source))
            self.edited.append(largest_face_descriptor(self.analyzer, frame_result))

    def finish(self, report: EvalReport) -> None:
        names = ("idp", "tl_id", "tg_id")
        if self.analyzer is None:
            for name in names:
                report.add("identity", name, metrics.Unavailable(self.reason), better="higher")
            return
        count = len(self.source)
        scores = metrics.identity_metrics(self.source, self.edited, self.similarity)
        series = metrics.identity_series(self.source, self.edited, self.similarity)
        report.faces = {"original": series.face_source.tolist(), "edited": series.face_edited.tolist()}
        report.reference_per_frame["tl_id"] = series.source_adjacent.tolist()
        similarity = "1 - dlib distance" if self.similarity == "dlib" else "cosine of dlib descriptors"
        note = f"{similarity}; {scores.frames_used}/{count} frames with a face on both sides"
        if scores.frames_without_face_source or scores.frames_without_face_edited:
            note += (f" (no face: {scores.frames_without_face_source} original, "
                     f"{scores.frames_without_face_edited} edited)")
        report.add("identity", "idp", scores.idp, note, "higher", series.idp)
        report.add("identity", "tl_id", scores.tl_id, "adjacent frames, relative to the original; per frame: "
                   "the edit's sim(i, i+1), the original's in reference_per_frame", "higher", series.edited_adjacent)
        report.add("identity", "tg_id", scores.tg_id, "all frame pairs, relative to the original", "higher")


class _Temporal:
    """Flow-warping error of the edit (and of the original) under the original's flow, pair by pair: the
    previous frame of each side is all that is kept."""

    def __init__(self, config: EvalConfig) -> None:
        from diffferv_cli.temporal.flow import DISFlow

        self.preset = config.flow_preset
        self.estimator = DISFlow(config.flow_preset)  # one instance, called in the order compute_flow calls it
        self.previous: tuple[np.ndarray, np.ndarray] | None = None
        self.edited: list[metrics.PairWarpError] = []
        self.own: list[metrics.PairWarpError] = []
        self.pixels = 0

    def update(self, source: list[np.ndarray], result: list[np.ndarray]) -> None:
        from diffferv_cli.temporal.flow import compute_flow

        for frame_source, frame_result in zip(source, result, strict=True):
            if self.previous is not None:
                previous_source, previous_result = self.previous
                flow = compute_flow(np.stack((previous_source, frame_source)), self.estimator)  # one pair
                forward, occlusion = flow.forward[0], flow.occlusion[0]  # (H, W, 2), (H, W)
                self.edited.append(metrics.pair_warping_error(previous_result, frame_result, forward, occlusion))
                self.own.append(metrics.pair_warping_error(previous_source, frame_source, forward, occlusion))
            self.previous = (frame_source, frame_result)
            self.pixels = frame_source.shape[0] * frame_source.shape[1]

    def finish(self, report: EvalReport) -> None:
        if not self.edited:
            report.add("temporal", "warp_error", metrics.Unavailable("needs at least two frames"), better="lower")
            return
        edited = metrics.warping_error_of_pairs(self.edited, self.pixels)
        own = metrics.warping_error_of_pairs(self.own, self.pixels)
        note = (f"MSE [0, 1] under the original's flow (DIS {self.preset}), {edited.valid_fraction:.0%} "
                f"of pixels unoccluded; original itself {own.mse:.3g}")
        report.add("temporal", "warp_error", edited.mse, note, "lower", edited.per_pair_mse)
        report.reference_per_frame["warp_error"] = own.per_pair_mse.tolist()
        report.add("temporal", "warp_error_abs", edited.mae, f"mean absolute; original itself {own.mae:.3g}", "lower")


def _usable(what: str, step: Callable[[], object]):
    """`step()`, with anything but a `UserError` it raises said as `what` not being usable (a model the user
    passed that does not work is the user's input)."""
    try:
        return step()
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001
        raise UserError(f"{what} could not be used ({type(err).__name__}: {err}).") from None


class _Attributes:
    """TACR and NAPR from the binary predictions of a user-supplied classifier, a chunk at a time."""

    def __init__(self, config: EvalConfig) -> None:
        self.config = config
        self.classifier = None
        self.source: list[np.ndarray] = []  # (chunk, labels) bool
        self.edited: list[np.ndarray] = []
        if config.attribute_model is None:
            return
        from diffferv_cli.models.auxiliary import load_attribute_classifier

        self.classifier = load_attribute_classifier(config.attribute_model)
        self.labels = _usable(f"The attribute model {config.attribute_model}", lambda: attribute_labels(self.classifier))
        if config.target_attribute is None or config.target_attribute not in self.labels:
            given = "no --target-attribute" if config.target_attribute is None else f"{config.target_attribute!r}"
            raise UserError(f"TACR/NAPR need --target-attribute, one of the model's labels "
                            f"({', '.join(self.labels)}); got {given}.")

    def update(self, source: list[np.ndarray], result: list[np.ndarray]) -> None:
        if self.classifier is None:
            return
        what = f"The attribute model {self.config.attribute_model}"
        self.source.append(_usable(what, lambda: classify_attributes(self.classifier, source)[1]))
        self.edited.append(_usable(what, lambda: classify_attributes(self.classifier, result)[1]))

    def finish(self, report: EvalReport) -> None:
        if self.classifier is None:
            why = metrics.Unavailable("pass --attribute-model (an image-classification model folder) "
                                      "and --target-attribute")
            report.add("attributes", "tacr", why, better="higher")
            report.add("attributes", "napr", why, better="higher")
            return
        target = self.config.target_attribute
        rates = metrics.attribute_rates(np.concatenate(self.source), np.concatenate(self.edited), self.labels, target)
        report.add("attributes", "tacr", rates.tacr, f"target {target!r} changed", "higher")
        report.add("attributes", "napr", rates.napr, f"{len(self.labels) - 1} other attributes unchanged", "higher")


def attribute_labels(classifier) -> list[str]:
    """The labels of a transformers image-classification pipeline, in the model's order."""
    config = classifier.model.config
    return [config.id2label[i] for i in range(len(config.id2label))]


def classify_attributes(classifier, frames: Sequence[np.ndarray]) -> tuple[list[str], np.ndarray]:
    """(labels, binary predictions (m, labels)) from a transformers image-classification pipeline
    (`models.auxiliary.load_attribute_classifier`), for frames (H, W, 3) uint8 RGB.

    Multi-label models (`problem_type == "multi_label_classification"`, CelebA-style) give sigmoid
    scores thresholded at 0.5; single-label models give the arg-max label as the only positive. Each
    frame is classified on its own, so a clip classified in chunks gets the same predictions."""
    from PIL import Image

    labels = attribute_labels(classifier)
    multi_label = classifier.model.config.problem_type == "multi_label_classification"
    outputs = classifier([Image.fromarray(frame) for frame in frames], top_k=len(labels),
                         function_to_apply="sigmoid" if multi_label else "softmax")
    scores = np.zeros((len(frames), len(labels)))
    for row, output in enumerate(outputs):
        for entry in output:
            scores[row, labels.index(entry["label"])] = entry["score"]
    if multi_label:
        return labels, scores >= 0.5
    return labels, scores == scores.max(axis=1, keepdims=True)


class _ClipIqa:
    """CLIP-IQA of every frame from a user-supplied CLIP model, a chunk at a time (`CHUNK` is a multiple of
    `clip_iqa`'s batch, so the batches are those of the whole clip)."""

    def __init__(self, config: EvalConfig) -> None:
        self.what = f"The CLIP model {config.clip_model}"
        self.model = None
        self.edited: list[np.ndarray] = []
        self.source: list[np.ndarray] = []
        if config.clip_model is not None:
            from diffferv_cli.models.auxiliary import load_clip

            self.model = load_clip(config.clip_model)

    def update(self, source: list[np.ndarray], result: list[np.ndarray]) -> None:
        if self.model is None:
            return
        self.edited.append(_usable(self.what, lambda: clip_iqa(*self.model, result)))
        self.source.append(_usable(self.what, lambda: clip_iqa(*self.model, source)))

    def finish(self, report: EvalReport) -> None:
        if self.model is None:
            report.add("quality", "clip_iqa", metrics.Unavailable("pass --clip-model (a CLIP model folder)"),
                       better="higher")
            return
        edited, source = np.concatenate(self.edited), np.concatenate(self.source)
        report.add("quality", "clip_iqa", edited.mean(),
                   f"P({CLIP_IQA_PROMPTS[0]!r} vs {CLIP_IQA_PROMPTS[1]!r}); original {source.mean():.3f}",
                   "higher", edited)


def clip_iqa(clip, processor, frames: Sequence[np.ndarray], batch: int = CLIP_IQA_BATCH) -> np.ndarray:
    """CLIP-IQA per frame with a transformers `CLIPModel` + `CLIPProcessor` (`models.auxiliary.load_clip`).

    The original CLIP-IQA uses a ResNet-50 CLIP without positional embeddings; any CLIP checkpoint works
    here, so values are comparable only between runs with the same model."""
    import torch
    from PIL import Image

    with torch.no_grad():
        text = processor(text=list(CLIP_IQA_PROMPTS), return_tensors="pt", padding=True)
        text_features = clip.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
        text_features = _features(text_features)
        scores = []
        for start in range(0, len(frames), batch):
            images = [Image.fromarray(frame) for frame in frames[start:start + batch]]
            pixels = processor(images=images, return_tensors="pt")["pixel_values"]
            image_features = _features(clip.get_image_features(pixel_values=pixels))
            cosine = (image_features @ text_features.T).double().numpy()  # (batch, 2)
            scores.append(metrics.clip_iqa_from_similarities(cosine[:, 0], cosine[:, 1]))
    return np.concatenate(scores)


def _features(output):
    """Unit-norm embeddings (transformers 5 may return a model output instead of a tensor)."""
    import torch

    tensor = output if isinstance(output, torch.Tensor) else output.pooler_output
    return tensor / tensor.norm(dim=-1, keepdim=True)
