"""`make demo`'s clip: what it promises (size, frames, rate, a tone), written atomically."""

from __future__ import annotations

import pytest

from diffferv_cli.cli import demo
from diffferv_cli.errors import UserError
from diffferv_cli.video.probe import probe


def test_demo_clip_has_the_asked_size_frames_rate_and_audio(tmp_path):
    path = demo.demo_clip(tmp_path / "clip.mp4", width=64, height=48, frames=5, fps=12)
    info = probe(path)
    assert (info.width, info.height, info.frame_count, info.fps_fraction) == (64, 48, 5, "12/1")
    assert info.has_audio and info.codec == "h264"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]  # no temporary left beside it


def test_a_failed_demo_clip_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"previous")

    def fail(stream, what):
        raise UserError(f"could not {what}")

    monkeypatch.setattr("diffferv_cli.video.io.run_ffmpeg", fail)
    with pytest.raises(UserError, match="demo clip"):
        demo.demo_clip(path)
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]
