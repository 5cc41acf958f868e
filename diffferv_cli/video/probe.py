"""What a video file holds, read with PyAV (FFmpeg's libraries, bundled in the `av` wheel).

One pass over the video stream's packets (no decoding, except the first frame) gives:

* the exact **frame count** (packet by packet, not the container's claim; packets that an edit list
  discards are not frames);
* the exact **frame rate** as a fraction: constant rate = 1 / (pts step x time base), snapped to a
  standard rate (30000/1001, 25, ...) when within 0.01 % or within the timestamps' rounding (Matroska
  keeps 1 ms); variable rate = frames / duration (`VideoInfo.variable_fps`);
* the **display rotation**: the display matrix FFmpeg attaches to the first decoded frame;
* the **displayed size**: rotation applied, non-square pixels (SAR) turned into width;
* the **frame selection** a diffferv output carries in its metadata (`SourceFrames`, see
  `selection_tag`), so `eval` can align it with its source.

Every input name reaches FFmpeg as a `file:` URL of its absolute path (`file_url`): FFmpeg reads names
as URLs, so a file named `concat:a.mp4|b.mp4` would otherwise be read as two other files and one named
`file:x.mp4` could not be opened.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from diffferv_cli.errors import UserError
from diffferv_cli.video.geometry import SourceFrames

STANDARD_RATES = tuple(Fraction(r) for r in ("24000/1001", "24", "25", "30000/1001", "30", "48", "50",
                                             "60000/1001", "60", "90", "100", "120000/1001", "120", "240"))
SELECTION_TAG = "comment"  # the MP4 metadata key `write_video(source_frames=...)` fills
_SELECTION = re.compile(r"^diffferv source frames: start=(\d+) stride=(\d+) count=(\d+)(?: of (\d+))?$")


def file_url(path) -> str:
    """The name to give FFmpeg (command line or PyAV) for a local file, input or output: `file:` and
    the absolute path, so that no other protocol (concat:, http:, pipe:, `-`) can apply."""
    return "file:" + os.path.abspath(os.fspath(path))


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
    source_frames: SourceFrames | None = None  # the frame selection a diffferv output was made from


def selection_tag(frames: SourceFrames) -> str:
    """The metadata text that records `frames` in an output file (read back by `probe`)."""
    text = f"diffferv source frames: start={frames.start} stride={frames.stride} count={frames.count}"
    return text + (f" of {frames.source_count}" if frames.source_count is not None else "")


def parse_selection_tag(text: str | None) -> SourceFrames | None:
    match = _SELECTION.match((text or "").strip())
    if not match:
        return None
    start, stride, count, total = match.groups()
    try:
        return SourceFrames(int(start), int(stride), int(count), int(total) if total else None)
    except ValueError:  # a hand-edited tag with stride 0 or count 0 records nothing usable
        return None


def check_input_file(path: Path) -> None:
    from diffferv_cli.files import input_status

    info = input_status(path, "video")  # missing, a link loop, a folder on the way that may not be searched
    if stat.S_ISDIR(info.st_mode):
        raise UserError(f"{path} is a folder, not a video file.")
    if info.st_size == 0:
        raise UserError(f"{path} is empty (0 bytes), not a video.")
    if not os.access(path, os.R_OK):
        raise UserError(f"{path} is not readable (permission denied).")


def _reason(error: Exception) -> str:
    return (getattr(error, "strerror", None) or str(error)).rstrip(".")


def probe(path) -> VideoInfo:
    """Describe a video (see the module docstring); a file that is not a readable video with at least
    one frame is a `UserError` naming it."""
    import av

    path = Path(path)
    check_input_file(path)
    try:
        container = _open(file_url(path))
    except av.FFmpegError as err:
        raise UserError(f"{path} is not a video ffmpeg can read ({_reason(err)}).") from None
    with container:
        stream = next((s for s in container.streams.video
                       if not s.disposition & av.stream.Disposition.attached_pic), None)
        if stream is None:
            raise UserError(f"{path} has no video stream.")
        stamps, rotation = _read_packets(container, stream, path)
        if not stamps:
            raise UserError(f"{path} has a video stream but no frames in it.")
        header_rate = _fraction(stream.average_rate) or _fraction(stream.guessed_rate)
        count, rate, variable = packet_timing(stamps, _fraction(stream.time_base), header_rate)
        width, height = stream.codec_context.width, stream.codec_context.height
        pixel_aspect = _fraction(stream.sample_aspect_ratio)
        if pixel_aspect and abs(pixel_aspect - 1) > Fraction(1, 100):  # real anamorphic video; tiny
            width = max(1, round(width * pixel_aspect))                  # deviations are scaler rounding
        if rotation in (90, 270):
            width, height = height, width
        return VideoInfo(path=path, width=width, height=height, rotation=rotation, fps=float(rate),
                         fps_fraction=f"{rate.numerator}/{rate.denominator}", frame_count=count,
                         duration=float(count / rate),
                         has_audio=any(s.type == "audio" for s in container.streams),
                         codec=stream.codec_context.name, variable_fps=variable,
                         source_frames=parse_selection_tag(container.metadata.get(SELECTION_TAG)))


def _open(url: str):
    import av

    try:  # PyAV 18 decodes tags strictly unless told; 19 always keeps undecodable bytes and has no option
        return av.open(url, metadata_errors="replace")
    except TypeError:
        return av.open(url)


def _fraction(value) -> Fraction | None:
    """A PyAV rational (a Fraction or None up to PyAV 18; a falsy-when-unset AVRational from 19)."""
    return Fraction(value.numerator, value.denominator) if value and value.denominator else None


def _read_packets(container, stream, path: Path) -> tuple[list[tuple[int | None, int]], int]:
    """((pts, duration) of every shown packet, clockwise display rotation). The first frame is decoded
    for its display matrix; a read error after the first packet ends the stream, as in ffmpeg."""
    import av

    stamps: list[tuple[int | None, int]] = []
    rotation: int | None = None
    try:
        for packet in container.demux(stream):
            if rotation is None:
                rotation = _first_frame_rotation(stream, packet)
            if packet.size == 0:  # the flush packet at the end
                continue
            if packet.is_discard:  # outside the edit list: never shown
                continue
            stamps.append((packet.pts, packet.duration or 0))
    except av.FFmpegError as err:
        if not stamps:
            raise UserError(f"ffmpeg could not read {path.name}: {_reason(err)}.") from None
    return stamps, rotation or 0


def _first_frame_rotation(stream, packet) -> int | None:
    """Clockwise degrees (0/90/180/270) once the decoder has given a frame; None until then. FFmpeg
    reports the display matrix counter-clockwise."""
    import av

    try:
        frames = stream.decode(packet)
    except av.FFmpegError:  # undecodable packet: let the real decode report it; try the next one
        return None
    if not frames:
        return 0 if packet.size == 0 else None  # flushed without a frame: nothing to rotate
    return int(round(-frames[0].rotation / 90) * 90) % 360


def packet_timing(stamps: list[tuple[int | None, int]], time_base: Fraction | None,
                  header_rate: Fraction | None) -> tuple[int, Fraction, bool]:
    """(frame count, frame rate, variable?) from the (pts, duration) of the shown packets.

    Constant rate: the exact fraction 1 / (pts step * time base). Variable rate: frames / duration.
    Either is snapped to a standard rate (30000/1001, 25, ...) when within 0.01 % (or within the
    rounding of the timestamps). Without usable timestamps: the container's average rate."""
    count = len(stamps)
    fallback = Fraction(header_rate).limit_denominator(1001) if header_rate and header_rate > 0 else Fraction(25)
    if count == 0 or not time_base or any(pts is None for pts, _ in stamps):
        return count, snap_rate(fallback), False
    tick = Fraction(time_base)
    points = sorted(pts for pts, _ in stamps)
    steps = [b - a for a, b in zip(points, points[1:], strict=False)]
    if count == 1 or min(steps) <= 0:
        step = stamps[0][1] if stamps[0][1] > 0 else 0
        return count, snap_rate(1 / (step * tick)) if step else snap_rate(fallback), False
    regular = max(steps) - min(steps) <= max(1, min(steps) // 100)
    if regular:
        span = Fraction(points[-1] - points[0]) * tick
        rate = Fraction(len(steps)) / span
        # timestamps rounded to whole ticks (1 ms in Matroska) blur the rate by up to 2 ticks per span
        return count, snap_rate(rate, tolerance=rate * 2 * tick / span, hint=float(fallback)), False
    median_step = sorted(steps)[len(steps) // 2]
    last_duration = max(duration for pts, duration in stamps if pts == points[-1]) or median_step
    span = Fraction(points[-1] - points[0] + last_duration) * tick
    return count, snap_rate(Fraction(count) / span), True


def snap_rate(rate: Fraction, *, tolerance: Fraction | None = None, hint: float | None = None) -> Fraction:
    """The standard rate within `tolerance` (default 0.01 %) of `rate`: the one the container's own
    estimate `hint` names (29.97 -> 30000/1001) if any, else the nearest; or `rate` itself, tidied."""
    tolerance = max(tolerance or Fraction(0), rate / 10000)
    candidates = sorted((standard for standard in STANDARD_RATES if abs(rate - standard) <= tolerance),
                        key=lambda standard: abs(rate - standard))
    hinted = [standard for standard in candidates if hint and abs(float(standard) - hint) < 0.006]
    if hinted or candidates:
        return (hinted or candidates)[0]
    return rate.limit_denominator(1001)


def as_rate(fps: float | str | Fraction) -> Fraction:
    """A frame rate as an exact fraction: strings and fractions as given, floats snapped to a standard
    rate (29.97002997 -> 30000/1001)."""
    rate = Fraction(fps) if isinstance(fps, str | Fraction) else Fraction(float(fps)).limit_denominator(10000)
    if rate <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    return snap_rate(rate) if isinstance(fps, float | int) else rate
