"""Clip-length data a range at a time: tensor files written and read by rows (editing/stored.py), the
rolling blend of the step loops (temporal/windows.py), streamed working frames (video/io.py), and the
proof that a whole command never holds a whole clip of frames or latents."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load, save

from diffferv_cli.editing.cache import CacheEntry, LatentRows, frames_sha256
from diffferv_cli.editing.stored import TensorFile, TensorFileError, TensorFileWriter
from diffferv_cli.temporal.windows import NoiseBlend, RollingBlend, blend_weights, window_schedule

# tensor files ------------------------------------------------------------------------------------------


def test_rows_written_in_any_order_give_the_bytes_safetensors_writes(tmp_path):
    latent = torch.randn(11, 4, 3, 5)
    writer = TensorFileWriter(tmp_path / "latent.safetensors", {"latent": (torch.float32, latent.shape)})
    for start, stop in ((4, 9), (0, 4), (9, 11)):
        writer.write_rows("latent", start, latent[start:stop])
    digest = writer.finish()
    data = (tmp_path / "latent.safetensors").read_bytes()
    assert data == save({"latent": latent})
    import hashlib

    assert digest == hashlib.sha256(data).hexdigest()


def test_several_tensors_are_laid_out_as_safetensors_does(tmp_path):
    links = {"8x12.links": torch.randint(-1, 96, (6, 96), dtype=torch.int32),
             "4x6.links": torch.randint(-1, 24, (6, 24), dtype=torch.int32)}
    writer = TensorFileWriter(tmp_path / "t.safetensors", {name: (t.dtype, t.shape) for name, t in links.items()})
    for pair in reversed(range(6)):
        for name, tensor in links.items():
            writer.write_rows(name, pair, tensor[pair:pair + 1])
    writer.finish()
    data = (tmp_path / "t.safetensors").read_bytes()
    assert data == save(links)
    assert all(torch.equal(load(data)[name], tensor) for name, tensor in links.items())


def test_an_unwritten_row_fails_and_leaves_no_file(tmp_path):
    writer = TensorFileWriter(tmp_path / "x.safetensors", {"latent": (torch.float32, (5, 2))})
    writer.write_rows("latent", 0, torch.zeros(4, 2))
    with pytest.raises(ValueError, match="never written"):
        writer.finish()
    assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(ValueError):  # rows that do not fit are refused, not written elsewhere
        TensorFileWriter(tmp_path / "y.safetensors", {"latent": (torch.float32, (5, 2))}).write_rows(
            "latent", 4, torch.zeros(2, 2))


@pytest.mark.parametrize("start, stop", [(0, 11), (3, 7), (10, 11), (5, 5), (8, 20)])
def test_rows_read_equal_the_slice(tmp_path, start, stop):
    latent = torch.randn(11, 4, 3, 5)
    (tmp_path / "a.safetensors").write_bytes(save({"latent": latent}))
    stored = TensorFile(tmp_path / "a.safetensors")
    assert torch.equal(stored.rows("latent", start, stop), latent[start:stop])
    assert torch.equal(stored.read("latent"), latent)
    rows = LatentRows(stored, "a.safetensors")
    assert len(rows) == 11 and torch.equal(rows[start:stop], latent[start:stop])


def test_a_truncated_or_foreign_file_is_refused(tmp_path):
    data = save({"latent": torch.randn(6, 4, 2, 2)})
    (tmp_path / "short.safetensors").write_bytes(data[:-16])
    with pytest.raises(TensorFileError, match="does not fit"):
        TensorFile(tmp_path / "short.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(TensorFileError):
        TensorFile(tmp_path / "junk.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    with pytest.raises(TensorFileError):
        TensorFile(tmp_path / "tiny.safetensors")


def test_a_cached_latent_with_nan_rows_is_refused_when_read(tmp_path):
    latent = torch.zeros(6, 4, 2, 2)
    latent[4] = float("nan")
    (tmp_path / "n.safetensors").write_bytes(save({"latent": latent}))
    rows = LatentRows(TensorFile(tmp_path / "n.safetensors"), "n.safetensors")
    assert torch.equal(rows[0:4], latent[0:4])
    from diffferv_cli.errors import UserError

    with pytest.raises(UserError, match="NaN"):
        rows[3:6]


# the rolling blend ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("frames, window, overlap", [(5, 8, 2), (30, 8, 2), (31, 8, 3), (50, 24, 6), (9, 8, 7)])
def test_the_rolling_blend_equals_the_whole_clip_blend_bit_for_bit(frames, window, overlap):
    windows = window_schedule(frames, window, overlap)
    weights = blend_weights(windows, frames)
    generator = torch.Generator().manual_seed(frames)
    noises = [torch.randn(w.frames, 4, 3, 2, generator=generator) for w in windows]
    whole = NoiseBlend(windows, weights, (frames, 4, 3, 2))
    for index, noise in enumerate(noises):
        whole.add(index, noise)
    rolling, parts, open_at_most = RollingBlend(windows, weights, frames), [], 0
    for index, noise in enumerate(noises):
        rolling.add(index, noise)
        open_at_most = max(open_at_most, len(rolling._open))
        parts += rolling.ready(index)
    assert [lo for lo, _, _ in parts] == [0] + [hi for _, hi, _ in parts[:-1]]  # in order, no gap, no repeat
    assert parts[-1][1] == frames
    assert torch.equal(torch.cat([blended for _, _, blended in parts]), whole.result)
    assert open_at_most <= 2  # the windows still open: never the clip's
    together = RollingBlend(windows, weights, frames, whole=True)
    handed = []
    for index, noise in enumerate(noises):
        together.add(index, noise)
        handed.append(together.ready(index))
    assert all(not got for got in handed[:-1]) and torch.equal(handed[-1][0][2], whole.result)


# streamed working frames ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def streamed(tmp_path_factory):
    from media import make_test_clip

    from diffferv_cli.config import ClipSpec
    from diffferv_cli.video.io import read_clip

    path = make_test_clip(tmp_path_factory.mktemp("stored") / "c.mp4", width=96, height=64, frames=23)
    return read_clip(path, ClipSpec(start=1, stride=2, short_side=32, multiple=16))


def test_working_frames_give_the_same_frames_every_way_they_are_read(streamed):
    frames = streamed.frames
    whole = np.asarray(frames)
    assert whole.shape == frames.shape == (11, 32, 48, 3) and len(frames) == 11
    assert frames.sha256 == frames_sha256(whole)  # the first pass hashed what later passes decode
    assert np.array_equal(np.stack(list(frames)), whole)
    for size, start in ((4, 0), (4, 5), (32, 0), (1, 10)):
        chunks = list(frames.chunks(size, start))
        assert [first for first, _ in chunks] == list(range(start, 11, size))
        assert all(len(chunk) <= size for _, chunk in chunks)
        assert np.array_equal(np.concatenate([chunk for _, chunk in chunks]), whole[start:])
    assert np.array_equal(frames[3:7], whole[3:7]) and np.array_equal(frames[-1], whole[-1])
    assert np.array_equal(frames[::2], whole[::2])


# nothing whole ---------------------------------------------------------------------------------------------


def test_an_edit_never_holds_a_whole_clip_of_frames_or_latents(tiny, tmp_path, monkeypatch):
    """Invert and edit a clip of several windows with every whole-clip read forbidden: the frames come a
    chunk at a time, each latent a window (or a stepped range inside one) at a time, the decode a slice
    at a time; the output is still written, with as many frames as the clip."""
    from media import make_test_clip

    from diffferv_cli.config import ClipSpec, EditConfig, InversionConfig
    from diffferv_cli.editing import vae
    from diffferv_cli.editing.job import run_edits
    from diffferv_cli.video.io import WorkingFrames, read_clip
    from diffferv_cli.video.probe import probe

    clip = read_clip(make_test_clip(tmp_path / "c.mp4", width=96, height=64, frames=40),
                     ClipSpec(short_side=32, multiple=16))
    config = InversionConfig(steps=2, flow_preset="ultrafast", window_frames=8, window_overlap=3)

    def forbidden(*args, **kwargs):
        raise AssertionError("a whole clip was read")

    most = {"rows": 0, "frames": 0}
    rows = LatentRows.rows

    def counted_rows(self, start, stop):
        most["rows"] = max(most["rows"], min(stop, len(self)) - start)
        return rows(self, start, stop)

    chunks = WorkingFrames.chunks

    def counted_chunks(self, size=32, start=0, stop=None):
        most["frames"] = max(most["frames"], size)
        return chunks(self, size, start, stop)

    monkeypatch.setattr(WorkingFrames, "__array__", forbidden)
    monkeypatch.setattr(WorkingFrames, "chunks", counted_chunks)
    monkeypatch.setattr(CacheEntry, "read_latent", forbidden)
    monkeypatch.setattr(LatentRows, "read", forbidden)
    monkeypatch.setattr(LatentRows, "rows", counted_rows)
    monkeypatch.setattr(vae.DecodedFrames, "__array__", forbidden)
    _, written = run_edits(tiny, clip, config, [("a", EditConfig(prompt_edit="a photo of an old person"))],
                           cache_dir=tmp_path / "cache", out=tmp_path / "out.mp4")
    assert probe(written[0]).frame_count == 40
    assert most["rows"] <= 8  # a window's frames (the clip has 40)
    assert 0 < most["frames"] <= 32  # an encode chunk


def test_cache_clean_removes_the_scratch_of_runs_that_are_gone_and_only_those(tmp_path):
    import subprocess
    import sys

    from diffferv_cli.editing.cache_admin import clean
    from diffferv_cli.editing.stored import SCRATCH_FOLDER, Scratch, scratch_prefix

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / SCRATCH_FOLDER / f"{scratch_prefix(int(gone.stdout))}abc"
    dead.mkdir(parents=True)
    (dead / "x0-3.safetensors").write_bytes(b"1" * 100)
    live = Scratch(tmp_path / SCRATCH_FOLDER)  # this process's: still at work
    (live.folder / "x0-1.safetensors").write_bytes(b"2" * 10)
    other = tmp_path / SCRATCH_FOLDER / "run-another-host-1-xyz"  # another machine's run on a shared cache
    other.mkdir()
    done = clean(tmp_path)
    assert done.leftovers == [dead] and done.freed == 100
    assert live.folder.is_dir() and other.is_dir() and not dead.exists()
    live.close()
    assert not live.folder.exists()


def test_window_contexts_are_made_for_each_pass_in_the_reader_thread_and_not_kept(tiny, tmp_path, monkeypatch):
    """Every pass makes each window's attention context anew, ahead of the loop (off its thread), and
    keeps none: kept contexts would hold memory in proportion to the clip."""
    import threading
    import weakref

    from media import make_test_clip

    from diffferv_cli.config import ClipSpec, EditConfig, InversionConfig
    from diffferv_cli.editing import inversion, sampling
    from diffferv_cli.video.io import read_clip

    clip = read_clip(make_test_clip(tmp_path / "c.mp4", width=96, height=64, frames=20),
                     ClipSpec(short_side=32, multiple=16))
    config = InversionConfig(steps=2, flow_preset="ultrafast", window_frames=8, window_overlap=3)
    made, threads, alive = [], set(), []
    plan = inversion.window_plan

    def counting_plan(*args, **kwargs):
        result = plan(*args, **kwargs)
        make = result.make_context

        def making(index):
            context = make(index)
            made.append(index)
            threads.add(threading.current_thread().name)
            alive.append(weakref.ref(context))
            return context

        result.make_context = making
        return result

    monkeypatch.setattr(inversion, "window_plan", counting_plan)
    monkeypatch.setattr(sampling, "window_plan", counting_plan)
    entry = inversion.invert(tiny, clip, config, cache_dir=tmp_path / "cache").entry
    windows = len(inversion.clip_windows(20, config))
    assert made == list(range(windows)) * 2  # every window, on each of the 2 steps
    sampling.edit(tiny, entry, EditConfig(prompt_edit="a photo of an old person"), decode=False)
    assert made == list(range(windows)) * 4
    assert threading.main_thread().name not in threads
    import gc

    gc.collect()
    assert not any(ref() is not None for ref in alive)  # none kept once the passes are done
