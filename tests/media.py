"""Test media made on the fly: a plain full-decode reference and broken files for error tests."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

from diffferv_cli.video.io import ffmpeg_exe, probe


def decode_all(path: Path) -> np.ndarray:
    """Every frame at its displayed size, decoded with a plain ffmpeg command line (no selection, no
    scaling): the reference `read_clip` is compared against."""
    info = probe(path)
    args = [ffmpeg_exe(), "-v", "error", "-nostdin", "-i", str(path), "-map", "0:V:0", "-fps_mode", "passthrough",
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
                    "sine=frequency=440:duration=0.5", "-c:a", "aac", str(path)], check=True)
    return path


def files_in(folder: Path) -> list[str]:
    """Every entry of a folder, hidden temp files included."""
    return sorted(entry.name for entry in folder.iterdir())
