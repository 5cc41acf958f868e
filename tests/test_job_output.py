"""The written edit keeps the time base of its frame selection: audio from --start, rate source/stride."""

from __future__ import annotations

import subprocess
from fractions import Fraction

import numpy as np
import pytest
from media import make_test_clip

from diffferv_cli.config import ClipSpec
from diffferv_cli.editing.job import write_result
from diffferv_cli.video.io import ffmpeg_exe, probe, read_clip

RATE = 44100
# the source's audio tone changes every half second: 300, 600, 900, 1200 Hz
TONE = "sin(2*PI*t*(300+300*floor(2*t)))"


def _tone_at(seconds: float) -> float:
    return 300 + 300 * int(2 * seconds)


@pytest.fixture(scope="module")
def stepped_tone_clip(tmp_path_factory) -> object:
    """2 s at 24 fps (48 frames, testsrc2) with the stepped tone as AAC audio."""
    path = tmp_path_factory.mktemp("tone") / "tone.mp4"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=96x64:rate=24",
                    "-f", "lavfi", "-i", f"aevalsrc={TONE}:s={RATE}:d=2", "-frames:v", "48", "-c:v", "libx264",
                    "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "192k", "-shortest", str(path)], check=True)
    return path


def _audio(path) -> np.ndarray:
    done = subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(path), "-map", "0:a:0", "-f", "f32le", "-ac", "1",
                           "-ar", str(RATE), "pipe:"], check=True, capture_output=True)
    return np.frombuffer(done.stdout, dtype=np.float32)


def _dominant_frequency(samples: np.ndarray) -> float:
    """Frequency of the strongest FFT bin of the middle of `samples` (away from codec edges)."""
    middle = samples[len(samples) // 5: len(samples) - len(samples) // 5]
    spectrum = np.abs(np.fft.rfft(middle * np.hanning(len(middle))))
    return float(np.fft.rfftfreq(len(middle), 1 / RATE)[np.argmax(spectrum)])


def test_source_tone_is_what_the_test_assumes(stepped_tone_clip):
    audio = _audio(stepped_tone_clip)
    for start in (0.0, 0.5, 1.0, 1.5):
        piece = audio[int((start + 0.05) * RATE): int((start + 0.45) * RATE)]
        assert abs(_dominant_frequency(piece) - _tone_at(start)) < 15


@pytest.mark.parametrize("start, frames, stride", [(12, 12, 1), (24, 6, 2), (12, 4, 3)])
def test_output_audio_and_rate_follow_the_selection(stepped_tone_clip, tmp_path, start, frames, stride):
    """Frames start..start+(frames-1)*stride of a 24 fps clip: the output plays at 24/stride fps, lasts
    frames*stride/24 s, and its audio is the source's from start/24 s (a tone that tells where it is)."""
    clip = read_clip(stepped_tone_clip, ClipSpec(short_side=64, multiple=16, start=start, frames=frames,
                                                 stride=stride))
    assert clip.frame_indices == tuple(range(start, start + frames * stride, stride))
    out = write_result(clip, clip.frames, tmp_path / "out.mp4")[0]
    info = probe(out)
    assert Fraction(info.fps_fraction) == Fraction(24, stride)
    assert info.frame_count == frames
    assert info.has_audio
    audio = _audio(out)
    seconds = frames * stride / 24
    assert abs(len(audio) / RATE - seconds) < 0.05
    assert abs(_dominant_frequency(audio) - _tone_at(start / 24)) < 15


def test_output_rate_is_the_exact_fraction_for_ntsc_rates(tmp_path):
    """30000/1001 fps with stride 2 is written at 15000/1001, not a rounded 14.985."""
    source = make_test_clip(tmp_path / "ntsc.mp4", width=96, height=64, frames=12, fps="30000/1001")
    clip = read_clip(source, ClipSpec(short_side=64, multiple=16, start=1, frames=4, stride=2))
    out = write_result(clip, clip.frames, tmp_path / "out.mp4")[0]
    assert Fraction(probe(source).fps_fraction) == Fraction(30000, 1001)
    assert Fraction(probe(out).fps_fraction) == Fraction(15000, 1001)
    assert probe(out).frame_count == 4
