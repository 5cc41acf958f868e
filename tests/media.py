"""Test media made on the fly: synthetic clips from ffmpeg's lavfi sources, a plain full-decode
reference, and broken files for error tests."""

from __future__ import annotations

import subprocess
from pathlib import Path

import ffmpeg
import numpy as np

from diffferv_cli.video.io import ffmpeg_exe, run_ffmpeg
from diffferv_cli.video.probe import as_rate, file_url, probe

MUXERS = {".mkv": "matroska", ".webm": "webm", ".mov": "mov", ".avi": "avi"}


# A smooth three-colour diagonal for 160x96 clips. The colours are given: the filter's default colours
# are random on every run whatever its seed, which made round-trip PSNR figures vary by several dB.
GRADIENTS = "gradients=c0=0x102040:c1=0xf0d0a0:c2=0x40a060:nb_colors=3:x0=0:y0=0:x1=160:y1=96:seed=1"


def make_test_clip(path, *, width: int = 96, height: int = 64, frames: int = 8, fps: float = 24,
                   audio: bool = False, pattern: str = "testsrc2", rotation: int = 0, vfr: bool = False,
                   codec: str = "libx264", sar: str | None = None) -> Path:
    """A synthetic clip from an ffmpeg lavfi source (`testsrc2` changes every frame).

    `width` x `height` is the *stored* size: with `rotation` 90 or 270 (clockwise, written as a display
    matrix like a phone does) it displays as `height` x `width`; with `sar` (e.g. "2/1", anamorphic) it
    displays `sar` times wider. Odd sizes are stored as yuv444p (H.264 yuv420p cannot hold them). `vfr`
    spaces frames unevenly (1.5 and 0.5 frame periods alternating), the average rate staying `fps`.
    `audio` adds a 440 Hz sine as long as the video."""
    path = Path(path)
    if rotation % 90:
        raise ValueError("rotation must be a multiple of 90")
    source_width, source_height = width + width % 2, height + height % 2
    rate = as_rate(fps)
    options = f"size={source_width}x{source_height}:rate={rate.numerator}/{rate.denominator}"
    source = f"{pattern}:{options}" if "=" in pattern else f"{pattern}={options}"
    video = ffmpeg.input(source, f="lavfi").video
    if (source_width, source_height) != (width, height):  # lavfi sources only make even sizes
        video = video.filter("format", "yuv444p").filter("crop", width, height, 0, 0)
    if sar:
        video = video.filter("setsar", sar)
    output_options: dict = {"frames:v": frames, "vcodec": codec, "format": MUXERS.get(path.suffix.lower(), "mp4")}
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
    if rotation % 360 == 0:
        run_ffmpeg(ffmpeg.output(*streams, file_url(path), **output_options), "make a test clip")
        return path
    upright = path.with_name(f".{path.stem}.unrotated{path.suffix}")
    try:
        run_ffmpeg(ffmpeg.output(*streams, file_url(upright), **output_options), "make a test clip")
        # the display matrix (counter-clockwise degrees) is set on a stream copy
        run_ffmpeg(ffmpeg.input(file_url(upright), display_rotation=-(rotation % 360))
                   .output(file_url(path), c="copy", format=output_options["format"]), "rotate a test clip")
    finally:
        upright.unlink(missing_ok=True)
    return path


def decode_all(path: Path) -> np.ndarray:
    """Every frame at its displayed size, decoded with a plain ffmpeg command line (no selection, no
    scaling): the reference `read_clip` is compared against."""
    info = probe(path)
    args = [ffmpeg_exe(), "-v", "error", "-nostdin", "-i", file_url(path), "-map", "0:V:0", "-fps_mode", "passthrough",
            "-sws_flags", "bicubic", "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:"]
    raw = subprocess.run(args, capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, info.height, info.width, 3)


def psnr(reference: np.ndarray, test: np.ndarray) -> float:
    error = np.mean((reference.astype(np.float64) - test.astype(np.float64)) ** 2)
    return float("inf") if error == 0 else float(10 * np.log10(255.0**2 / error))


def text_as_video(path: Path) -> Path:
    path.write_text("This is a shopping list, not a video.\n" * 20)
    return path


def empty_file(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def audio_only(path: Path) -> Path:
    """An .mp4 holding only an AAC sine wave."""
    subprocess.run([ffmpeg_exe(), "-v", "error", "-nostdin", "-y", "-f", "lavfi", "-i",
                    "sine=frequency=440:duration=0.5", "-c:a", "aac", file_url(path)], check=True)
    return path


def files_in(folder: Path) -> list[str]:
    """Every entry of a folder, hidden temp files included."""
    return sorted(entry.name for entry in folder.iterdir())
