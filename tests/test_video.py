"""video/ (probe, io, geometry) on clips made by ffmpeg's lavfi sources in temp folders (all small: the file runs in seconds)."""

from __future__ import annotations

import os
import tracemalloc

import numpy as np
import pytest
from media import GRADIENTS, audio_only, decode_all, empty_file, files_in, make_test_clip, psnr, text_as_video

from diffferv_cli.config import ClipSpec
from diffferv_cli.errors import UserError
from diffferv_cli.video.geometry import (
    Geometry,
    frame_selection,
    scaled_to_working,
    to_source_resolution,
    working_geometry,
)
from diffferv_cli.video.io import ffmpeg_version, read_clip, write_video
from diffferv_cli.video.probe import probe

SMALL = ClipSpec(short_side=64, multiple=16)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="module")
def clip_path(media):
    """96x64, 8 frames, 24 fps, with audio: the round-trip clip."""
    return make_test_clip(media / "clip.mp4", width=96, height=64, frames=8, fps=24, audio=True)


@pytest.fixture(scope="module")
def long_path(media):
    return make_test_clip(media / "long.mp4", width=96, height=64, frames=20, fps=25)


def test_ffmpeg_version_names_the_binary():
    assert ffmpeg_version().startswith("ffmpeg ") and "imageio-ffmpeg" in ffmpeg_version()


def test_probe_reports_the_stream(clip_path):
    info = probe(clip_path)
    assert (info.width, info.height, info.rotation) == (96, 64, 0)
    assert (info.fps, info.fps_fraction, info.frame_count) == (24.0, "24/1", 8)
    assert info.duration == pytest.approx(8 / 24)
    assert info.has_audio and info.codec == "h264" and not info.variable_fps


@pytest.mark.parametrize("name", ["ntsc.mp4", "ntsc.mkv", "ntsc.webm"])
def test_ntsc_rate_is_the_exact_fraction(media, name):
    # Matroska/WebM keep 1 ms timestamps (33, 34, 33 ms): the rate is still 30000/1001, not 30.08
    codec = "libvpx-vp9" if name.endswith(".webm") else "libx264"
    info = probe(make_test_clip(media / name, frames=5, fps=30000 / 1001, codec=codec, audio=True))
    assert info.fps_fraction == "30000/1001" and info.frame_count == 5 and info.has_audio


# Round trip ----------------------------------------------------------------------------------------

def test_round_trip_keeps_frames_rate_size_audio_and_pixels(clip_path, tmp_path):
    clip = read_clip(clip_path, SMALL)
    assert clip.frames.shape == (8, 64, 96, 3) and clip.frames.dtype == np.uint8
    out = write_video(clip.frames, tmp_path / "out.mp4", clip.fps, geometry=clip.geometry, audio_from=clip_path,
                      input_paths=[clip_path])
    info = probe(out)
    assert (info.width, info.height, info.frame_count, info.fps_fraction) == (96, 64, 8, "24/1")
    assert info.has_audio and info.rotation == 0
    again = read_clip(out, SMALL)
    quality = psnr(clip.frames, again.frames)
    print(f"decode -> encode (crf 17) -> decode PSNR on testsrc2 96x64: {quality:.2f} dB")
    # Measured 36.7 dB (41.9 at crf 0; ~29 if the decoder interpolated chroma, see video._scale_flags).
    assert quality > 35.0


def test_round_trip_through_a_resize_is_close_to_the_source(media, tmp_path):
    source = make_test_clip(media / "gradients.mp4", width=160, height=96, frames=3, pattern=GRADIENTS)
    clip = read_clip(source, ClipSpec(short_side=64, multiple=64))  # 107x64 -> padded to 128x64
    assert clip.geometry.scaled_size == (107, 64) and clip.geometry.crop == (-10, 0, -11, 0)
    out = write_video(clip.frames, tmp_path / "out.mp4", clip.fps, geometry=clip.geometry)
    info = probe(out)
    assert (info.width, info.height, info.frame_count) == (160, 96, 3)
    quality = psnr(decode_all(source), decode_all(out))
    print(f"source -> 107x64 -> source PSNR on smooth gradients: {quality:.2f} dB")
    # Measured 45.3 dB: the down/up-scale loses only fine detail. Frames one pixel off give 37.9 dB
    # (shifted across) and 35.4 dB (shifted down).
    assert quality > 43.0


def test_write_without_audio_source_has_no_audio(clip_path, tmp_path):
    frames = read_clip(clip_path, SMALL).frames
    assert not probe(write_video(frames, tmp_path / "silent.mp4", 24)).has_audio
    silent_source = make_test_clip(tmp_path / "silent-source.mp4", frames=2)
    out = write_video(frames, tmp_path / "still-silent.mp4", 24, audio_from=silent_source)
    assert not probe(out).has_audio


def test_exact_fraction_rate_and_replacing_an_older_output(clip_path, tmp_path):
    frames = read_clip(clip_path, SMALL).frames[:3]
    target = tmp_path / "out.mp4"
    target.write_bytes(b"old result")
    write_video(frames, target, "30000/1001")
    assert probe(target).fps_fraction == "30000/1001" and probe(target).frame_count == 3
    assert files_in(tmp_path) == ["out.mp4"]
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)  # not the temp file's private mode


# Frame selection -----------------------------------------------------------------------------------

@pytest.mark.parametrize("start, frames, stride, expected", [
    (0, None, 1, tuple(range(20))),
    (5, 4, 1, (5, 6, 7, 8)),
    (3, None, 4, (3, 7, 11, 15, 19)),
    (2, 3, 5, (2, 7, 12)),
    (18, 10, 1, (18, 19)),  # asks for more than there is: the rest
    (19, None, 3, (19,)),
])
def test_selection_gives_the_source_frames(long_path, start, frames, stride, expected):
    spec = ClipSpec(start=start, frames=frames, stride=stride, short_side=64, multiple=16)
    clip = read_clip(long_path, spec)
    assert clip.frame_indices == expected
    reference = decode_all(long_path)
    assert np.array_equal(clip.frames, reference[list(expected)])  # same pixels as a plain full decode
    assert clip.fps == pytest.approx(25 / stride)


def test_testsrc2_frames_differ_so_selection_tests_mean_something(long_path):
    reference = decode_all(long_path)
    assert all(not np.array_equal(reference[i], reference[i + 1]) for i in range(len(reference) - 1))


def test_start_past_the_end_is_a_user_error(long_path):
    with pytest.raises(UserError, match=r"--start 20 is past the end of long.mp4, which has 20 frames"):
        read_clip(long_path, ClipSpec(start=20, short_side=64, multiple=16))
    assert frame_selection(1, ClipSpec(short_side=64)) == (0,)


def test_progress_is_reported_per_frame(long_path):
    calls = []
    read_clip(long_path, ClipSpec(frames=3, short_side=64, multiple=16), progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 3), (2, 3), (3, 3)]


# Unusual videos ------------------------------------------------------------------------------------

def test_one_frame_video(media, tmp_path):
    path = make_test_clip(media / "one.mp4", frames=1)
    assert probe(path).frame_count == 1
    clip = read_clip(path, SMALL)
    assert clip.frames.shape == (1, 64, 96, 3) and clip.frame_indices == (0,)
    assert probe(write_video(clip.frames, tmp_path / "one.mp4", clip.fps, geometry=clip.geometry)).frame_count == 1


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotated_phone_video_comes_out_upright(media, tmp_path, rotation):
    upright = decode_all(make_test_clip(media / "unrotated.mp4", width=96, height=64, frames=3))
    path = make_test_clip(media / f"rotated{rotation}.mp4", width=96, height=64, frames=3, rotation=rotation)
    info = probe(path)
    assert info.rotation == rotation
    assert (info.width, info.height) == ((64, 96) if rotation in (90, 270) else (96, 64))
    clip = read_clip(path, SMALL)
    # clockwise display rotation of the stored frames
    assert np.array_equal(clip.frames, np.rot90(upright, k=-rotation // 90, axes=(1, 2)))
    out = probe(write_video(clip.frames, tmp_path / "out.mp4", clip.fps, geometry=clip.geometry))
    assert (out.width, out.height, out.rotation) == (info.width, info.height, 0)  # upright pixels, no matrix


def test_portrait_video(media):
    path = make_test_clip(media / "portrait.mp4", width=64, height=112, frames=2)
    clip = read_clip(path, SMALL)
    assert clip.geometry.scaled_size == (64, 112) and clip.geometry.working_size == (64, 112)
    assert np.array_equal(clip.frames, decode_all(path))


def test_odd_size_is_written_with_one_repeated_column_and_row(media, tmp_path):
    path = make_test_clip(media / "odd.mp4", width=641, height=359, frames=2)
    info = probe(path)
    assert (info.width, info.height) == (641, 359)
    clip = read_clip(path, ClipSpec(short_side=64, multiple=16))
    assert clip.geometry.working_size == (128, 64)
    out = write_video(clip.frames, tmp_path / "out.mp4", clip.fps, geometry=clip.geometry)
    written = decode_all(out)
    assert written.shape == (2, 360, 642, 3)
    quality = psnr(written[:, :359, :641], decode_all(path))
    print(f"641x359 -> 114x64 -> 641x359 PSNR on testsrc2: {quality:.2f} dB")
    assert quality > 22.0  # measured 24.3 dB through 114x64; shifted by 6 px it would be 16-19 dB
    edge = np.abs(written[:, :, 641].astype(int) - written[:, :, 640]).mean()
    assert edge < 3  # the extra column repeats its neighbour (up to H.264 noise)


def test_variable_frame_rate_keeps_every_frame_once(media, tmp_path):
    path = make_test_clip(media / "vfr.mp4", frames=12, fps=24, vfr=True)
    info = probe(path)
    assert info.variable_fps and info.frame_count == 12
    assert info.fps == pytest.approx(12 / info.duration)
    assert 20 < info.fps < 26  # the average rate
    clip = read_clip(path, SMALL)
    assert len(clip.frames) == 12
    assert np.array_equal(clip.frames, decode_all(path))  # no duplicated or dropped frames
    out = probe(write_video(clip.frames, tmp_path / "cfr.mp4", clip.info.fps_fraction))
    assert out.frame_count == 12 and not out.variable_fps and out.duration == pytest.approx(info.duration, abs=1e-3)


def test_frames_above_4k_are_scaled_inside_ffmpeg(media, tmp_path):
    path = make_test_clip(media / "5k.mp4", width=5120, height=2880, frames=2, pattern="color=c=0x2040c0")
    tracemalloc.start()
    try:
        clip = read_clip(path, SMALL)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    full_frame = 5120 * 2880 * 3  # 44 MB
    assert peak < full_frame / 10, f"read_clip allocated {peak / 1e6:.1f} MB"
    assert clip.geometry.scaled_size == (114, 64) and clip.frames.shape == (2, 64, 128, 3)
    assert np.abs(clip.frames.astype(int) - [0x20, 0x40, 0xC0]).max() <= 3
    out = probe(write_video(clip.frames, tmp_path / "5k.mp4", clip.fps, geometry=clip.geometry, preset="ultrafast"))
    assert (out.width, out.height, out.frame_count) == (5120, 2880, 2)


# Bad inputs ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, message", [
    (lambda folder: folder / "missing.mp4", "does not exist"),
    (lambda folder: folder, "is a folder"),
    (lambda folder: empty_file(folder / "empty.mp4"), "is empty"),
    (lambda folder: text_as_video(folder / "notes.mp4"), "is not a video ffmpeg can read"),
    (lambda folder: audio_only(folder / "song.mp4"), "has no video stream"),
])
def test_bad_input_is_one_sentence(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(UserError, match=message) as caught:
        probe(path)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)
    with pytest.raises(UserError, match=message):
        read_clip(path, SMALL)


# Refused and failed output -------------------------------------------------------------------------

@pytest.fixture
def frames(clip_path):
    return read_clip(clip_path, ClipSpec(frames=2, short_side=64, multiple=16)).frames


def test_output_over_an_input_is_refused(clip_path, frames, tmp_path):
    before, listing = clip_path.read_bytes(), files_in(clip_path.parent)
    with pytest.raises(UserError, match="is the input"):
        write_video(frames, clip_path, 24, input_paths=[clip_path])
    link = tmp_path / "link.mp4"
    link.symlink_to(clip_path)
    with pytest.raises(UserError, match="is the input"):
        write_video(frames, link, 24, input_paths=[clip_path])
    with pytest.raises(UserError, match="is the input"):  # the audio source is an input too
        write_video(frames, clip_path, 24, audio_from=clip_path)
    assert clip_path.read_bytes() == before and files_in(clip_path.parent) == listing  # nothing new beside it


@pytest.mark.parametrize("target, message", [
    ("missing/out.mp4", "does not exist"),
    ("a-file.txt/out.mp4", "is not a folder"),
    ("folder", "is a folder"),
    ("out.avi", "must end in .mp4"),
])
def test_bad_output_path_is_refused(frames, tmp_path, target, message):
    (tmp_path / "a-file.txt").write_text("x")
    (tmp_path / "folder").mkdir()
    before = files_in(tmp_path)
    with pytest.raises(UserError, match=message):
        write_video(frames, tmp_path / target, 24)
    assert files_in(tmp_path) == before and files_in(tmp_path / "folder") == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere; see the test below")
def test_unwritable_output_folder_is_refused(frames, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(UserError, match="not writable"):
        write_video(frames, locked / "out.mp4", 24)
    assert files_in(locked) == []


def test_unwritable_output_folder_is_refused_even_as_root(frames, tmp_path, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if path == tmp_path else real_access(path, mode))
    with pytest.raises(UserError, match="is not writable"):
        write_video(frames, tmp_path / "out.mp4", 24)
    assert files_in(tmp_path) == []


@pytest.mark.parametrize("count", [2, 40])  # 40 frames overflow the pipe: ffmpeg dies while we write
def test_ffmpeg_failure_is_its_message_and_leaves_nothing(frames, tmp_path, count):
    many = np.resize(frames, (count, *frames.shape[1:]))
    with pytest.raises(UserError) as caught:
        write_video(many, tmp_path / "out.mp4", 24, preset="no-such-preset")
    assert str(caught.value) == "ffmpeg could not write out.mp4: invalid preset 'no-such-preset'."
    assert files_in(tmp_path) == []


def test_interrupted_write_leaves_the_old_output_alone(frames, tmp_path):
    target = tmp_path / "out.mp4"
    target.write_bytes(b"previous result")

    def interrupt(done, total):
        if done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_video(frames, target, 24, progress=interrupt)
    assert files_in(tmp_path) == ["out.mp4"] and target.read_bytes() == b"previous result"


# Geometry (pure) -----------------------------------------------------------------------------------

SIZES = [(96, 64), (64, 96), (641, 359), (359, 641), (1920, 1080), (1080, 1920), (4096, 2160), (7680, 4320),
         (512, 512), (100, 100), (1000, 999)]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("short_side, multiple", [(512, 64), (64, 16), (256, 64)])
def test_working_geometry(size, short_side, multiple):
    geometry = working_geometry(size, ClipSpec(short_side=short_side, multiple=multiple))
    width, height = geometry.working_size
    assert width % multiple == 0 and height % multiple == 0
    scaled_width, scaled_height = geometry.scaled_size
    assert min(scaled_width, scaled_height) == short_side
    source_aspect = size[0] / size[1]
    assert abs(scaled_width / scaled_height - source_aspect) <= source_aspect / short_side  # rounding only
    left, top, right, bottom = geometry.crop
    assert width == scaled_width - left - right and height == scaled_height - top - bottom
    assert all(-multiple < side <= 0 for side in geometry.crop)  # only ever a small pad
    assert abs(left - right) <= 1 and abs(top - bottom) <= 1  # centered
    assert geometry.source_size == size


@pytest.mark.parametrize("size", [(96, 64), (641, 359), (359, 641), (4096, 2160)])
def test_to_source_resolution_shape(size):
    geometry = working_geometry(size, SMALL)
    width, height = geometry.working_size
    frames = np.zeros((2, height, width, 3), np.uint8)
    assert to_source_resolution(frames, geometry).shape == (2, size[1], size[0], 3)
    assert to_source_resolution(frames[0], geometry).shape == (size[1], size[0], 3)


def test_pad_is_undone_exactly():
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, (2, 64, 80, 3), dtype=np.uint8)
    geometry = working_geometry((80, 64), ClipSpec(short_side=64, multiple=32))  # 80 -> 96: pad 8 + 8
    assert geometry.crop == (-8, 0, -8, 0)
    working = scaled_to_working(source, geometry.crop)
    assert working.shape == (2, 64, 96, 3)
    assert np.array_equal(working[:, :, 8:88], source)
    assert np.array_equal(working[:, :, 7], source[:, :, 1])  # mirrored, not black
    assert np.array_equal(to_source_resolution(working, geometry), source)


def test_a_cropped_geometry_is_undone_to_full_size():
    geometry = Geometry(source_size=(100, 64), working_size=(96, 64), scaled_size=(100, 64), crop=(2, 0, 2, 0))
    frames = np.full((1, 64, 96, 3), 7, np.uint8)
    restored = to_source_resolution(frames, geometry)
    assert restored.shape == (1, 64, 100, 3) and (restored == 7).all()


def test_absurd_aspect_ratio_is_a_user_error():
    with pytest.raises(UserError, match="too elongated"):
        working_geometry((4000, 100), ClipSpec())


# Names that look like URLs -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["concat:a.mp4|b.mp4", "file:x.mp4", "-", "pipe:0.mp4", "http:clip.mp4"])
def test_a_file_name_is_never_read_as_a_protocol(tmp_path, monkeypatch, name):
    """ffmpeg reads names as URLs: `concat:a.mp4|b.mp4` would be a.mp4 then b.mp4 (10 frames, 96x64),
    `file:x.mp4` the file x.mp4, `-` stdin. The real file by that name (3 frames, 64x48) must be read."""
    monkeypatch.chdir(tmp_path)
    make_test_clip(tmp_path / "a.mp4", frames=5)
    make_test_clip(tmp_path / "b.mp4", frames=5)
    make_test_clip(tmp_path / "x.mp4", frames=5)
    odd = make_test_clip(tmp_path / name, width=64, height=48, frames=3, audio=True)
    assert odd.name == name and odd.is_file()
    for path in (odd, type(odd)(name)):  # absolute, and relative to the working folder
        info = probe(path)
        assert (info.frame_count, info.width, info.height, info.has_audio) == (3, 64, 48, True)
        clip = read_clip(path, ClipSpec(short_side=48, multiple=16))
        assert np.array_equal(clip.frames, decode_all(tmp_path / name))
    out = write_video(clip.frames, tmp_path / f"{name}.out.mp4", 24, audio_from=odd)  # the audio input too
    assert probe(out).frame_count == 3 and probe(out).has_audio


# PyAV probing details ------------------------------------------------------------------------------

def test_anamorphic_video_is_as_wide_as_displayed(media):
    path = make_test_clip(media / "anamorphic.mp4", width=64, height=64, frames=2, sar="2/1")
    info = probe(path)
    assert (info.width, info.height) == (128, 64)
    clip = read_clip(path, ClipSpec(short_side=64, multiple=16))
    assert clip.geometry.scaled_size == (128, 64)


def test_frame_selection_is_recorded_in_the_output(clip_path, tmp_path):
    from diffferv_cli.video.geometry import SourceFrames

    clip = read_clip(clip_path, ClipSpec(start=1, stride=3, short_side=64, multiple=16))
    assert clip.frame_indices == (1, 4, 7)
    recorded = SourceFrames.of(clip.frame_indices, source_count=8)
    out = write_video(clip.frames, tmp_path / "out.mp4", clip.fps, geometry=clip.geometry, source_frames=recorded)
    assert probe(out).source_frames == SourceFrames(start=1, stride=3, count=3, source_count=8)
    assert probe(clip_path).source_frames is None
    plain = write_video(clip.frames, tmp_path / "plain.mp4", clip.fps)
    assert probe(plain).source_frames is None


def test_selection_tag_round_trip_and_composition():
    from diffferv_cli.video.geometry import SourceFrames
    from diffferv_cli.video.probe import parse_selection_tag, selection_tag

    frames = SourceFrames(start=100, stride=2, count=12, source_count=472)
    assert selection_tag(frames) == "diffferv source frames: start=100 stride=2 count=12 of 472"
    assert parse_selection_tag(selection_tag(frames)) == frames
    assert parse_selection_tag("diffferv source frames: start=0 stride=0 count=3") is None
    assert parse_selection_tag("Encoded by a phone") is None and parse_selection_tag(None) is None
    # frames 1, 3, 5 of the derived video are source frames 102, 106, 110
    assert frames.then(1, 2, 3).indices == (102, 106, 110)
    assert SourceFrames.of((4, 7, 10)) == SourceFrames(4, 3, 3)
    with pytest.raises(ValueError):
        SourceFrames.of((1, 2, 4))


def test_packet_timing_reference_cases():
    from fractions import Fraction

    from diffferv_cli.video.probe import packet_timing

    ntsc_ms = [(round(i * 1001 / 30), 33) for i in range(10)]  # Matroska: 1 ms ticks, 33/34 ms steps
    assert packet_timing(ntsc_ms, Fraction(1, 1000), Fraction(30000, 1001)) == (10, Fraction(30000, 1001), False)
    regular = [(512 * i, 512) for i in (0, 2, 1, 3)]  # decode order; 1/12288 s ticks -> 24 fps
    assert packet_timing(regular, Fraction(1, 12288), None) == (4, Fraction(24), False)
    uneven = [(0, 1), (3, 1), (4, 1), (7, 1)]  # 1.5 / 0.5 periods of 1/24 s in 1/48 s ticks
    count, rate, variable = packet_timing(uneven, Fraction(1, 48), Fraction(24))
    assert (count, variable) == (4, True) and rate == Fraction(4 * 48, 8)
    no_stamps = [(None, 0)] * 3
    assert packet_timing(no_stamps, Fraction(1, 90000), Fraction(25)) == (3, Fraction(25), False)
    one = [(0, 1001)]
    assert packet_timing(one, Fraction(1, 30000), None) == (1, Fraction(30000, 1001), False)


# Side by side ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, spec", [
    (dict(width=160, height=96, frames=8), ClipSpec(start=1, stride=2, frames=3, short_side=64, multiple=64)),
    (dict(width=97, height=65, frames=6, vfr=True, audio=True), ClipSpec(short_side=48, multiple=16)),
])
def test_side_by_side_is_source_beside_output_at_output_size(media, tmp_path, kind, spec):
    from diffferv_cli.video.io import write_side_by_side

    source = make_test_clip(media / ("sbs-" + "-".join(f"{k}{v}" for k, v in kind.items()) + ".mp4"), **kind)
    clip = read_clip(source, spec)
    assert clip.geometry.crop != (0, 0, 0, 0)  # the working frames carry a mirrored pad
    edited = write_video(clip.frames[:, :, ::-1], tmp_path / "edited.mp4", clip.fps, geometry=clip.geometry,
                         audio_from=source)  # a visible "edit": the working frames mirrored
    side = write_side_by_side(clip, edited, tmp_path / "side.mp4")
    width, height = kind["width"], kind["height"]
    info, result = probe(side), probe(edited)
    assert (info.width, info.height) == (2 * width, height + height % 2)  # no pad, at the output's size
    assert (info.frame_count, info.fps_fraction) == (len(clip.frame_indices), result.fps_fraction)
    assert info.has_audio == result.has_audio
    brightness = decode_all(side)[:, :height].mean(axis=-1)  # odd sizes blur chroma on re-encoding
    left, right = brightness[:, :, :width], brightness[:, :, width:]
    originals = decode_all(source)[list(clip.frame_indices)].mean(axis=-1)
    outputs = decode_all(edited)[:, :height, :width].mean(axis=-1)
    print(f"side by side {width}x{height}: left PSNR {psnr(originals, left):.1f} dB, "
          f"right {psnr(outputs, right):.1f} dB, left vs output {psnr(outputs, left):.1f} dB")
    assert psnr(originals, left) > 28 and psnr(outputs, right) > 28  # measured 30-42 dB
    assert psnr(outputs, left) < 20  # the halves are not the same picture


def test_side_by_side_refuses_its_inputs(clip_path, tmp_path):
    from diffferv_cli.video.io import write_side_by_side

    clip = read_clip(clip_path, SMALL)
    edited = write_video(clip.frames, tmp_path / "edited.mp4", clip.fps, geometry=clip.geometry)
    before = edited.read_bytes()
    with pytest.raises(UserError, match="is the input"):
        write_side_by_side(clip, edited, edited)
    with pytest.raises(UserError, match="is the input"):
        write_side_by_side(clip, edited, clip_path)
    assert edited.read_bytes() == before
