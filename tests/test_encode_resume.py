"""An interrupted VAE encode keeps its finished chunks in the cache entry; the rerun encodes only the rest
and ends on the same z_0, bit for bit."""

from __future__ import annotations

import pytest
import torch
from media import make_test_clip

import diffferv_cli.editing.inversion as inversion
from diffferv_cli.config import ClipSpec, InversionConfig
from diffferv_cli.editing.vae import encode_frames
from diffferv_cli.errors import Interrupted

CONFIG = InversionConfig(steps=1, flow_preset="ultrafast")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from diffferv_cli.video.io import read_clip

    path = make_test_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", width=96, height=64, frames=10)
    return read_clip(path, ClipSpec(short_side=64, multiple=16))


@pytest.fixture
def encoded(monkeypatch):
    """Records the frames each encode call gets; `encoded.stop_after = k` interrupts the call after k."""
    calls: list[int] = []

    def encode(vae, frames, *args, **kwargs):
        if len(calls) == encode.stop_after:
            raise KeyboardInterrupt
        calls.append(len(frames))
        return encode_frames(vae, frames, *args, **kwargs)

    encode.stop_after, encode.calls = None, calls
    monkeypatch.setattr(inversion, "encode_frames", encode)
    monkeypatch.setattr(inversion, "ENCODE_CHUNK_FRAMES", 4)  # 10 frames: chunks of 4, 4, 2
    return encode


def test_an_interrupted_encode_resumes_where_it_stopped_and_gives_the_same_z0(tiny, clip, tmp_path, encoded):
    assert len(clip.frames) == 10
    reference = inversion.invert(tiny, clip, CONFIG, cache_dir=tmp_path / "whole").entry.read_latent(0)
    assert encoded.calls == [4, 4, 2]
    # one uninterrupted encode of the whole clip (what z_0 was before chunks) gives the same bits
    assert torch.equal(reference, encode_frames(tiny.vae, clip.frames))

    encoded.calls.clear()
    encoded.stop_after = 2
    with pytest.raises(Interrupted) as interrupt:
        inversion.invert(tiny, clip, CONFIG, cache_dir=tmp_path / "cut")
    assert interrupt.value.kept == "the flow and 8 of 10 encoded frames are kept"

    encoded.calls.clear()
    encoded.stop_after = None
    resumed = inversion.invert(tiny, clip, CONFIG, cache_dir=tmp_path / "cut")
    assert encoded.calls == [2]  # only the frames the interrupted run had not encoded
    assert resumed.steps_run == CONFIG.steps
    assert torch.equal(resumed.entry.read_latent(0), reference)
    manifest = resumed.entry.manifest
    assert "encoded_frames" not in manifest and not any("encoded-" in name for name in manifest["files"])
    assert not list((resumed.entry.folder / "latents").glob("encoded-*"))  # the chunks are gone


def test_a_lost_chunk_is_encoded_again(tiny, clip, tmp_path, encoded):
    """A power cut can lose a chunk written without fsync: the manifest counts it, the file is gone."""
    encoded.stop_after = 2
    with pytest.raises(Interrupted):
        inversion.invert(tiny, clip, CONFIG, cache_dir=tmp_path)
    chunk = next((tmp_path).glob("*/latents/encoded-000004.safetensors"))
    chunk.unlink()
    encoded.calls.clear()
    encoded.stop_after = None
    resumed = inversion.invert(tiny, clip, CONFIG, cache_dir=tmp_path)
    assert encoded.calls == [4, 2]
    assert torch.equal(resumed.entry.read_latent(0), encode_frames(tiny.vae, clip.frames))


def test_an_interrupt_during_the_steps_names_them(tiny, clip, tmp_path):
    def stop_in_step_2(stage, done, total):
        if stage.startswith("invert") and done > total // 2:
            raise KeyboardInterrupt

    config = CONFIG.model_copy(update={"steps": 2})
    with pytest.raises(Interrupted) as interrupt:
        inversion.invert(tiny, clip, config, cache_dir=tmp_path, progress=stop_in_step_2)
    assert interrupt.value.kept == "the flow, the encoded frames and 1 of 2 inversion steps are kept"


def test_the_cli_says_what_an_interrupt_kept_and_calls_it_no_error(clip, tmp_path, encoded):
    from typer.testing import CliRunner

    from diffferv_cli.cli import app

    encoded.stop_after = 1
    args = ["invert", str(clip.info.path), "--model", "tiny-random", "--size", "64", "--steps", "1",
            "--flow-preset", "ultrafast", "--cache-dir", str(tmp_path), "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 130, result.output
    assert "Interrupted: the flow and 4 of 10 encoded frames are kept; the same command resumes." in result.output
    assert "Error" not in result.output
    encoded.stop_after = None
    assert CliRunner().invoke(app, args).exit_code == 0
    assert encoded.calls == [4, 4, 2]  # the first chunk was kept
