"""Temporal context windows: the schedule, the blending weights, trajectories cut to a window, and the
windowed inversion/edit against the single-window (whole-clip) computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffferv_cli.config import ClipSpec, EditConfig, InversionConfig
from diffferv_cli.temporal.flow import ClipFlow, DISFlow, compute_flow, flow_pairs
from diffferv_cli.temporal.trajectories import build_trajectories, link_clip, naive_trajectories, token_grids
from diffferv_cli.temporal.windows import Window, blend, blend_weights, check_window, window_schedule

# -- schedule and weights (pure) -------------------------------------------------------------------

def test_schedule_examples():
    assert window_schedule(10, 4, 2) == [Window(0, 4), Window(2, 6), Window(4, 8), Window(6, 10)]
    assert window_schedule(11, 4, 2) == [Window(0, 4), Window(2, 6), Window(4, 8), Window(6, 10), Window(7, 11)]
    assert window_schedule(4, 4, 3) == [Window(0, 4)]
    assert window_schedule(3, 24, 6) == [Window(0, 3)]  # a short clip is one window: the whole clip


@pytest.mark.parametrize("frames, size, overlap", [(1, 4, 3), (5, 4, 3), (48, 24, 6), (50, 24, 6), (37, 7, 3),
                                                   (100, 10, 9)])
def test_schedule_covers_every_frame_with_full_windows_and_the_overlap(frames, size, overlap):
    windows = window_schedule(frames, size, overlap)
    assert windows[0].start == 0 and windows[-1].stop == frames
    assert all(w.frames == min(size, frames) for w in windows)
    for first, second in zip(windows, windows[1:], strict=False):
        assert first.start < second.start and first.stop - second.start >= overlap  # at least the overlap


def reference_weights(windows: list[Window], frames: int) -> list[list[float]]:
    """Per frame, per window, written out: pyramid weight over the sum of pyramids of the covering windows."""
    def pyramid(window, frame):
        position = frame - window.start
        return min(position + 1, window.frames - position)

    result = []
    for window in windows:
        weights = []
        for frame in range(window.start, window.stop):
            total = sum(pyramid(other, frame) for other in windows if other.start <= frame < other.stop)
            weights.append(pyramid(window, frame) / total)
        result.append(weights)
    return result


@pytest.mark.parametrize("frames, size, overlap", [(10, 4, 2), (11, 4, 2), (64, 16, 4), (37, 7, 3), (6, 24, 6)])
def test_blend_weights_sum_to_one_and_match_the_reference(frames, size, overlap):
    windows = window_schedule(frames, size, overlap)
    weights = blend_weights(windows, frames)
    total = torch.zeros(frames, dtype=torch.float64)
    for window, weight, expected in zip(windows, weights, reference_weights(windows, frames), strict=True):
        assert weight.shape == (window.frames,) and bool((weight > 0).all())
        torch.testing.assert_close(weight.double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-7)
        total[window.slice] += weight.double()
    torch.testing.assert_close(total, torch.ones(frames, dtype=torch.float64), rtol=0, atol=1e-6)
    if len(windows) == 1:
        assert torch.equal(weights[0], torch.ones(frames))  # exactly one: the single-window result is unchanged


def test_blend_is_the_per_frame_weighted_sum():
    frames, windows = 11, window_schedule(11, 4, 2)
    generator = torch.Generator().manual_seed(0)
    predictions = [torch.randn(w.frames, 2, 3, 5, generator=generator) for w in windows]
    blended = blend(windows, predictions, frames)
    weights = reference_weights(windows, frames)
    for frame in range(frames):
        expected = sum(weights[k][frame - w.start] * predictions[k][frame - w.start]
                       for k, w in enumerate(windows) if w.start <= frame < w.stop)
        torch.testing.assert_close(blended[frame], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("window_frames", [3, 2, 1, 0, -4])
def test_bad_window_frames_are_refused(window_frames):
    with pytest.raises(ValueError, match="SWCFA window"):
        check_window(window_frames, 3)
    with pytest.raises(ValueError):
        InversionConfig(window_frames=window_frames)


def test_bad_overlap_is_refused():
    with pytest.raises(ValueError, match="overlap"):
        check_window(8, 3, overlap=2)  # less than the SWCFA window
    with pytest.raises(ValueError, match="overlap"):
        check_window(8, 3, overlap=8)  # no progress
    assert check_window(8, 3) == 3 and check_window(24, 3) == 6


# -- trajectories cut to a window ------------------------------------------------------------------

def _random_flow(rng, frames, height, width) -> ClipFlow:
    forward = rng.normal(0, 1.2, (frames - 1, height, width, 2)).astype(np.float32)
    backward = -forward + rng.normal(0, 0.4, forward.shape).astype(np.float32)
    return ClipFlow(forward, backward, rng.random((frames - 1, height, width)) < 0.1)


def _pairs_of(flow: ClipFlow):
    for pair in range(flow.frames - 1):
        yield ClipFlow(flow.forward[pair:pair + 1], flow.backward[pair:pair + 1], flow.occlusion[pair:pair + 1])


@pytest.mark.parametrize("seed", range(4))
def test_window_trajectories_are_the_clip_trajectories_cut_to_the_window(seed):
    """Reference: the naive whole-clip trajectories, each cut to the window (tokens outside dropped,
    renumbered from the window's first frame), as a set of tuples."""
    rng = np.random.default_rng(seed)
    frames, height, width = 9, 6, 7
    flow = _random_flow(rng, frames, height, width)
    links = link_clip(_pairs_of(flow), frames, [(height, width)])
    tokens = height * width
    whole = naive_trajectories(flow, height, width)
    for start, stop in [(0, frames), (0, 4), (2, 6), (5, 9), (3, 4)]:
        grid = links.window(start, stop).for_grid(height, width)
        cut = {tuple(t - start * tokens for t in trajectory if start * tokens <= t < stop * tokens)
               for trajectory in whole}
        cut.discard(())
        assert {tuple(row[row >= 0].tolist()) for row in grid.index} == cut
        assert grid.frames == stop - start
        assert bool((grid.lengths[:-1] >= grid.lengths[1:]).all())  # longest first
        assert sorted(grid.index[grid.index >= 0].tolist()) == list(range((stop - start) * tokens))  # a partition


def test_streamed_links_equal_the_whole_clip_trajectories():
    rng = np.random.default_rng(5)
    frames = np.stack([np.roll(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8), 2 * k, axis=1)
                       for k in range(5)])
    grids = token_grids((4, 6), 2)
    built = build_trajectories(compute_flow(frames, DISFlow("fast")), grids)
    streamed = link_clip(flow_pairs(frames, DISFlow("fast")), len(frames), grids).window(0, len(frames))
    for key in grids:
        assert torch.equal(built.for_grid(*key).index, streamed.for_grid(*key).index)
        assert torch.equal(built.for_grid(*key).lengths, streamed.for_grid(*key).lengths)


# -- windowed inversion and editing on the tiny model ----------------------------------------------

STEPS = 2


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from media import make_test_clip

    from diffferv_cli.video.io import read_clip

    path = make_test_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", width=96, height=64, frames=12, fps=24)
    return read_clip(path, ClipSpec(short_side=64, multiple=16))


def _inversion(**changes) -> InversionConfig:
    return InversionConfig(steps=STEPS, flow_preset="ultrafast", **changes)


def test_one_window_equals_the_whole_clip_pass(tiny, clip, tmp_path):
    """A clip that fits one window: the inversion equals the UNet run on the whole clip at once with
    the whole clip's trajectories (the computation without windows), step by step."""
    from diffferv_cli.editing.inversion import attention_levels, inverse_scheduler, invert, latent_size
    from diffferv_cli.editing.prompts import encode_prompts
    from diffferv_cli.editing.vae import encode_frames
    from diffferv_cli.temporal.context import AttentionContext
    from diffferv_cli.temporal.install import temporal_attention

    entry = invert(tiny, clip, _inversion(window_frames=len(clip.frames)), cache_dir=tmp_path).entry
    assert entry.manifest["request"]["windows"] == [[0, len(clip.frames)]]

    frames, size = len(clip.frames), latent_size(clip, tiny)
    trajectories = build_trajectories(compute_flow(clip.frames, DISFlow("ultrafast")),
                                      token_grids(size, attention_levels(tiny.unet)))
    context = AttentionContext(frames=frames, latent_size=size, trajectories=trajectories, branches=("source",))
    text = encode_prompts(tiny, [entry.manifest["request"]["prompt"]]).repeat_interleave(frames, dim=0)
    scheduler = inverse_scheduler(tiny, STEPS)
    latent = encode_frames(tiny.vae, clip.frames)
    assert torch.equal(latent, entry.read_latent(0))
    with temporal_attention(tiny.unet), torch.inference_mode():
        for step, timestep in enumerate(scheduler.timesteps):
            noise = tiny.unet(latent, timestep, encoder_hidden_states=text,
                              cross_attention_kwargs={"ctx": context.at_step(step, timestep)}).sample
            without_tta = tiny.unet(latent, timestep, encoder_hidden_states=text, cross_attention_kwargs={
                "ctx": context.at_step(step, timestep, trajectories=None)}).sample
            cached = entry.read_latent(step + 1)
            scale = cached.abs().max().item()
            wrong = scheduler.step(without_tta, timestep, latent).prev_sample  # a bug of the size a cut makes
            latent = scheduler.step(noise, timestep, latent).prev_sample
            error = (cached - latent).abs().max().item()
            print(f"step {step}: |windowed - whole| = {error:.2e}, without TTA {(cached - wrong).abs().max():.2e}")
            assert error <= 1e-5 * scale < (cached - wrong).abs().max().item()


def test_windows_change_the_cache_key_only_when_the_schedule_changes(tiny, clip, tmp_path):
    from diffferv_cli.editing.inversion import cache_request, clip_windows

    def windows(**changes):
        return cache_request(clip, tiny, _inversion(**changes))["windows"]

    assert windows(window_frames=12) == windows(window_frames=40) == [[0, 12]]
    assert windows(window_frames=6) == [[0, 6], [3, 9], [6, 12]]
    assert windows(window_frames=6) != windows(window_frames=6, window_overlap=4)
    assert clip_windows(12, _inversion(window_frames=6)) == [Window(0, 6), Window(3, 9), Window(6, 12)]


def test_a_frame_depends_only_on_the_frames_its_windows_reach(tiny, clip, tmp_path):
    """Windows of 5 frames every 2 (overlap 3), one inversion and one edit step: frame 0's result depends on
    frames 0..8 at most (its window, the windows of its window's frames in the step before). Changing
    frame 11 leaves frames 0..1 bit for bit equal and changes frame 11."""
    from dataclasses import replace

    from diffferv_cli.editing.inversion import invert
    from diffferv_cli.editing.sampling import edit

    config = InversionConfig(steps=1, flow_preset="ultrafast", window_frames=5, window_overlap=3)
    edit_config = EditConfig(prompt_edit="a photo of an old person", tau_app=1.0)
    changed_frames = clip.frames.copy()
    changed_frames[11] = 255 - changed_frames[11]
    changed = replace(clip, frames=changed_frames)
    results = []
    for index, video in enumerate((clip, changed)):
        entry = invert(tiny, video, config, cache_dir=tmp_path / str(index)).entry
        results.append(edit(tiny, entry, edit_config))
    first, second = results
    assert torch.equal(first.latents[:2], second.latents[:2])
    assert not torch.equal(first.latents[11], second.latents[11])


def test_windowed_recompute_and_disk_modes_agree(tiny, clip, tmp_path):
    """Both modes see the same windows: the source features of window k come from the inversion's pass
    over window k, live or from the window's feature file."""
    from diffferv_cli.editing.inversion import invert
    from diffferv_cli.editing.sampling import edit

    config = EditConfig(prompt_edit="a photo of a smiling person", tau_app=1.0)
    recompute = invert(tiny, clip, _inversion(window_frames=6), cache_dir=tmp_path).entry
    disk = invert(tiny, clip, _inversion(window_frames=6, feature_mode="disk"), cache_dir=tmp_path).entry
    assert (disk.folder / disk.feature_name(STEPS - 1, 2)).is_file()  # 3 windows
    from_recompute = edit(tiny, recompute, config, feature_mode="recompute")
    from_disk = edit(tiny, disk, config, feature_mode="disk")
    diff = (from_recompute.latents - from_disk.latents).abs().max().item()
    assert diff <= 1e-4 * from_recompute.latents.abs().max().item()


def test_progress_announces_steps_times_windows(tiny, clip, tmp_path):
    from diffferv_cli.editing.inversion import invert

    calls = []
    invert(tiny, clip, _inversion(window_frames=6), cache_dir=tmp_path,
           progress=lambda stage, done, total: calls.append((stage, done, total)))
    inverting = [(done, total) for stage, done, total in calls if stage.startswith("invert")]
    assert {stage for stage, _, _ in calls if stage.startswith("invert")} == {"invert: 2 steps × 3 windows"}
    assert inverting[0] == (0, 2 * 18) and inverting[-1] == (2 * 18, 2 * 18)  # frame passes: 2 steps x (6+6+6)


@pytest.mark.parametrize("value", ["3", "0", "-2"])
def test_cli_bad_window_frames_is_one_sentence(clip, tmp_path, value):
    from typer.testing import CliRunner

    from diffferv_cli.cli import app

    result = CliRunner().invoke(app, ["invert", str(clip.info.path), "--model", "tiny-random", "--size", "64",
                                      "--window-frames", value, "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 2, result.output
    assert "--window-frames must be at least the SWCFA window + 1 = 4" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "c").exists()


def test_cli_help_says_the_default_window():
    from typer.testing import CliRunner

    from diffferv_cli.cli import app

    result = CliRunner().invoke(app, ["edit", "--help"], env={"COLUMNS": "200"})
    text = " ".join(result.output.split())
    assert "--window-frames" in text and "default 24" in text and "24 GB GPU" in text


def test_streamed_write_equals_the_array_write(tmp_path):
    from media import decode_all

    from diffferv_cli.video.io import FrameStream, write_video
    from diffferv_cli.video.probe import probe

    rng = np.random.default_rng(1)
    frames = rng.integers(0, 255, (5, 32, 48, 3), dtype=np.uint8)
    write_video(frames, tmp_path / "array.mp4", 24)
    write_video(FrameStream(iter(list(frames)), 5, (48, 32)), tmp_path / "stream.mp4", 24)
    assert probe(tmp_path / "stream.mp4").frame_count == 5
    assert np.array_equal(decode_all(tmp_path / "array.mp4"), decode_all(tmp_path / "stream.mp4"))
    with pytest.raises(ValueError, match="ended after 5 of the 6"):
        write_video(FrameStream(iter(list(frames)), 6, (48, 32)), tmp_path / "short.mp4", 24)
    assert not (tmp_path / "short.mp4").exists()
