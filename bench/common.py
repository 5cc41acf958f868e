"""Small helpers shared by the benchmarks: time a call, print a table, save the figures as JSON.

    from common import best_time, report          # bench scripts put bench/ on sys.path
    seconds = best_time(lambda: work(x), repeat=3)
    report("trajectories", rows=[{"grid": "64x64", "ms": 1.2}], settings={"frames": 32})

`report` prints the rows as a table (rich when installed, plain text otherwise) and writes
bench/results/<name>.json: {"name", "date", "command", "machine", "settings", "rows"}, where "command" is
the command line that ran the benchmark. bench/results/ is git-ignored.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
TESTS = Path(__file__).resolve().parents[1] / "tests"  # holds media.py: synthetic clips for benchmarks too


def make_test_clip(path, **options):
    """A synthetic clip (tests/media.py's generator, shared with the test suite)."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    from media import make_test_clip as make

    return make(path, **options)


def machine() -> dict:
    """What the figures were measured on."""
    import torch

    versions = {}
    for package in ("torch", "numpy", "opencv-python-headless", "diffusers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "versions": versions,
    }


def command_line() -> str:
    """The command that is running, as `python bench/<script>.py --option value` (script relative to the repo)."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(RESULTS.parents[1])
    except ValueError:
        pass
    return shlex.join(["python", str(script), *sys.argv[1:]])


def best_time(fn: Callable[[], object], repeat: int = 3, warmup: int = 1) -> float:
    """Fastest of `repeat` timed calls, in seconds, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def report(name: str, rows: Sequence[dict], settings: dict | None = None, title: str | None = None) -> Path:
    """Print `rows` (dicts with the same keys) as a table and write bench/results/<name>.json."""
    rows = [dict(row) for row in rows]
    columns = list(rows[0]) if rows else []
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title or name)
        for column in columns:
            table.add_column(column, justify="left" if column == columns[0] else "right")
        for line in cells:
            table.add_row(*line)
        console = Console()
        needed = sum(
            max(len(column), *(len(line[i]) for line in cells)) + 3 for i, column in enumerate(columns)
        )
        Console(width=max(console.width, needed + 1)).print(table)  # never truncate a figure
    except ImportError:
        widths = [
            max(len(str(column)), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)
        ]
        print(title or name)
        print("  ".join(column.rjust(width) for column, width in zip(columns, widths, strict=True)))
        for line in cells:
            print("  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)))

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {
        "name": name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "machine": machine(),
        "settings": settings or {},
        "rows": rows,
    }
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return path


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return "" if value is None else str(value)


def textured_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 RGB with texture at several scales (good for flow: no flat areas)."""
    import cv2

    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), np.float32)
    for sigma in (1.0, 3.0, 9.0):
        noise = rng.standard_normal((height, width, 3)).astype(np.float32)
        blurred = cv2.GaussianBlur(noise, (0, 0), sigma)
        image += blurred / (blurred.std() + 1e-6)
    image = (image - image.min()) / (np.ptp(image) + 1e-6)
    return (image * 255).round().astype(np.uint8)


def textured_clip(frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """(m, H, W, 3) uint8: a textured background drifting smoothly (shift, slight rotation and zoom) and a
    textured disk crossing it on its own path, so the flow has motion boundaries and occlusions."""
    import cv2

    background = textured_image(height, width, seed)
    foreground = textured_image(height, width, seed + 1)
    radius = min(height, width) // 5
    yy, xx = np.mgrid[0:height, 0:width]
    clip = np.empty((frames, height, width, 3), np.uint8)
    for frame in range(frames):
        t = frame / max(frames - 1, 1)
        angle, zoom = 3.0 * np.sin(np.pi * t), 1.0 + 0.04 * t
        matrix = cv2.getRotationMatrix2D((width / 2, height / 2), angle, zoom)
        matrix[:, 2] += (0.06 * width * np.sin(2 * np.pi * t), 0.04 * height * t)
        image = cv2.warpAffine(background, matrix, (width, height), borderMode=cv2.BORDER_REFLECT)
        center_x, center_y = width * (0.25 + 0.5 * t), height * (0.5 + 0.15 * np.sin(2 * np.pi * t))
        shift = np.float32([[1, 0, center_x - width / 2], [0, 1, center_y - height / 2]])
        disk_texture = cv2.warpAffine(foreground, shift, (width, height), borderMode=cv2.BORDER_REFLECT)
        inside = (xx - center_x) ** 2 + (yy - center_y) ** 2 < radius**2
        image[inside] = disk_texture[inside]
        clip[frame] = image
    return clip


def synthetic_clip(frames: int, height: int, width: int, seed: int = 0, multiple: int = 64):
    """A `Clip` held in memory: `frames` generated frames at working size (no file behind it)."""
    from diffferv_cli.config import ClipSpec
    from diffferv_cli.video.geometry import working_geometry
    from diffferv_cli.video.io import Clip
    from diffferv_cli.video.probe import VideoInfo

    spec = ClipSpec(short_side=min(height, width), multiple=multiple)
    info = VideoInfo(path=Path("synthetic.mp4"), width=width, height=height, rotation=0, fps=24.0,
                     fps_fraction="24/1", frame_count=frames, duration=frames / 24, has_audio=False, codec="none")
    geometry = working_geometry((width, height), spec)
    if geometry.working_size != (width, height):
        raise SystemExit(f"frame sizes must be multiples of {multiple}")
    return Clip(info, spec, geometry, tuple(range(frames)), textured_clip(frames, height, width, seed))
