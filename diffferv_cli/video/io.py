"""Video in and out: decoding, encoding and output checks. The only module that runs the ffmpeg binary.

The binary comes from `imageio-ffmpeg`; command lines are built with ffmpeg-python, and every run goes
through `_run` or `_FFmpeg`, which turn a failure into a `UserError` carrying ffmpeg's own reason.
Probing is PyAV's (`probe.py`); decoding and encoding stay command lines because one ffmpeg graph
selects, scales and converts in its own process (so an 8K frame is never held in Python memory), and
encoding muxes the source's audio in the same pass. Every file name reaches ffmpeg as a `file:` URL
(`probe.file_url`), so no other protocol applies to it.

Conventions, fixed here for the whole project:

* **Frames** are uint8 RGB arrays `(m, H, W, 3)`, upright (ffmpeg's autorotate applies the display
  matrix while decoding), so width and height are always *as displayed*.
* **Frame numbers** count decoded frames from 0 in display order.
* **Variable frame rate**: every decoded frame is kept exactly once (`-fps_mode passthrough`: no frame
  is duplicated or dropped) and the clip is treated as constant frame rate at the *average* rate
  (frames / duration). Output is written at that constant rate: total duration is kept, local timing
  is evened out.
* **Working size**: see `geometry.working_geometry`. Scaling happens inside ffmpeg.
* **Output** (`write_video`): H.264 yuv420p MP4 with `+faststart`, BT.709 tagged, upright pixels and no
  rotation metadata (it displays like the source), atomic (temp file + rename), never over an input.
  An output made from a frame selection records it in its metadata (`probe.selection_tag`).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import ffmpeg
import numpy as np

from diffferv_cli.config import ClipSpec
from diffferv_cli.errors import UserError
from diffferv_cli.video.geometry import (
    Geometry,
    SourceFrames,
    check_region,
    frame_selection,
    scaled_to_working,
    working_geometry,
    working_to_scaled,
)
from diffferv_cli.video.probe import SELECTION_TAG, VideoInfo, as_rate, file_url, probe, selection_tag

Progress = Callable[[int, int], None] | None

OUTPUT_SUFFIXES = (".mp4", ".m4v", ".mov")


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


def run_ffmpeg(graph, what: str) -> None:
    """Run an ffmpeg-python graph to completion (names in it should be `file_url`s); a failure is a
    `UserError` saying ffmpeg could not `what`, with ffmpeg's reason."""
    _run(_command(graph), what)


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


# Scaling ------------------------------------------------------------------------------------------

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
    frames: WorkingFrames | np.ndarray  # (m, H, W, 3) uint8 RGB at working size; from `read_clip`, streamed

    @property
    def fps(self) -> float:
        return self.info.fps / self.spec.stride


class WorkingFrames:
    """The selected frames of a clip at working size, (m, H, W, 3) uint8 RGB, decoded from the source by
    ffmpeg on each pass over them and never held whole: a long clip costs a few frames of memory, not
    m of them (a 20,000-frame clip at 512x912 would be 28 GB). Passes run in order (`chunks`, iteration,
    a slice: one ffmpeg each); `np.asarray(frames)` decodes them all, for short clips and tests.

    `sha256` is `cache.frames_sha256` of the frames, computed by `read_clip`'s first pass."""

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, path: Path, info: VideoInfo, spec: ClipSpec, geometry: Geometry, indices: tuple[int, ...],
                 sha256: str | None = None):
        self.path, self.info, self.spec, self.geometry, self.indices = path, info, spec, geometry, tuple(indices)
        self.sha256 = sha256

    @property
    def shape(self) -> tuple[int, int, int, int]:
        width, height = self.geometry.working_size
        return len(self.indices), height, width, 3

    def __len__(self) -> int:
        return len(self.indices)

    def chunks(self, size: int = 32, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(first frame number, frames (k, H, W, 3)) of frames `start` .. `stop`, `size` at a time, in one pass."""
        stop = len(self) if stop is None else min(stop, len(self))
        batch, first = [], start
        for number, frame in enumerate(_decode_working(self.path, self.info, self.geometry, self.spec,
                                                       self.indices[start:stop]), start):
            batch.append(frame)
            if len(batch) == size:
                yield first, np.stack(batch)
                batch, first = [], number + 1
        if batch:
            yield first, np.stack(batch)

    def __iter__(self) -> Iterator[np.ndarray]:
        return _decode_working(self.path, self.info, self.geometry, self.spec, self.indices)

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            index = range(len(self))[key]
            return next(_decode_working(self.path, self.info, self.geometry, self.spec, self.indices[index:index + 1]))
        if isinstance(key, slice) and key.step in (None, 1):
            start, stop, _ = key.indices(len(self))
            if stop <= start:
                return np.empty((0, *self.shape[1:]), dtype=np.uint8)
            return np.stack(list(_decode_working(self.path, self.info, self.geometry, self.spec,
                                                 self.indices[start:stop])))
        return np.asarray(self)[key]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        frames = np.stack(list(self)) if len(self) else np.empty(self.shape, dtype=np.uint8)
        return frames if dtype is None else frames.astype(dtype)

    def copy(self) -> np.ndarray:
        return np.asarray(self)

    def astype(self, dtype) -> np.ndarray:
        return np.asarray(self).astype(dtype)


def frame_chunks(frames, size: int = 32, start: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """`WorkingFrames.chunks` for working frames streamed or in memory: (first frame number, (k, H, W, 3))."""
    if isinstance(frames, WorkingFrames):
        yield from frames.chunks(size, start)
        return
    for first in range(start, len(frames), size):
        yield first, np.asarray(frames[first:first + size])


def displayed_rgb(video, info: VideoInfo):
    """A decoded stream as the full displayed frames in RGB: resized to the displayed size when the
    stored pixels are not square (a pass-through otherwise), then converted. The region cut of
    `read_clip` and the full-resolution frames of `video.stream` both go through here, so the two
    agree pixel for pixel."""
    return video.filter("scale", info.width, info.height, flags="bicubic").filter("format", "rgb24")


def _decode_working(path: Path, info: VideoInfo, geometry: Geometry, spec: ClipSpec,
                    indices: Sequence[int]) -> Iterator[np.ndarray]:
    """The frames `indices` (evenly spaced) of `path` at working size, one fresh array at a time, as one
    ffmpeg run selects (`trim` + `select` on frame numbers, stopping after the last one) and scales them.
    With `spec.region` the working frames show only that box of the displayed frame. Stops early when the
    decoder gives fewer frames (the caller counts)."""
    if not indices:
        return
    region = spec.region
    scaled_width, scaled_height = geometry.scaled_size
    video = _selected(ffmpeg.input(file_url(path))["V:0"], indices)
    if region:  # cut the region out of the displayed RGB frame (exact, unlike a crop of subsampled chroma)
        video = displayed_rgb(video, info).filter("crop", region[2], region[3], region[0], region[1], exact=1)
    video = video.filter("scale", scaled_width, scaled_height,
                         flags=_scale_flags(geometry.source_size, geometry.scaled_size))
    video = video.filter("format", "rgb24")
    graph = video.output("pipe:", format="rawvideo", pix_fmt="rgb24", fps_mode="passthrough",
                         **{"frames:v": len(indices)})
    with _FFmpeg(_command(graph), f"decode {path.name}", stdout=True) as process:
        for _ in range(len(indices)):
            buffer = bytearray(scaled_width * scaled_height * 3)  # a fresh one: the frame handed out keeps it
            if not _read_exactly(process.stdout, buffer):
                break
            scaled = np.frombuffer(buffer, dtype=np.uint8).reshape(scaled_height, scaled_width, 3)
            yield np.ascontiguousarray(scaled_to_working(scaled, geometry.crop))


def read_clip(path, spec: ClipSpec, progress: Progress = None) -> Clip:
    """The frames `spec` selects, at working size, as `WorkingFrames`: one pass decodes them to count
    them and hash them (`cache.frames_sha256`), and each later pass decodes them again, so that a long
    or 8K video costs a few frames at working size in memory, never the clip.

    With `spec.region` the working frames show only that box of the displayed frame, and `geometry` maps
    the box (not the whole frame) to the working size."""
    from diffferv_cli.editing.cache import FramesDigest

    path = Path(path)
    info = probe(path)
    indices = frame_selection(info.frame_count, spec, name=path.name)
    region = check_region(spec.region, (info.width, info.height))
    geometry = working_geometry((region[2], region[3]) if region else (info.width, info.height), spec)
    width, height = geometry.working_size
    digest = FramesDigest((len(indices), height, width, 3))
    received = 0
    for received, frame in enumerate(_decode_working(path, info, geometry, spec, indices), 1):
        digest.update(frame)
        if progress:
            progress(received, len(indices))
    if received == 0:
        raise UserError(f"ffmpeg decoded no frames from {path}; the file may be damaged.")
    frames = WorkingFrames(path, info, spec, geometry, indices)
    if received < len(indices):  # the container promised more frames than the decoder gave
        indices = indices[:received]
        frames = WorkingFrames(path, info, spec, geometry, indices)
        digest = FramesDigest(frames.shape)
        for frame in frames:  # hashed again with the true count in the header
            digest.update(frame)
    frames.sha256 = digest.hexdigest()
    return Clip(info=info, spec=spec, geometry=geometry, frame_indices=indices, frames=frames)


def _selected(video, indices: Sequence[int]):
    """Keep the frames numbered `indices` (evenly spaced) of a decoded video stream: `trim` stops
    decoding after the last one, `select` keeps every stride-th frame in between."""
    selection = SourceFrames.of(tuple(indices))
    video = video.filter("trim", start_frame=selection.start, end_frame=indices[-1] + 1)
    if selection.stride > 1:
        video = video.filter("select", f"not(mod(n,{selection.stride}))")
    return video


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
                preset: str = "medium", lossless: bool = False, source_frames: SourceFrames | None = None,
                settings: dict | None = None) -> Path:
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
    * `source_frames`: the frames of the source these are, recorded in the file's metadata
      (`probe(out_path).source_frames` reads it back).
    * `settings`: what made these frames (JSON values), recorded in the `description` tag
      (`video.metadata.read_settings(out_path)` reads it back).
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
    rate = as_rate(fps)
    if stream is not None:
        target = piped_size = stream.size
        frames = _checked_frames(stream)
    elif geometry is not None:
        working_width, working_height = geometry.working_size
        if frames.shape[1:3] != (working_height, working_width):
            raise ValueError(f"frames are {frames.shape[2]}x{frames.shape[1]}, geometry expects "
                             f"{working_width}x{working_height}")
        frames = working_to_scaled(frames, geometry)  # (m, scaled H, scaled W, 3), a view
        target = geometry.source_size
        piped_size = geometry.scaled_size
    else:
        target = piped_size = (frames.shape[2], frames.shape[1])
    video = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{piped_size[0]}x{piped_size[1]}",
                         framerate=f"{rate.numerator}/{rate.denominator}").video
    if piped_size != target:
        video = video.filter("scale", target[0], target[1], flags=_scale_flags(piped_size, target))
    if lossless:  # any size: no even padding
        streams = [video.filter("format", "rgb24").filter("setsar", 1)]
    else:
        streams = [_to_yuv420p(video, target)]
    video_seconds = float(count / rate)
    if audio_from is not None:
        source = probe(audio_from)
        seconds = min(video_seconds, audio_duration if audio_duration is not None else video_seconds)
        if source.has_audio and audio_start < source.duration and seconds > 0:
            streams.append(ffmpeg.input(file_url(audio_from), ss=f"{audio_start:.6f}", t=f"{seconds:.6f}")["a:0"])
    options = _h264_options(crf, preset)
    if lossless:
        options.update(vcodec="libx264rgb", pix_fmt="rgb24", qp=0, colorspace="rgb")
        del options["crf"]
    if len(streams) > 1:
        options.update(acodec="aac", audio_bitrate="192k")
    if source_frames is not None:
        options["metadata"] = f"{SELECTION_TAG}={selection_tag(source_frames)}"
    if settings is not None:  # a second tag: ffmpeg-python takes one value per option, `-metadata:g` is global too
        from diffferv_cli.video.metadata import SETTINGS_TAG, settings_tag

        options["metadata:g"] = f"{SETTINGS_TAG}={settings_tag(settings)}"
    with _atomic_output(out_path) as temp:
        graph = ffmpeg.output(*streams, file_url(temp), **options)
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


def _to_yuv420p(video, size: tuple[int, int]):
    """RGB frames of `size` -> BT.709 yuv420p. yuv420p needs even sides: an odd width or height gets
    one more column/row on the right/bottom repeating the last one, so every pixel stays in place."""
    even = (size[0] + size[0] % 2, size[1] + size[1] % 2)
    if even != size:
        video = (video.filter("format", "gbrp").filter("pad", even[0], even[1], 0, 0)
                 .filter("fillborders", right=even[0] - size[0], bottom=even[1] - size[1], mode="smear"))
    return (video.filter("scale", out_color_matrix="bt709", out_range="tv", flags="area+accurate_rnd")
            .filter("format", "yuv420p").filter("setsar", 1))


def _h264_options(crf: int, preset: str) -> dict:
    return dict(format="mp4", vcodec="libx264", pix_fmt="yuv420p", crf=crf, preset=preset,
                movflags="+faststart", colorspace="bt709", color_primaries="bt709", color_trc="bt709")


def write_side_by_side(clip: Clip, edited, out_path, *, input_paths: Sequence[Path] = (),
                       progress: Progress = None, crf: int = 17, preset: str = "medium") -> Path:
    """Original | edited, side by side at the edited video's size (twice its width); returns `out_path`.

    The left half is the frames `clip` selected, decoded again from its source at the size it is
    displayed at; the right half is the file `edited` (what `write_video` made of the edit), without
    the column or row an odd size added. Both run through one ffmpeg graph, frame by frame (no frame is
    held in memory), renumbered to `edited`'s constant rate so that they pair up even when the source
    has a variable rate. The audio is `edited`'s. Written like `write_video`: atomic, never over an
    input (`clip`'s source, `edited`, `input_paths`)."""
    out_path, edited = Path(out_path), Path(edited)
    _check_output(out_path, [clip.info.path, edited, *map(Path, input_paths)])
    result = probe(edited)
    rate = as_rate(result.fps_fraction)
    width, height = clip.info.width, clip.info.height
    count = len(clip.frame_indices)
    constant_rate = dict(settb=f"{rate.denominator}/{rate.numerator}", setpts="N")

    def upright(video, size: tuple[int, int]):
        video = video.filter("format", "rgb24")  # before cropping: yuv420p cannot be cropped to odd sizes
        if size == (width + width % 2, height + height % 2) and size != (width, height):
            video = video.filter("crop", width, height, 0, 0)  # the column/row write_video added
        elif size != (width, height):
            video = video.filter("scale", width, height, flags="bicubic")
        video = video.filter("setsar", 1)
        for name, value in constant_rate.items():
            video = video.filter(name, value)
        return video

    source = ffmpeg.input(file_url(clip.info.path))
    original = _selected(source["V:0"], clip.frame_indices).filter("scale", width, height, flags="bicubic")
    edited_input = ffmpeg.input(file_url(edited))
    pair = ffmpeg.filter([upright(original, (width, height)), upright(edited_input["V:0"], (result.width, result.height))],
                         "hstack", inputs=2)
    streams = [_to_yuv420p(pair, (2 * width, height))]
    options = _h264_options(crf, preset) | {"r": f"{rate.numerator}/{rate.denominator}", "frames:v": count}
    if result.has_audio:
        streams.append(edited_input["a:0"])
        options["acodec"] = "copy"
    if progress:
        progress(0, count)
    with _atomic_output(out_path) as temp:
        _run(_command(ffmpeg.output(*streams, file_url(temp), **options)), f"write {out_path.name}")
    if progress:
        progress(count, count)
    return out_path
