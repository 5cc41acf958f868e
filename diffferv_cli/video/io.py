"""Video in and out: the only module that runs ffmpeg.

The binary comes from `imageio-ffmpeg` (no ffprobe there, so `probe` parses ffmpeg's own stream dump
and a stream-copy packet listing); command lines are built with ffmpeg-python. Every ffmpeg run goes
through `_run` or `_FFmpeg`, which turn a failure into a `UserError` carrying ffmpeg's own reason.

Conventions, fixed here for the whole project:

* **Frames** are uint8 RGB arrays `(m, H, W, 3)`, upright (ffmpeg's autorotate applies the display
  matrix while decoding), so width and height are always *as displayed*.
* **Frame numbers** count decoded frames from 0 in display order.
* **Variable frame rate**: every decoded frame is kept exactly once (`-fps_mode passthrough`: no frame
  is duplicated or dropped) and the clip is treated as constant frame rate at the *average* rate
  (frames / duration). Output is written at that constant rate: total duration is kept, local timing
  is evened out.
* **Working size** (`working_geometry`): scale so the short side is `spec.short_side`, keeping the
  aspect ratio, then round the long side *up* to a multiple of `spec.multiple` by padding both sides
  equally with mirrored content. Padding never loses source pixels, is undone exactly on output, and
  costs at most one extra row of tiles; `Geometry.crop` records it as negative numbers. (Positive,
  i.e. cropped, geometries are also undone, by mirroring the edge back, but `working_geometry` never
  makes them.) Scaling happens inside ffmpeg, so an 8K frame is never held in memory at full size.
* **Output** (`write_video`): H.264 yuv420p MP4 with `+faststart`, BT.709 tagged, upright pixels and no
  rotation metadata (it displays like the source), atomic (temp file + rename), never over an input.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import ffmpeg
import numpy as np

from diffferv_cli.config import ClipSpec
from diffferv_cli.errors import UserError

Progress = Callable[[int, int], None] | None

MAX_ASPECT = 8.0  # longer / shorter side; beyond this the working size would be absurd
OUTPUT_SUFFIXES = (".mp4", ".m4v", ".mov")
_STANDARD_RATES = tuple(Fraction(r) for r in ("24000/1001", "24", "25", "30000/1001", "30", "48", "50",
                                              "60000/1001", "60", "90", "100", "120000/1001", "120", "240"))


# The ffmpeg wrapper ------------------------------------------------------------------------------

def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary shipped by imageio-ffmpeg (or the one in IMAGEIO_FFMPEG_EXE)."""
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as err:
        raise UserError(f"No ffmpeg binary found ({err}); run `pip install imageio-ffmpeg`.") from None


@lru_cache(maxsize=1)
def ffmpeg_version() -> str:
    """E.g. "ffmpeg 9.0.2 (imageio-ffmpeg)"."""
    exe = ffmpeg_exe()
    first_line = _run([exe, "-hide_banner", "-version"], "report its version").stdout.decode(errors="replace")
    match = re.search(r"version n?(\d+(?:\.\d+)*)", first_line)
    version = match.group(1) if match else first_line.split("\n", 1)[0]
    origin = "imageio-ffmpeg" if "imageio_ffmpeg" in exe else exe
    return f"ffmpeg {version} ({origin})"


# ffmpeg's generic closing lines and the cascade its threads print after the real error
_GENERIC_LINE = re.compile(
    r"^(Conversion failed|Error opening (input|output) files?|Exiting normally|Press \[q\]|frame=|size=|video:"
    r"|Error closing|Nothing was written|Terminating thread|Task finished with error code"
    r"|Error sending frames to consumers|Could not open encoder before EOF|Error while filtering"
    r"|Error while processing the decoded data)")
_LOG_PREFIX = re.compile(r"^((\[[^\]]*@ ?0x[0-9a-f]+\] ?)+|\w+ \[(error|fatal|warning)\]: )")


def _reason(stderr: str, *, last: bool = False) -> str:
    """ffmpeg's own reason for failing: the first line (error-level logs start with the cause; the
    rest is the cascade) or, for info-level logs, the last line that is not generic."""
    lines = [_LOG_PREFIX.sub("", line).strip() for line in stderr.splitlines()]
    lines = [line for line in lines if line]
    meaningful = [line for line in lines if not _GENERIC_LINE.match(line)] or lines or ["no message"]
    return (meaningful[-1] if last else meaningful[0]).rstrip(".")


def _failure(what: str, stderr: str, *, last: bool = False) -> UserError:
    return UserError(f"ffmpeg could not {what}: {_reason(stderr, last=last)}.")


def _command(stream, *, loglevel: str = "error") -> list[str]:
    """The full command line for an ffmpeg-python graph, with our global options first."""
    return [ffmpeg_exe(), "-hide_banner", "-nostdin", "-nostats", "-loglevel", loglevel, "-y",
            *ffmpeg.get_args(stream)]


def _run(args: list[str], what: str, *, check: bool = True) -> subprocess.CompletedProcess:
    """Run ffmpeg to completion; stdout as bytes, stderr as text."""
    try:
        done = subprocess.run(args, capture_output=True, check=False)
    except FileNotFoundError:
        raise UserError(f"The ffmpeg binary {args[0]} is missing; reinstall imageio-ffmpeg.") from None
    done.stderr = done.stderr.decode(errors="replace")
    if check and done.returncode != 0:
        raise _failure(what, done.stderr)
    return done


class _FFmpeg:
    """One running ffmpeg with a pipe to or from it. Its stderr is drained by a thread (no pipe ever
    blocks); on leaving the `with` block it is waited for, and a non-zero exit becomes `UserError`.
    If the block raises, ffmpeg is killed; a broken pipe (ffmpeg died first) becomes its message."""

    def __init__(self, args: list[str], what: str, *, stdin: bool = False, stdout: bool = False):
        self.what = what
        try:
            self.process = subprocess.Popen(args, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                            stdout=subprocess.PIPE if stdout else subprocess.DEVNULL,
                                            stderr=subprocess.PIPE)
        except FileNotFoundError:
            raise UserError(f"The ffmpeg binary {args[0]} is missing; reinstall imageio-ffmpeg.") from None
        self._stderr: list[bytes] = []
        self._drain = threading.Thread(target=lambda: self._stderr.extend(self.process.stderr), daemon=True)
        self._drain.start()

    @property
    def stderr(self) -> str:
        return b"".join(self._stderr).decode(errors="replace")

    def __enter__(self) -> subprocess.Popen:
        return self.process

    def __exit__(self, kind, error, trace) -> bool:
        died_first = kind is not None and issubclass(kind, BrokenPipeError)
        if kind is not None and not died_first:
            self.process.kill()  # our side failed or was interrupted: stop ffmpeg now
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe:
                with contextlib.suppress(OSError):
                    pipe.close()
        self.process.wait()
        self._drain.join()
        if died_first or (kind is None and self.process.returncode != 0):
            raise _failure(self.what, self.stderr) from None
        return False


# Probe -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VideoInfo:
    """What a video file holds. Sizes are as displayed (rotation and non-square pixels applied)."""

    path: Path
    width: int
    height: int
    rotation: int  # clockwise degrees the stored frames are turned for display (0/90/180/270)
    fps: float  # average for variable frame rate
    fps_fraction: str  # e.g. "30000/1001"
    frame_count: int  # exact: counted packet by packet, not the container's claim
    duration: float  # seconds of video: frame_count / fps
    has_audio: bool
    codec: str
    variable_fps: bool = False


def _check_input_file(path: Path) -> None:
    if not path.exists():
        raise UserError(f"{path} does not exist.")
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a video file.")
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty (0 bytes), not a video.")
    if not os.access(path, os.R_OK):
        raise UserError(f"{path} is not readable (permission denied).")


def probe(path) -> VideoInfo:
    """Describe a video without ffprobe: one stream-copy pass gives ffmpeg's stream dump (stderr) and
    one line per packet (framecrc on stdout), from which frame count and exact frame rate follow."""
    path = Path(path)
    _check_input_file(path)
    listing = ffmpeg.output(ffmpeg.input(str(path))["V:0?"], "pipe:", format="framecrc", c="copy")
    done = _run(_command(listing, loglevel="info"), f"read {path.name}", check=False)
    header = done.stderr
    if "Input #0" not in header:
        reason = _reason(header, last=True)
        raise UserError(f"{path} is not a video ffmpeg can read ({reason}).")
    stream = _video_stream(header)
    if stream is None:
        raise UserError(f"{path} has no video stream.")
    if done.returncode != 0:
        raise _failure(f"read {path.name}", header, last=True)
    count, rate, variable = _packet_timing(done.stdout.decode(errors="replace"), stream["fps"])
    if count == 0:
        raise UserError(f"{path} has a video stream but no frames in it.")
    width, height = stream["size"]
    if stream["rotation"] in (90, 270):
        width, height = height, width
    return VideoInfo(path=path, width=width, height=height, rotation=stream["rotation"], fps=float(rate),
                     fps_fraction=f"{rate.numerator}/{rate.denominator}", frame_count=count,
                     duration=float(count / rate), has_audio=bool(re.search(r"Stream #0:\d+\S*: Audio:", header)),
                     codec=stream["codec"], variable_fps=variable)


def _video_stream(header: str) -> dict | None:
    """The first video stream of input #0 that is not cover art, from ffmpeg's stream dump."""
    dump = header.split("Input #0", 1)[1].split("Output #0", 1)[0].split("Stream mapping:", 1)[0]
    blocks = re.split(r"\n(?=\s*Stream #)", dump)
    for block in blocks:
        first_line = block.strip().split("\n", 1)[0]
        match = re.match(r"Stream #0:\d+\S*: Video: (\w+)", first_line)
        if not match or "(attached pic)" in first_line:
            continue
        size = re.search(r"[ ,](\d+)x(\d+)[ ,\[]", first_line + " ")
        if not size:
            return None
        width, height = int(size.group(1)), int(size.group(2))
        sar = re.search(r"\[SAR (\d+):(\d+) DAR", first_line)
        if sar and int(sar.group(2)) and int(sar.group(1)):
            pixel_aspect = int(sar.group(1)) / int(sar.group(2))
            if abs(pixel_aspect - 1) > 0.01:  # real anamorphic video; tiny deviations are scaler rounding
                width = max(1, round(width * pixel_aspect))
        fps = re.search(r"([\d.]+)(k?) fps", first_line)
        rotation = re.search(r"rotation of (-?[\d.]+) degrees", block)
        degrees = int(round(-float(rotation.group(1)) / 90) * 90) % 360 if rotation else 0
        return {"codec": match.group(1), "size": (width, height), "rotation": degrees,
                "fps": float(fps.group(1)) * (1000 if fps.group(2) else 1) if fps else 25.0}
    return None


def _packet_timing(listing: str, header_fps: float) -> tuple[int, Fraction, bool]:
    """(frame count, frame rate, variable?) from a framecrc listing of the video stream's packets.

    Constant rate: the exact fraction 1 / (pts step * time base). Variable rate: frames / duration.
    Either is snapped to a standard rate (30000/1001, 25, ...) when within 0.01 % (or within the
    rounding of the timestamps)."""
    time_base = re.search(r"#tb 0: (\d+)/(\d+)", listing)
    stamps: list[tuple[int, int]] = []  # (pts, duration)
    for line in listing.splitlines():
        if line.startswith("#"):
            continue
        fields = [field.strip() for field in line.split(",")]
        if len(fields) < 6:
            continue
        flags = int(fields[6].split("=")[1], 16) if len(fields) > 6 and fields[6].startswith("F=") else 1
        if flags & 0x4:  # AV_PKT_FLAG_DISCARD: outside the edit list, never shown
            continue
        stamps.append((int(fields[2]), int(fields[3])))
    count = len(stamps)
    fallback = Fraction(header_fps).limit_denominator(1001) if header_fps > 0 else Fraction(25)
    if count == 0 or not time_base or any(pts < -(2**62) for pts, _ in stamps):
        return count, _snap(fallback), False
    tick = Fraction(int(time_base.group(1)), int(time_base.group(2)))
    points = sorted(pts for pts, _ in stamps)
    steps = np.diff(points) if count > 1 else np.array([stamps[0][1]])
    if count == 1 or len(steps) == 0 or steps.min() <= 0:
        step = stamps[0][1] if stamps[0][1] > 0 else 0
        return count, _snap(1 / (step * tick)) if step else _snap(fallback), False
    regular = int(steps.max()) - int(steps.min()) <= max(1, int(steps.min()) // 100)
    if regular:
        span = Fraction(int(points[-1] - points[0])) * tick
        rate = Fraction(len(steps)) / span
        # timestamps rounded to whole ticks (1 ms in Matroska) blur the rate by up to 2 ticks per span
        return count, _snap(rate, tolerance=rate * 2 * tick / span, hint=header_fps), False
    last_duration = max(dur for pts, dur in stamps if pts == points[-1]) or int(np.median(steps))
    span = Fraction(int(points[-1] - points[0] + last_duration)) * tick
    return count, _snap(Fraction(count) / span), True


def _snap(rate: Fraction, *, tolerance: Fraction | None = None, hint: float | None = None) -> Fraction:
    """The standard rate within `tolerance` (default 0.01 %) of `rate`: the one ffmpeg's own rounded
    estimate `hint` names (29.97 -> 30000/1001) if any, else the nearest; or `rate` itself, tidied."""
    tolerance = max(tolerance or Fraction(0), rate / 10000)
    candidates = sorted((standard for standard in _STANDARD_RATES if abs(rate - standard) <= tolerance),
                        key=lambda standard: abs(rate - standard))
    hinted = [standard for standard in candidates if hint and abs(float(standard) - hint) < 0.006]
    if hinted or candidates:
        return (hinted or candidates)[0]
    return rate.limit_denominator(1001)


# Geometry and frame selection ----------------------------------------------------------------------

@dataclass(frozen=True)
class Geometry:
    """How source frames map to working frames: aspect-keeping resize, then a centered crop (>0) or
    pad (<0) per side. `working_geometry` only pads (with mirrored content)."""

    source_size: tuple[int, int]  # (width, height) as displayed
    working_size: tuple[int, int]  # (width, height), both multiples of spec.multiple
    scaled_size: tuple[int, int]  # after the aspect-keeping resize, before crop/pad
    crop: tuple[int, int, int, int]  # (left, top, right, bottom): cropped (>0) or padded (<0)


def _round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5))


def working_geometry(source_size: tuple[int, int], spec: ClipSpec) -> Geometry:
    """Short side -> spec.short_side (aspect kept), long side padded up to a multiple of spec.multiple,
    the padding split evenly (left/top get the smaller half)."""
    width, height = (int(side) for side in source_size)
    if width < 1 or height < 1:
        raise ValueError(f"invalid frame size {source_size}")
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise UserError(f"Frames of {width}x{height} are too elongated (aspect ratio above {MAX_ASPECT:g}:1).")
    scale = spec.short_side / min(width, height)
    scaled = (spec.short_side if width <= height else _round_half_up(width * scale),
              spec.short_side if height < width else _round_half_up(height * scale))
    working = tuple(-(-side // spec.multiple) * spec.multiple for side in scaled)
    pad_x, pad_y = working[0] - scaled[0], working[1] - scaled[1]
    crop = (-(pad_x // 2), -(pad_y // 2), -(pad_x - pad_x // 2), -(pad_y - pad_y // 2))
    return Geometry(source_size=(width, height), working_size=working, scaled_size=scaled, crop=crop)


def frame_selection(frame_count: int, spec: ClipSpec, *, name: str = "the video") -> tuple[int, ...]:
    """Source frame numbers chosen by spec.start / spec.frames / spec.stride; empty is a `UserError`."""
    indices = tuple(range(spec.start, frame_count, spec.stride))
    if spec.frames is not None:
        indices = indices[:spec.frames]
    if not indices:
        raise UserError(f"No frames selected: --start {spec.start} is past the end of {name}, which has "
                        f"{frame_count} frame{'s' if frame_count != 1 else ''} (0..{frame_count - 1}).")
    return indices


def _scaled_to_working(frames: np.ndarray, crop: tuple[int, int, int, int]) -> np.ndarray:
    """Apply a Geometry's crop (>0) / mirrored pad (<0) to (..., H, W, 3) frames."""
    left, top, right, bottom = crop
    height, width = frames.shape[-3:-1]
    frames = frames[..., max(top, 0):height - max(bottom, 0), max(left, 0):width - max(right, 0), :]
    pads = [(0, 0)] * (frames.ndim - 3) + [(max(-top, 0), max(-bottom, 0)), (max(-left, 0), max(-right, 0)), (0, 0)]
    return np.pad(frames, pads, mode="reflect") if any(any(p) for p in pads) else frames


def _working_to_scaled(frames: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Undo the crop/pad: back to the scaled size (a crop is undone by mirroring the edge back)."""
    return _scaled_to_working(frames, tuple(-side for side in geometry.crop))


def to_source_resolution(frames: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Working-size frames (m, H, W, 3) or one frame (H, W, 3) -> source size: undo the crop/pad, then
    resize (cv2.INTER_AREA when shrinking, INTER_CUBIC when enlarging). Holds all frames at source size
    in memory; `write_video(..., geometry=...)` does the resize inside ffmpeg instead."""
    import cv2

    working_width, working_height = geometry.working_size
    if frames.shape[-3:-1] != (working_height, working_width):
        raise ValueError(f"frames are {frames.shape[-2]}x{frames.shape[-3]}, geometry expects "
                         f"{working_width}x{working_height}")
    scaled = _working_to_scaled(frames, geometry)
    width, height = geometry.source_size
    if geometry.scaled_size == geometry.source_size:
        return np.ascontiguousarray(scaled)
    shrinking = width <= geometry.scaled_size[0] and height <= geometry.scaled_size[1]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC
    single = scaled.ndim == 3
    stack = scaled[None] if single else scaled
    resized = np.stack([cv2.resize(np.ascontiguousarray(frame), (width, height), interpolation=interpolation)
                        for frame in stack])
    return resized[0] if single else resized


def _scale_flags(source: tuple[int, int], target: tuple[int, int]) -> str:
    """Area averaging to shrink, bicubic to enlarge. At unchanged size swscale then takes its direct
    yuv420p -> rgb24 path (chroma repeated per 2x2 block), which the area-averaged RGB -> yuv420p of
    `write_video` undoes exactly: decode -> encode -> decode keeps unedited pixels (measured in
    tests/test_video.py). Adding accurate_rnd / full_chroma_int here costs ~7 dB on that round trip."""
    shrinking = target[0] <= source[0] and target[1] <= source[1] and target != source
    return "area" if shrinking else "bicubic"


# Reading -----------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Clip:
    """Selected frames of a video at working size, with everything needed to write the result back."""

    info: VideoInfo
    spec: ClipSpec
    geometry: Geometry
    frame_indices: tuple[int, ...]  # source frame numbers used
    frames: np.ndarray  # (m, H, W, 3) uint8 RGB at working size

    @property
    def fps(self) -> float:
        return self.info.fps / self.spec.stride


def displayed_rgb(video, info: VideoInfo):
    """A decoded stream as the full displayed frames in RGB: resized to the displayed size when the
    stored pixels are not square (a pass-through otherwise), then converted. The region cut of
    `read_clip` and the full-resolution frames of `video.stream` both go through here, so the two
    agree pixel for pixel."""
    return video.filter("scale", info.width, info.height, flags="bicubic").filter("format", "rgb24")


def check_region(region: tuple[int, int, int, int] | None, frame_size: tuple[int, int]):
    """`region` (x, y, width, height) if it lies inside the displayed frame; a `UserError` if not."""
    if region is None:
        return None
    x, y, width, height = region
    if x + width > frame_size[0] or y + height > frame_size[1]:
        raise UserError(f"The region {x},{y},{width},{height} (x,y,width,height) reaches past the "
                        f"{frame_size[0]}x{frame_size[1]} frame.")
    return (x, y, width, height)


def read_clip(path, spec: ClipSpec, progress: Progress = None) -> Clip:
    """Decode the frames `spec` selects, at working size, into memory (and nothing else).

    ffmpeg selects (`trim` + `select` on frame numbers, stopping after the last one) and scales, so a
    long or 8K video costs only the selected frames at working size in memory. With `spec.region` the
    working frames show only that box of the displayed frame, and `geometry` maps the box (not the
    whole frame) to the working size."""
    path = Path(path)
    info = probe(path)
    indices = frame_selection(info.frame_count, spec, name=path.name)
    region = check_region(spec.region, (info.width, info.height))
    geometry = working_geometry((region[2], region[3]) if region else (info.width, info.height), spec)
    scaled_width, scaled_height = geometry.scaled_size
    video = ffmpeg.input(str(path))["V:0"].filter("trim", start_frame=indices[0], end_frame=indices[-1] + 1)
    if spec.stride > 1:
        video = video.filter("select", f"not(mod(n,{spec.stride}))")
    if region:  # cut the region out of the displayed RGB frame (exact, unlike a crop of subsampled chroma)
        video = displayed_rgb(video, info).filter("crop", region[2], region[3], region[0], region[1], exact=1)
    video = video.filter("scale", scaled_width, scaled_height,
                         flags=_scale_flags(geometry.source_size, geometry.scaled_size))
    video = video.filter("format", "rgb24")
    graph = video.output("pipe:", format="rawvideo", pix_fmt="rgb24", fps_mode="passthrough",
                         **{"frames:v": len(indices)})
    working_width, working_height = geometry.working_size
    frames = np.empty((len(indices), working_height, working_width, 3), dtype=np.uint8)
    frame_bytes = scaled_width * scaled_height * 3
    buffer = bytearray(frame_bytes)
    received = 0
    with _FFmpeg(_command(graph), f"decode {path.name}", stdout=True) as process:
        for received in range(len(indices) + 1):
            if received == len(indices) or not _read_exactly(process.stdout, buffer):
                break
            scaled = np.frombuffer(buffer, dtype=np.uint8).reshape(scaled_height, scaled_width, 3)
            frames[received] = _scaled_to_working(scaled, geometry.crop)
            if progress:
                progress(received + 1, len(indices))
    if received == 0:
        raise UserError(f"ffmpeg decoded no frames from {path}; the file may be damaged.")
    if received < len(indices):  # the container promised more frames than the decoder gave
        frames, indices = frames[:received], indices[:received]
    return Clip(info=info, spec=spec, geometry=geometry, frame_indices=indices, frames=frames)


def _read_exactly(pipe, buffer: bytearray) -> bool:
    view, filled = memoryview(buffer), 0
    while filled < len(buffer):
        count = pipe.readinto(view[filled:])
        if not count:
            return False
        filled += count
    return True


# Writing -----------------------------------------------------------------------------------------

def _same_file(first: Path, second: Path) -> bool:
    try:
        if first.exists() and second.exists():
            return os.path.samefile(first, second)
    except OSError:
        pass
    return first.resolve() == second.resolve()


def _check_output(out_path: Path, inputs: Sequence[Path]) -> None:
    for source in inputs:
        if _same_file(out_path, Path(source)):
            raise UserError(f"The output {out_path} is the input {source}; choose another output path.")
    if out_path.is_dir():
        raise UserError(f"The output {out_path} is a folder; give a file name such as {out_path / 'out.mp4'}.")
    if out_path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise UserError(f"The output {out_path} must end in .mp4 (the video is written as H.264 MP4).")
    parent = out_path.parent
    if not parent.exists():
        raise UserError(f"The output folder {parent} does not exist.")
    if not parent.is_dir():
        raise UserError(f"The output folder {parent} is not a folder.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"The output folder {parent} is not writable.")


@contextlib.contextmanager
def _atomic_output(out_path: Path) -> Iterator[Path]:
    """A temp file beside `out_path`, renamed over it when the block succeeds, removed when it fails."""
    try:
        handle, name = tempfile.mkstemp(prefix=f".{out_path.stem}.", suffix=".partial" + out_path.suffix,
                                        dir=out_path.parent)
    except OSError as err:
        raise UserError(f"Cannot write in {out_path.parent}: {err.strerror}.") from None
    os.close(handle)
    temp = Path(name)
    try:
        yield temp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)
        os.replace(temp, out_path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _rate(fps: float | str | Fraction) -> Fraction:
    rate = Fraction(fps) if isinstance(fps, str | Fraction) else Fraction(float(fps)).limit_denominator(10000)
    if rate <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    return _snap(rate) if isinstance(fps, float | int) else rate


@dataclass(frozen=True)
class FrameStream:
    """`count` uint8 RGB frames (H, W, 3) of `size` (width, height), made one at a time by `frames`, so
    that a long source-resolution output never sits in memory whole."""

    frames: Iterable[np.ndarray]
    count: int
    size: tuple[int, int]


def write_video(frames: np.ndarray | FrameStream, out_path, fps: float | str, *, geometry: Geometry | None = None,
                audio_from: Path | None = None, audio_start: float = 0.0, audio_duration: float | None = None,
                input_paths: Sequence[Path] = (), progress: Progress = None, crf: int = 17,
                preset: str = "medium", lossless: bool = False) -> Path:
    """Write RGB frames (m, H, W, 3) as H.264 yuv420p MP4 (`+faststart`, BT.709) at `fps` (a float, or
    an exact fraction string such as "30000/1001"); returns `out_path`.

    * `frames` may be a `FrameStream`: written at its own size as the frames come (no `geometry`).
    * `lossless`: RGB H.264 at quantizer 0 (libx264rgb, still .mp4): decodes to exactly the frames
      given, at any size (no even padding); files are large and not every player shows them.
    * `geometry`: frames are at its working size; the pad/crop is undone here and ffmpeg resizes to
      the source size (so an 8K output never sits in memory at full size).
    * yuv420p needs even sizes: an odd width or height (641x359) is padded by 1 px on the right/bottom
      by repeating the last column/row, so the output is 642x360 with every source pixel in place.
    * `audio_from`: its first audio stream, from `audio_start` for `audio_duration` seconds (default:
      the video's length, never longer), is encoded as AAC. No audio there, no audio here.
    * Atomic: written to a temp file in the destination folder and renamed at the end; on any failure
      (or Ctrl-C) nothing is left behind. Refuses to write over any of `input_paths` or `audio_from`,
      into a missing or unwritable folder. An existing non-input `out_path` is replaced.
    """
    stream = frames if isinstance(frames, FrameStream) else None
    if stream is None:
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
            raise ValueError(f"expected uint8 frames (m, H, W, 3) with m >= 1, got {frames.dtype} {frames.shape}")
    elif stream.count < 1 or geometry is not None:
        raise ValueError("a FrameStream needs count >= 1 and is written at its own size (no geometry)")
    count = stream.count if stream else len(frames)
    out_path = Path(out_path)
    inputs = [Path(p) for p in input_paths] + ([Path(audio_from)] if audio_from is not None else [])
    _check_output(out_path, inputs)
    rate = _rate(fps)
    if stream is not None:
        target = piped_size = stream.size
        frames = _checked_frames(stream)
    elif geometry is not None:
        working_width, working_height = geometry.working_size
        if frames.shape[1:3] != (working_height, working_width):
            raise ValueError(f"frames are {frames.shape[2]}x{frames.shape[1]}, geometry expects "
                             f"{working_width}x{working_height}")
        frames = _working_to_scaled(frames, geometry)  # (m, scaled H, scaled W, 3), a view
        target = geometry.source_size
        piped_size = geometry.scaled_size
    else:
        target = piped_size = (frames.shape[2], frames.shape[1])
    even = (target[0] + target[0] % 2, target[1] + target[1] % 2) if not lossless else target
    video = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{piped_size[0]}x{piped_size[1]}",
                         framerate=f"{rate.numerator}/{rate.denominator}").video
    if piped_size != target:
        video = video.filter("scale", target[0], target[1], flags=_scale_flags(piped_size, target))
    if even != target:
        video = (video.filter("format", "gbrp").filter("pad", even[0], even[1], 0, 0)
                 .filter("fillborders", right=even[0] - target[0], bottom=even[1] - target[1], mode="smear"))
    if lossless:
        video = video.filter("format", "rgb24").filter("setsar", 1)
    else:
        video = (video.filter("scale", out_color_matrix="bt709", out_range="tv", flags="area+accurate_rnd")
                 .filter("format", "yuv420p").filter("setsar", 1))
    streams = [video]
    video_seconds = float(count / rate)
    if audio_from is not None:
        source = probe(audio_from)
        seconds = min(video_seconds, audio_duration if audio_duration is not None else video_seconds)
        if source.has_audio and audio_start < source.duration and seconds > 0:
            streams.append(ffmpeg.input(str(audio_from), ss=f"{audio_start:.6f}", t=f"{seconds:.6f}")["a:0"])
    options = dict(format="mp4", vcodec="libx264", pix_fmt="yuv420p", crf=crf, preset=preset,
                   movflags="+faststart", colorspace="bt709", color_primaries="bt709", color_trc="bt709")
    if lossless:
        options.update(vcodec="libx264rgb", pix_fmt="rgb24", qp=0, colorspace="rgb")
        del options["crf"]
    if len(streams) > 1:
        options.update(acodec="aac", audio_bitrate="192k")
    with _atomic_output(out_path) as temp:
        graph = ffmpeg.output(*streams, str(temp), **options)
        with _FFmpeg(_command(graph), f"write {out_path.name}", stdin=True) as process:
            for done, frame in enumerate(frames, start=1):
                process.stdin.write(np.ascontiguousarray(frame).data)
                if progress:
                    progress(done, count)
    return out_path


def _checked_frames(stream: FrameStream) -> Iterator[np.ndarray]:
    """The frames of `stream`, each checked against its declared size; exactly `count` of them."""
    width, height = stream.size
    done = 0
    for frame in stream.frames:
        if frame.dtype != np.uint8 or frame.shape != (height, width, 3):
            raise ValueError(f"stream frame {done} is {frame.dtype} {frame.shape}, expected uint8 {(height, width, 3)}")
        done += 1
        if done > stream.count:
            raise ValueError(f"the stream holds more than the {stream.count} frames it declared")
        yield frame
    if done != stream.count:
        raise ValueError(f"the stream ended after {done} of the {stream.count} frames it declared")


# Test material -----------------------------------------------------------------------------------

def make_test_clip(path, *, width: int = 96, height: int = 64, frames: int = 8, fps: float = 24,
                   audio: bool = False, pattern: str = "testsrc2", rotation: int = 0, vfr: bool = False,
                   codec: str = "libx264") -> Path:
    """A synthetic clip from an ffmpeg lavfi source (`testsrc2` changes every frame).

    `width` x `height` is the *stored* size: with `rotation` 90 or 270 (clockwise, written as a display
    matrix like a phone does) it displays as `height` x `width`. Odd sizes are stored as yuv444p (H.264
    yuv420p cannot hold them). `vfr` spaces frames unevenly (1.5 and 0.5 frame periods alternating),
    the average rate staying `fps`. `audio` adds a 440 Hz sine as long as the video."""
    path = Path(path)
    if rotation % 90:
        raise ValueError("rotation must be a multiple of 90")
    source_width, source_height = width + width % 2, height + height % 2
    rate = _rate(fps)
    options = f"size={source_width}x{source_height}:rate={rate.numerator}/{rate.denominator}"
    source = f"{pattern}:{options}" if "=" in pattern else f"{pattern}={options}"
    video = ffmpeg.input(source, f="lavfi").video
    if (source_width, source_height) != (width, height):  # lavfi sources only make even sizes
        video = video.filter("format", "yuv444p").filter("crop", width, height, 0, 0)
    output_options: dict = {"frames:v": frames, "vcodec": codec}
    if vfr:
        video = video.filter("settb", "1/1000").filter("setpts", "(N+0.5*mod(N,2))/(FR*TB)")
        output_options.update(fps_mode="vfr", enc_time_base="filter")
    odd = width % 2 or height % 2
    output_options["pix_fmt"] = "yuv444p" if odd and codec == "libx264" else "yuv420p"
    if codec == "libx264":
        output_options.update(preset="veryfast", crf=18)
    streams = [video]
    if audio:
        duration = frames / fps
        streams.append(ffmpeg.input(f"sine=frequency=440:sample_rate=44100:duration={duration:.6f}", f="lavfi").audio)
        output_options.update(acodec="libopus" if path.suffix.lower() == ".webm" else "aac")
    with _atomic_output(path) as temp:
        encoded = temp if rotation % 360 == 0 else temp.with_name(temp.name + ".norot" + path.suffix)
        try:
            _run(_command(ffmpeg.output(*streams, str(encoded), format=_muxer(path), **output_options)),
                 f"make the test clip {path.name}")
            if encoded != temp:  # the display matrix (counter-clockwise degrees) is set on a stream copy
                rotated = ffmpeg.input(str(encoded), display_rotation=-(rotation % 360)).output(
                    str(temp), c="copy", format=_muxer(path))
                _run(_command(rotated), f"make the test clip {path.name}")
        finally:
            if encoded != temp:
                encoded.unlink(missing_ok=True)
    return path


def _muxer(path: Path) -> str:
    return {".mkv": "matroska", ".webm": "webm", ".mov": "mov", ".avi": "avi"}.get(path.suffix.lower(), "mp4")
