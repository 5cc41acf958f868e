"""Full-resolution frames streamed for compositing, the region cut of read_clip, streamed and lossless writes."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from media import GRADIENTS, decode_all, files_in, make_test_clip, psnr

from diffferv_cli.config import ClipSpec
from diffferv_cli.errors import UserError
from diffferv_cli.video.geometry import frame_selection
from diffferv_cli.video.io import FrameStream, read_clip, write_video
from diffferv_cli.video.probe import probe
from diffferv_cli.video.stream import stream_frames


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return tmp_path_factory.mktemp("stream-media")


@pytest.mark.parametrize("options", [
    dict(width=96, height=64),
    dict(width=65, height=47),  # odd: stored as yuv444p
    dict(width=96, height=64, rotation=90),  # displayed portrait 64x96
    dict(width=97, height=63, rotation=270),
    dict(width=96, height=64, vfr=True),
], ids=["plain", "odd", "rotated-90", "odd-rotated-270", "vfr"])
def test_streamed_frames_are_the_selected_displayed_frames(media, options):
    path = make_test_clip(media / f"{'-'.join(map(str, options.values()))}.mp4", frames=10, **options)
    everything = decode_all(path)
    spec = ClipSpec(start=1, stride=3, frames=3, short_side=32, multiple=16)
    indices = frame_selection(probe(path).frame_count, spec)
    assert indices == (1, 4, 7)
    streamed = list(stream_frames(path, indices, spec.stride))
    assert len(streamed) == 3
    assert all(np.array_equal(frame, everything[index]) for frame, index in zip(streamed, indices, strict=True))
    assert streamed[0].shape == everything.shape[1:]


def test_streamed_frames_at_another_size(media):
    path = make_test_clip(media / "resize.mp4", width=160, height=96, frames=3, pattern=GRADIENTS)
    frames = list(stream_frames(path, (0, 1, 2), 1, size=(80, 48)))
    expected = [cv2.resize(frame, (80, 48), interpolation=cv2.INTER_AREA) for frame in decode_all(path)]
    assert frames[0].shape == (48, 80, 3)
    assert psnr(np.stack(expected), np.stack(frames)) > 40


def test_truncated_stream_is_a_user_error(media):
    path = make_test_clip(media / "short.mp4", frames=4)
    with pytest.raises(UserError, match="only 4 of the 6"):
        list(stream_frames(path, (0, 1, 2, 3, 4, 5), 1))


def _placement_error(working: np.ndarray, clip, displayed: np.ndarray, shift: tuple[int, int]) -> float:
    """Mean error between the working frame (pad removed) and the displayed frame's region, shifted."""
    x, y, width, height = clip.spec.region
    x, y = x + shift[0], y + shift[1]
    left, top = -clip.geometry.crop[0], -clip.geometry.crop[1]
    scaled_width, scaled_height = clip.geometry.scaled_size
    expected = cv2.resize(displayed[y:y + height, x:x + width], (scaled_width, scaled_height), interpolation=cv2.INTER_AREA)
    got = working[top:top + scaled_height, left:left + scaled_width]
    return float(np.abs(got.astype(int) - expected).mean())


@pytest.mark.parametrize("rotation", [0, 90])
def test_region_is_cut_from_the_displayed_frame(media, rotation):
    path = make_test_clip(media / f"region-{rotation}.mp4", width=240, height=160, frames=4, rotation=rotation)
    info = probe(path)
    region = (50, 30, 120, 84) if rotation == 0 else (30, 50, 84, 120)  # inside the displayed frame
    spec = ClipSpec(short_side=32, multiple=16, stride=2, region=region)
    clip = read_clip(path, spec)
    assert clip.geometry.source_size == region[2:]
    assert clip.frame_indices == (0, 2) and clip.info.width == info.width
    displayed = decode_all(path)
    for working, index in zip(clip.frames, clip.frame_indices, strict=True):
        right = _placement_error(working, clip, displayed[index], (0, 0))
        assert right < 0.5
        for shift in ((1, 0), (-1, 0), (0, 1), (0, -1)):  # one pixel off is already far worse
            assert right < 0.3 * _placement_error(working, clip, displayed[index], shift), shift


def test_region_past_the_frame_is_a_user_error(media):
    path = make_test_clip(media / "small.mp4", width=96, height=64, frames=2)
    with pytest.raises(UserError, match="reaches past the 96x64 frame"):
        read_clip(path, ClipSpec(short_side=32, multiple=16, region=(50, 10, 50, 20)))


def test_lossless_stream_write_decodes_to_the_same_frames(media, tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (3, 37, 65, 3), dtype=np.uint8)
    out = write_video(FrameStream(iter(frames), 3, (65, 37)), tmp_path / "lossless.mp4", 24, lossless=True)
    info = probe(out)
    assert (info.width, info.height, info.frame_count) == (65, 37, 3)
    assert np.array_equal(decode_all(out), frames)


def test_stream_with_too_few_frames_leaves_nothing(tmp_path):
    frames = np.zeros((2, 16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="ended after 2 of the 3"):
        write_video(FrameStream(iter(frames), 3, (16, 16)), tmp_path / "out.mp4", 24)
    with pytest.raises(ValueError, match="expected uint8"):
        write_video(FrameStream(iter(frames[:, :8]), 2, (16, 16)), tmp_path / "out.mp4", 24)
    assert files_in(tmp_path) == []
