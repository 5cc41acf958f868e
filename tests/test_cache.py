"""The inversion cache: one latent path for both feature modes, keying on decoded frames, locking between
processes, and entries that are refused (NaN, wrong types)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save

from diffferv_cli.config import ClipSpec, EditConfig, InversionConfig
from diffferv_cli.editing.cache import entry_lock, frames_sha256, open_entry
from diffferv_cli.editing.inversion import cache_request, invert
from diffferv_cli.editing.sampling import edit
from diffferv_cli.errors import UserError

REPO = Path(__file__).resolve().parents[1]
STEPS = 3
SPEC = ClipSpec(short_side=64, multiple=16, frames=3)


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    from media import make_test_clip

    return make_test_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", width=96, height=64, frames=5, fps=24)


@pytest.fixture(scope="module")
def clip(clip_path):
    from diffferv_cli.video.io import read_clip

    return read_clip(clip_path, SPEC)


def _inversion(**changes) -> InversionConfig:
    return InversionConfig(steps=STEPS, flow_preset="ultrafast", **changes)


@pytest.fixture(scope="module")
def inverted(tiny, clip, tmp_path_factory) -> Path:
    """A cache folder holding the finished inversion of `clip` (copy it before changing it)."""
    root = tmp_path_factory.mktemp("inverted")
    invert(tiny, clip, _inversion(), cache_dir=root)
    return root


def _copy_of(inverted: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(inverted, tmp_path / "cache"))


# -------------------------------------------------------------------------------------- feature modes


def test_both_feature_modes_write_the_same_latents(tiny, clip, inverted, tmp_path):
    """An entry made in disk mode holds the very latents recompute mode makes, so an edit gives the same
    bytes whichever mode created the entry it reads."""
    by_recompute = invert(tiny, clip, _inversion(), cache_dir=inverted).entry
    by_disk = invert(tiny, clip, _inversion(feature_mode="disk"), cache_dir=tmp_path / "b").entry
    assert by_disk.has_features and not by_recompute.has_features
    assert by_recompute.folder.name == by_disk.folder.name  # one key for both modes
    latents = {name: digest for name, digest in by_recompute.manifest["files"].items() if name.startswith("latents/")}
    assert len(latents) == STEPS + 1
    assert all(by_disk.manifest["files"][name] == digest for name, digest in latents.items())
    config = EditConfig(prompt_edit="a photo of an old person")
    assert edit(tiny, by_recompute, config).frames.tobytes() == edit(tiny, by_disk, config).frames.tobytes()


# ---------------------------------------------------------------------------------------------- key


def test_key_follows_the_decoded_frames_not_the_file(tiny, clip, clip_path, inverted, tmp_path):
    from diffferv_cli.video.io import read_clip

    cache = _copy_of(inverted, tmp_path)
    first = invert(tiny, clip, _inversion(), cache_dir=cache)
    copy = tmp_path / "renamed copy.mp4"
    shutil.copy(clip_path, copy)
    os.utime(copy, (1_000_000, 1_000_000))
    with open(copy, "ab") as handle:  # bytes after the container's end change the file, not the frames
        handle.write(b"\0" * 64)
    again = invert(tiny, read_clip(copy, SPEC), _inversion(), cache_dir=cache)
    assert again.steps_run == 0 and again.entry.folder == first.entry.folder

    later = read_clip(clip_path, SPEC.model_copy(update={"start": 1}))  # other frames, same file
    assert cache_request(later, tiny, _inversion()) != cache_request(clip, tiny, _inversion())
    assert cache_request(later, tiny, _inversion())["frames_sha256"] != first.entry.manifest["request"]["frames_sha256"]


def test_frames_hash_sees_one_pixel_shape_and_dtype():
    frames = np.zeros((2, 4, 6, 3), np.uint8)
    changed = frames.copy()
    changed[1, 3, 5, 2] = 1
    digests = {frames_sha256(frames), frames_sha256(changed), frames_sha256(frames.reshape(2, 6, 4, 3)),
               frames_sha256(frames.astype(np.uint16))}
    assert len(digests) == 4
    assert frames_sha256(np.asfortranarray(frames)) == frames_sha256(frames)  # memory layout is not content


# --------------------------------------------------------------------------------------- bad entries


def _rewrite_latent(entry, index: int, latent: torch.Tensor) -> None:
    """Replace a latent file and fix its hash in the manifest, as a tampering tool would."""
    import hashlib

    data = save({"latent": latent})
    (entry.folder / entry.latent_name(index)).write_bytes(data)
    entry.manifest["files"][entry.latent_name(index)] = hashlib.sha256(data).hexdigest()
    entry.save_manifest()


def test_a_cached_latent_holding_nan_is_refused(tiny, clip, inverted, tmp_path):
    cache = _copy_of(inverted, tmp_path)
    entry = invert(tiny, clip, _inversion(), cache_dir=cache).entry
    poisoned = entry.read_latent(STEPS).clone()
    poisoned[0, 0, 0, 0] = float("nan")
    _rewrite_latent(entry, STEPS, poisoned)
    reopened = invert(tiny, clip, _inversion(), cache_dir=cache).entry  # the hash matches
    with pytest.raises(UserError, match="NaN or infinite.*--force"):
        edit(tiny, reopened, EditConfig(prompt_edit="a photo of an old person"))
    assert invert(tiny, clip, _inversion(), cache_dir=cache, force=True).steps_run == STEPS


def test_a_non_finite_latent_is_never_written(tiny, clip, inverted, tmp_path):
    entry = invert(tiny, clip, _inversion(), cache_dir=_copy_of(inverted, tmp_path)).entry
    before = (entry.folder / entry.latent_name(1)).read_bytes()
    with pytest.raises(UserError, match="NaN or infinite latents at step 1"):
        entry.write_latent(1, torch.full((3, 4, 8, 12), float("inf")))
    assert (entry.folder / entry.latent_name(1)).read_bytes() == before


@pytest.mark.parametrize("field, value", [("finished_steps", "3"), ("files", ["a"]), ("latent_size", None),
                                          ("latent_size", [8]), ("encoded", 1), ("timesteps", "all")])
def test_a_manifest_field_of_the_wrong_type_is_a_clear_error(tiny, clip, inverted, tmp_path, field, value):
    cache = _copy_of(inverted, tmp_path)
    manifest_path = next(cache.glob("*/manifest.json"))
    manifest = json.loads(manifest_path.read_text())
    manifest[field] = value
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"manifest .* is broken .*--force"):
        invert(tiny, clip, _inversion(), cache_dir=cache)


# ------------------------------------------------------------------------------------------- locking


def test_a_second_run_waits_for_the_lock_then_reuses_the_entry(tiny, clip, inverted, tmp_path, caplog):
    import threading

    cache = tmp_path / "cache"
    request = cache_request(clip, tiny, _inversion())
    outcome = {}
    with entry_lock(cache, request):
        waiter = threading.Thread(target=lambda: outcome.update(run=invert(tiny, clip, _inversion(), cache_dir=cache)))
        waiter.start()
        deadline = time.monotonic() + 30
        while "waiting" not in caplog.text:
            assert time.monotonic() < deadline and waiter.is_alive()
            time.sleep(0.05)
        assert not list(cache.glob("*/manifest.json"))  # nothing written while the lock is held elsewhere
        shutil.copytree(inverted, cache, dirs_exist_ok=True)  # the holder finishes the entry
    waiter.join(timeout=60)
    assert outcome["run"].steps_run == 0  # reused, not recomputed
    assert "Another diffferv run is working on the cache entry" in caplog.text


def _cli_invert(clip_path: Path, cache: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "COLUMNS": "200"}
    args = [sys.executable, "-m", "diffferv_cli", "invert", str(clip_path), "--model", "tiny-random", "--size", "64",
            "--frames", str(SPEC.frames), "--steps", str(STEPS), "--flow-preset", "ultrafast", "--cache-dir", str(cache),
            "--device", "cpu"]
    with open(log, "wb") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)


@pytest.mark.slow
def test_two_processes_on_one_entry_wait_and_reuse(tiny, clip, clip_path, tmp_path):
    """Two real `diffferv invert` processes on the same clip while the entry is locked: both say they wait;
    once the lock is free one inverts and the other reuses the finished entry."""
    cache = tmp_path / "cache"
    request = cache_request(clip, tiny, _inversion())  # what the CLI asks for, as the CLI builds it
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    with entry_lock(cache, request):
        runs = [_cli_invert(clip_path, cache, log) for log in logs]
        deadline = time.monotonic() + 120
        while not all("waiting" in log.read_text(errors="replace") for log in logs):
            assert all(run.poll() is None for run in runs), [log.read_text() for log in logs]
            assert time.monotonic() < deadline, [log.read_text() for log in logs]
            time.sleep(0.2)
    outputs = []
    for run, log in zip(runs, logs, strict=True):
        assert run.wait(timeout=120) == 0, log.read_text()
        outputs.append(" ".join(log.read_text().split()))
    assert sorted("reused (already cached)" in text for text in outputs) == [False, True], outputs
    assert sum(f"{STEPS} steps run" in text for text in outputs) == 1, outputs
    entry = open_entry(cache, request)
    assert entry.complete and all(torch.isfinite(entry.read_latent(i)).all() for i in range(STEPS + 1))
