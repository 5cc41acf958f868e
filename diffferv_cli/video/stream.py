"""Selected frames of a video, streamed one at a time at full (or any) resolution.

`read_clip` holds the working-size frames of a clip in memory; compositing the edit back into the
source and finding the face region need the *same* frames (same start / stride / count, same upright
orientation) at the source's own resolution, where a 4K clip does not fit in memory. `stream_frames`
runs one ffmpeg that decodes, selects and converts exactly as `read_clip` does, and yields the frames
as they come: memory holds one frame (plus ffmpeg's pipe buffer), whatever the clip's length.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import ffmpeg
import numpy as np

from diffferv_cli.errors import UserError
from diffferv_cli.video.io import _command, _FFmpeg, _read_exactly, _scale_flags, _selected, displayed_rgb
from diffferv_cli.video.probe import VideoInfo, file_url, probe


def stream_frames(path, indices: Sequence[int], stride: int, *, info: VideoInfo | None = None,
                  size: tuple[int, int] | None = None) -> Iterator[np.ndarray]:
    """Yield the frames `indices` (as chosen by `frame_selection`: evenly `stride` apart) of `path` as
    uint8 RGB (H, W, 3), upright, at the displayed size, or resized to `size` (width, height).

    Every yielded frame is a fresh array (safe to keep). Raises `UserError` if the decoder gives fewer
    frames than `indices` names."""
    path = Path(path)
    info = info or probe(path)
    indices = tuple(indices)
    if not indices:
        return
    if any(b - a != stride for a, b in zip(indices, indices[1:], strict=False)):
        raise ValueError(f"indices must be {stride} apart, got {indices[:4]}...")
    video = displayed_rgb(_selected(ffmpeg.input(file_url(path))["V:0"], indices), info)
    width, height = info.width, info.height
    if size is not None and tuple(size) != (width, height):
        video = video.filter("scale", size[0], size[1], flags=_scale_flags((width, height), tuple(size)))
        video = video.filter("format", "rgb24")
        width, height = size
    graph = video.output("pipe:", format="rawvideo", pix_fmt="rgb24", fps_mode="passthrough",
                         **{"frames:v": len(indices)})
    received = 0
    with _FFmpeg(_command(graph), f"decode {path.name}", stdout=True) as process:
        while received < len(indices):
            buffer = bytearray(width * height * 3)
            if not _read_exactly(process.stdout, buffer):
                break
            received += 1
            yield np.frombuffer(buffer, dtype=np.uint8).reshape(height, width, 3)
    if received < len(indices):
        raise UserError(f"ffmpeg decoded only {received} of the {len(indices)} selected frames of {path}; "
                        "the file may be damaged or have changed.")
