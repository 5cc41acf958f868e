"""The main job on the tiny model: inversion cache, edit sampling, feature modes, exact reconstruction."""

from __future__ import annotations

import json
import os

import pytest
import torch
from media import make_test_clip

from diffferv_cli.config import ClipSpec, EditConfig, InversionConfig
from diffferv_cli.editing.inversion import invert
from diffferv_cli.editing.sampling import edit
from diffferv_cli.errors import UserError

STEPS = 4
SPEC = ClipSpec(short_side=64, multiple=16, frames=4)


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    return make_test_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", width=96, height=64, frames=6, fps=24,
                          audio=True)


@pytest.fixture(scope="module")
def clip(clip_path):
    from diffferv_cli.video.io import read_clip

    return read_clip(clip_path, SPEC)


def _inversion(**changes) -> InversionConfig:
    return InversionConfig(**{"steps": STEPS, "flow_preset": "ultrafast", **changes})


def test_invert_then_edit_is_deterministic_and_reuses_the_cache(tiny, clip, tmp_path):
    outcome = invert(tiny, clip, _inversion(), cache_dir=tmp_path)
    assert outcome.steps_run == STEPS and outcome.entry.complete
    again = invert(tiny, clip, _inversion(), cache_dir=tmp_path)
    assert again.steps_run == 0 and again.entry.folder == outcome.entry.folder  # no inversion pass ran
    config = EditConfig(prompt_edit="a photo of an old person", tau_app=0.5)
    first = edit(tiny, outcome.entry, config)
    second = edit(tiny, again.entry, config)
    assert first.frames.shape == (4, 64, 96, 3)
    assert first.frames.tobytes() == second.frames.tobytes()
    assert first.branches == ("source", "negative", "positive")


@pytest.mark.parametrize("threads", [1, 2])
def test_recompute_and_disk_modes_give_the_same_frames(tiny, clip, tmp_path, threads):
    """The two modes compute the source features in batches of different shapes, so float32 rounding
    differs with the CPU's kernels (and thread count): equal to float tolerance, relative to the latents'
    size. A pairing bug (features of the wrong step or branch) moves the latents by ~0.4."""
    config = EditConfig(prompt_edit="a photo of a smiling person", tau_app=0.7)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        recompute = invert(tiny, clip, _inversion(), cache_dir=tmp_path)
        from_recompute = edit(tiny, recompute.entry, config, feature_mode="recompute")
        disk = invert(tiny, clip, _inversion(feature_mode="disk"), cache_dir=tmp_path)
        assert disk.entry.has_features
        from_disk = edit(tiny, disk.entry, config, feature_mode="disk")
    finally:
        torch.set_num_threads(previous)
    assert "source" not in from_disk.branches
    diff = (from_recompute.latents - from_disk.latents).abs().max().item()
    scale = from_recompute.latents.abs().max().item()
    print(f"recompute vs disk ({threads} threads): max |latent diff| = {diff:.2e}, relative {diff / scale:.2e}")
    assert diff <= 1e-4 * scale


def test_disk_mode_with_features_of_the_wrong_step_is_caught(tiny, clip, tmp_path):
    """The bound above is tight enough to see a real pairing bug."""
    config = EditConfig(prompt_edit="a photo of a smiling person", tau_app=1.0)
    entry = invert(tiny, clip, _inversion(feature_mode="disk"), cache_dir=tmp_path).entry
    good = edit(tiny, entry, config, feature_mode="recompute")
    read_features = entry.read_features
    entry.read_features = lambda step, window=0: read_features(min(step + 1, STEPS - 1), window)  # off by one step
    shifted = edit(tiny, entry, config, feature_mode="disk")
    diff = (good.latents - shifted.latents).abs().max().item()
    assert diff > 1e-4 * good.latents.abs().max().item() * 10


def test_exact_reconstruction_beats_plain_ddim(tiny, clip, tmp_path):
    entry = invert(tiny, clip, _inversion(), cache_dir=tmp_path).entry
    z0 = entry.read_latent(0)
    source = entry.manifest["request"]["prompt"]
    exact = edit(tiny, entry, EditConfig(prompt_edit=source, exact=True))
    plain = edit(tiny, entry, EditConfig(prompt_edit=source, inject=False))
    exact_error = (exact.latents - z0).abs().max().item()
    plain_error = (plain.latents - z0).abs().max().item()
    print(f"latent max error: exact {exact_error:.2e}, plain DDIM {plain_error:.2e}")
    assert exact_error <= 1e-5
    assert plain_error > 100 * max(exact_error, 1e-7)


def test_injection_brings_reconstruction_closer(clip, tmp_path):
    """Reconstruction (edit prompt = source prompt) with preservation features is closer to the input than
    plain DDIM. Random weights give near-uniform attention, which no feature can steer, so this uses the
    tiny model with its query/key projections scaled up: attention as peaked as a trained model's."""
    from diffusers.models.attention_processor import Attention

    from diffferv_cli.models.tiny import build_tiny_random

    peaked = build_tiny_random(seed=0)
    for module in peaked.unet.modules():
        if isinstance(module, Attention):
            module.to_q.weight.data *= 4.0
            module.to_k.weight.data *= 4.0
    peaked.fingerprint += "-peaked"
    entry = invert(peaked, clip, _inversion(), cache_dir=tmp_path).entry
    z0 = entry.read_latent(0)
    source = entry.manifest["request"]["prompt"]
    injected = edit(peaked, entry, EditConfig(prompt_edit=source, tau_app=1.0))
    plain = edit(peaked, entry, EditConfig(prompt_edit=source, inject=False))
    injected_mse = ((injected.latents - z0) ** 2).mean().item()
    plain_mse = ((plain.latents - z0) ** 2).mean().item()
    print(f"reconstruction latent MSE: injected {injected_mse:.4e}, plain DDIM {plain_mse:.4e}")
    assert injected_mse < 0.8 * plain_mse


def test_changed_inputs_make_new_cache_entries(tiny, clip, clip_path, tmp_path):
    from diffferv_cli.models.tiny import build_tiny_random
    from diffferv_cli.video.io import read_clip

    base = invert(tiny, clip, _inversion(), cache_dir=tmp_path).entry.folder
    folders = {base}
    folders.add(invert(tiny, clip, _inversion(prompt="a photo of a woman"), cache_dir=tmp_path).entry.folder)
    folders.add(invert(tiny, clip, InversionConfig(steps=STEPS + 1, flow_preset="ultrafast"), cache_dir=tmp_path).entry.folder)
    folders.add(invert(build_tiny_random(seed=1), clip, _inversion(), cache_dir=tmp_path).entry.folder)
    other = make_test_clip(tmp_path / "other.mp4", width=96, height=64, frames=6, fps=24, pattern="testsrc")
    folders.add(invert(tiny, read_clip(other, SPEC), _inversion(), cache_dir=tmp_path).entry.folder)
    assert len(folders) == 5


def test_corrupted_latent_file_is_a_clear_error(tiny, clip, tmp_path):
    entry = invert(tiny, clip, _inversion(), cache_dir=tmp_path).entry
    latent_file = entry.folder / entry.latent_name(STEPS)
    latent_file.write_bytes(latent_file.read_bytes()[:100])  # truncated
    with pytest.raises(UserError) as error:
        edit(tiny, entry, EditConfig(prompt_edit="a photo of an old person"))
    message = str(error.value).replace(str(tmp_path), "")  # the folder is named after this test
    assert "corrupted" in message and "hash mismatch" in message


def test_broken_manifest_is_a_clear_error(tiny, clip, tmp_path):
    entry = invert(tiny, clip, _inversion(), cache_dir=tmp_path).entry
    entry.manifest_path.write_text("{not json")
    with pytest.raises(UserError, match="--force"):
        invert(tiny, clip, _inversion(), cache_dir=tmp_path)
    fresh = invert(tiny, clip, _inversion(), cache_dir=tmp_path, force=True)
    assert fresh.steps_run == STEPS and json.loads(fresh.entry.manifest_path.read_text())["finished_steps"] == STEPS


def test_interrupted_inversion_resumes_to_the_same_result(tiny, clip, tmp_path):
    reference = invert(tiny, clip, _inversion(), cache_dir=tmp_path / "a").entry

    def interrupt_at_step_2(stage, done, total):  # invert reports frame passes, after each window
        if stage.startswith("invert") and done > 2 * total // STEPS:  # step 3 under way, 2 finished
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        invert(tiny, clip, _inversion(), cache_dir=tmp_path / "b", progress=interrupt_at_step_2)
    resumed = invert(tiny, clip, _inversion(), cache_dir=tmp_path / "b")
    assert resumed.steps_run == STEPS - 2
    for index in range(STEPS + 1):
        assert torch.equal(resumed.entry.read_latent(index), reference.read_latent(index))


def _count_flushes(monkeypatch) -> list[int]:
    """Counts every flush to the disk diffferv asks for: fsync calls and syncfs calls."""
    import diffferv_cli.files as files_module

    calls = [0]
    real_fsync, real_syncfs = files_module.os.fsync, files_module._syncfs

    def fsync(handle):
        calls[0] += 1
        return real_fsync(handle)

    def syncfs(folder):
        calls[0] += 1
        return real_syncfs(folder)

    monkeypatch.setattr(files_module.os, "fsync", fsync)
    monkeypatch.setattr(files_module, "_syncfs", syncfs)
    return calls


@pytest.mark.parametrize("feature_mode", ["recompute", "disk"])
def test_step_files_are_flushed_in_group_commits_not_per_step(tiny, clip, tmp_path, monkeypatch, feature_mode):
    """Flushes per inversion do not grow with the number of steps (one group commit at the end when the
    run is shorter than DURABLE_EVERY_S); with a commit after every step they do."""
    import diffferv_cli.editing.inversion as inversion
    import diffferv_cli.files as files_module

    if not files_module._syncfs(tmp_path):
        pytest.skip("no syncfs(2) here: a group commit flushes file by file")
    monkeypatch.setattr(inversion, "DURABLE_EVERY_S", 1e9)
    counts = {}
    for steps in (2, 6):
        calls = _count_flushes(monkeypatch)
        invert(tiny, clip, _inversion(steps=steps, feature_mode=feature_mode), cache_dir=tmp_path / f"{steps}")
        counts[steps] = calls[0]
    assert counts[2] == counts[6]
    monkeypatch.setattr(inversion, "DURABLE_EVERY_S", 0.0)
    calls = _count_flushes(monkeypatch)
    entry = invert(tiny, clip, _inversion(steps=6, feature_mode=feature_mode), cache_dir=tmp_path / "every").entry
    assert calls[0] >= counts[6] + 5 * 2  # each step: its files, then the manifest
    assert entry.manifest["durable_steps"] == 6


def test_a_group_commit_without_syncfs_flushes_each_file_and_folder(tmp_path, monkeypatch):
    import diffferv_cli.files as files_module

    (tmp_path / "a").mkdir()
    paths = [tmp_path / "a" / "1", tmp_path / "a" / "2", tmp_path / "3"]
    for path in paths:
        path.write_bytes(b"x")
    monkeypatch.setattr(files_module, "_syncfs", lambda folder: False)
    flushed = []
    monkeypatch.setattr(files_module.os, "fsync", lambda handle: flushed.append(os.readlink(f"/proc/self/fd/{handle}")))
    files_module.flush_files(paths)
    assert sorted(flushed) == sorted([*map(str, paths), str(tmp_path / "a"), str(tmp_path)])


@pytest.mark.parametrize("lost", ["deleted", "torn"])
def test_resume_after_a_power_cut_redoes_the_steps_whose_files_were_lost(tiny, clip, tmp_path, lost):
    """A manifest that names steps after its last group commit whose files did not reach the disk (a
    power cut): the resume goes back to the last step whose file holds and recomputes from there, to
    the same latents as an uninterrupted run."""
    reference = invert(tiny, clip, _inversion(), cache_dir=tmp_path / "a").entry
    entry = invert(tiny, clip, _inversion(), cache_dir=tmp_path / "b").entry
    entry.manifest["durable_steps"] = 1  # as if the last group commit had been after step 1
    entry.save_manifest()
    broken = entry.folder / entry.latent_name(3)
    if lost == "deleted":
        broken.unlink()
    else:
        broken.write_bytes(broken.read_bytes()[:-7])
    entry.manifest["finished_steps"] = STEPS - 1  # the run was cut during the last step
    entry.save_manifest()
    resumed = invert(tiny, clip, _inversion(), cache_dir=tmp_path / "b")
    assert resumed.steps_run == STEPS - 2  # steps 3 and 4 recomputed, 1 and 2 kept
    assert resumed.entry.manifest["durable_steps"] == STEPS
    for index in range(STEPS + 1):
        assert torch.equal(resumed.entry.read_latent(index), reference.read_latent(index))


def test_resume_keeps_every_step_whose_file_holds(tiny, clip, tmp_path):
    """Steps after the last group commit whose files are intact are not recomputed."""
    entry = invert(tiny, clip, _inversion(), cache_dir=tmp_path).entry
    entry.manifest.update(durable_steps=0, finished_steps=STEPS - 1)
    entry.save_manifest()
    assert invert(tiny, clip, _inversion(), cache_dir=tmp_path).steps_run == 1


def test_a_resume_checks_only_the_step_files_after_the_last_group_commit(tiny, clip, tmp_path, monkeypatch):
    """`roll_back_unverified` hashes the step files (latents, disk-mode features) written after the last
    group commit, nothing before it; intact files keep their steps."""
    from diffferv_cli.editing.cache import CacheEntry
    from diffferv_cli.editing.inversion import roll_back_unverified

    entry = invert(tiny, clip, _inversion(feature_mode="disk"), cache_dir=tmp_path).entry
    assert (entry.manifest["durable_steps"], entry.manifest["durable_feature_steps"]) == (STEPS, STEPS)
    checked, holds = [], CacheEntry.holds
    monkeypatch.setattr(CacheEntry, "holds", lambda self, name: checked.append(name) or holds(self, name))
    roll_back_unverified(entry)
    assert checked == []
    entry.manifest.update(durable_steps=2, durable_feature_steps=1)
    roll_back_unverified(entry)
    assert checked == [entry.latent_name(3), entry.latent_name(4),
                       entry.feature_name(1, 0), entry.feature_name(2, 0), entry.feature_name(3, 0)]
    assert (entry.finished_steps, entry.manifest["feature_steps"], entry.manifest["features_stored"]) == (STEPS, STEPS, True)
    (entry.folder / entry.latent_name(STEPS)).unlink()  # the last latent lost, every feature file intact
    roll_back_unverified(entry)
    assert (entry.finished_steps, entry.manifest["feature_steps"], entry.manifest["features_stored"]) == (
        STEPS - 1, STEPS, True)


def test_latents_are_float32_and_cache_is_small(tiny, clip, tmp_path):
    entry = invert(tiny, clip, _inversion(), cache_dir=tmp_path).entry
    assert entry.read_latent(0).dtype == torch.float32
    frames = entry.manifest["frames"]
    per_frame = entry.disk_bytes() / frames
    latent_bytes = 4 * 4 * 8 * 12 * (STEPS + 1)
    assert per_frame < latent_bytes + 20_000  # latents plus a little manifest and trajectories


def test_edit_prompt_word_alignment(tiny):
    from diffferv_cli.editing.prompts import token_alignment

    tok = tiny.tokenizer
    mapping = token_alignment(tok, "a photo of a person", "a photo of an old person")
    source_ids = tok("a photo of a person", padding="max_length", max_length=77).input_ids
    edit_ids = tok("a photo of an old person", padding="max_length", max_length=77).input_ids
    shared = (mapping >= 0).nonzero().squeeze(1).tolist()
    for position in shared:
        assert edit_ids[position] == source_ids[mapping[position]]
    old = tok("old", add_special_tokens=False).input_ids
    assert any(mapping[p] == -1 for p in range(len(edit_ids)) if edit_ids[p] in old)
    identity = token_alignment(tok, "a photo of a person", "a photo of a person")
    assert torch.equal(identity, torch.arange(77))


def test_cli_edit_end_to_end(clip_path, tmp_path):
    from typer.testing import CliRunner

    from diffferv_cli.cli import app
    from diffferv_cli.video.geometry import SourceFrames
    from diffferv_cli.video.probe import probe

    out = tmp_path / "edited.mp4"
    args = ["edit", str(clip_path), "--preset", "age", "--model", "tiny-random", "--size", "64", "--steps", "2",
            "--frames", "4", "--flow-preset", "ultrafast", "--cache-dir", str(tmp_path / "cache"), "-o", str(out),
            "--device", "cpu", "--side-by-side"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    source, edited = probe(clip_path), probe(out)
    assert edited.frame_count == 4
    assert (edited.width, edited.height) == (source.width, source.height)
    assert abs(edited.fps - source.fps) < 1e-3
    assert edited.has_audio
    assert edited.source_frames == SourceFrames(start=0, stride=1, count=4, source_count=6)
    side = probe(out.with_suffix(".side-by-side.mp4"))
    assert (side.width, side.height, side.frame_count) == (2 * source.width, source.height, 4)
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "already exists" in again.output
    rerun = CliRunner().invoke(app, [*args, "--overwrite"])
    assert rerun.exit_code == 0 and "cached inversion" in rerun.output


def test_an_existing_side_by_side_is_refused_before_any_work(clip_path, tmp_path):
    from typer.testing import CliRunner

    from diffferv_cli.cli import app

    out = tmp_path / "edited.mp4"
    side = tmp_path / "edited.side-by-side.mp4"
    side.write_bytes(b"an earlier comparison")
    args = ["edit", str(clip_path), "--preset", "age", "--model", "tiny-random", "--size", "64", "--steps", "2",
            "--frames", "2", "--flow-preset", "ultrafast", "--cache-dir", str(tmp_path / "cache"), "-o", str(out),
            "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--side-by-side"])
    assert result.exit_code == 2 and "edited.side-by-side.mp4 already exists" in " ".join(result.output.split())
    assert side.read_bytes() == b"an earlier comparison"
    assert not out.exists() and not (tmp_path / "cache").exists()  # refused before inverting


def test_cli_reconstruct_prints_metrics(clip_path, tmp_path):
    from typer.testing import CliRunner

    from diffferv_cli.cli import app

    args = ["reconstruct", str(clip_path), "--model", "tiny-random", "--size", "64", "--steps", "2", "--frames",
            "3", "--flow-preset", "ultrafast", "--cache-dir", str(tmp_path / "cache"), "-o",
            str(tmp_path / "rec.mp4"), "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for label in ("vae round trip", "injected (paper)", "PSNR"):
        assert label in result.output
    assert "exact" not in result.output and "plain DDIM" not in result.output  # the paper's path alone
    assert (tmp_path / "rec.mp4").is_file()
    compared = CliRunner().invoke(app, [*args, "--overwrite", "--compare"])
    assert compared.exit_code == 0, compared.output
    for label in ("injected (paper)", "exact", "plain DDIM"):
        assert label in compared.output
    both = CliRunner().invoke(app, [*args, "--overwrite", "--plain", "--exact"])
    assert both.exit_code == 2 and "exclude" in both.output


@pytest.mark.parametrize("args, named", [
    (["--preset", "man", "--subject", "man"], ["'man'"]),
    (["--preset", "woman", "--subject", "woman"], ["'woman'"]),
    (["--prompt-edit", "a photo of a person"], ["a photo of a person"]),
])
def test_cli_edit_that_edits_nothing_is_an_error(clip_path, tmp_path, args, named):
    from typer.testing import CliRunner

    from diffferv_cli.cli import app

    result = CliRunner().invoke(app, ["edit", str(clip_path), *args, "--model", "tiny-random", "--size", "64",
                                      "--cache-dir", str(tmp_path / "c"), "-o", str(tmp_path / "o.mp4")])
    assert result.exit_code == 2, result.output
    assert "Nothing to edit" in result.output and all(word in result.output for word in named)
    assert not (tmp_path / "o.mp4").exists() and not (tmp_path / "c").exists()  # no work done


def test_cli_help_explains_injection_switches():
    from typer.testing import CliRunner

    from diffferv_cli.cli import app

    result = CliRunner().invoke(app, ["edit", "--help"], env={"COLUMNS": "200"})
    text = " ".join(result.output.split())
    assert result.exit_code == 0
    assert "--seed" not in text  # DDIM with eta = 0 has no randomness
    assert "stays on with --tau-app 0" in text and "Turn all injection off" in text


@pytest.mark.parametrize("args, message", [
    (["edit", "{clip}", "--model", "tiny-random"], "--preset"),
    (["edit", "{clip}", "--preset", "no-such-preset", "--model", "tiny-random"], "no-such-preset"),
    (["edit", "{missing}", "--preset", "age", "--model", "tiny-random"], "missing.mp4"),
    (["edit", "{clip}", "--preset", "age", "--model", "tiny-random", "-o", "{clip}"], "input"),
    (["invert", "{clip}", "--model", "tiny-random", "--features", "ram"], "--features"),
])
def test_cli_bad_input_is_one_line_exit_2(clip_path, tmp_path, args, message):
    from typer.testing import CliRunner

    from diffferv_cli.cli import app

    filled = [a.format(clip=clip_path, missing=tmp_path / "missing.mp4") for a in args]
    result = CliRunner().invoke(app, [*filled, "--cache-dir", str(tmp_path / "c"), "--size", "64"])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_model_not_available_is_exit_2(clip_path, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from diffferv_cli.cli import app

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    result = CliRunner().invoke(app, ["invert", str(clip_path), "--model", "nobody/nothing", "--size", "64",
                                      "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 2 and "--model" in result.output

