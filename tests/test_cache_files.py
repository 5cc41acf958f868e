"""The inversion cache on its own: keys, manifest matching, hash verification, atomic files (see also test_cache.py)."""

from __future__ import annotations

import json

import pytest
import torch

from diffferv_cli.editing import cache
from diffferv_cli.editing.cache import CacheEntry, open_entry, request_key
from diffferv_cli.errors import UserError

REQUEST = {"prompt": "a photo of a person", "steps": 4, "frames": {"start": 0, "stride": 1}}


def _message(error: pytest.ExceptionInfo, *paths) -> str:
    """The error's text with the folders removed (they are named after the test and could match)."""
    text = str(error.value)
    for path in paths:
        text = text.replace(str(path), "<path>")
    return text


def _entry_with_latent(tmp_path) -> tuple[CacheEntry, torch.Tensor]:
    entry = open_entry(tmp_path, REQUEST)
    latent = torch.arange(2 * 4 * 3 * 5, dtype=torch.float32).reshape(2, 4, 3, 5) / 7
    entry.write_latent(0, latent)
    entry.save_manifest()
    return entry, latent


def test_key_depends_on_every_field_and_not_on_order():
    assert request_key(REQUEST) == request_key(dict(reversed(list(REQUEST.items()))))
    keys = {request_key(REQUEST), request_key({**REQUEST, "prompt": "a photo of a woman"}),
            request_key({**REQUEST, "steps": 5}), request_key({**REQUEST, "frames": {"start": 1, "stride": 1}})}
    assert len(keys) == 4
    assert all(len(key) == 24 and int(key, 16) >= 0 for key in keys)


def test_written_tensors_read_back_exactly_from_a_reopened_entry(tmp_path):
    entry, latent = _entry_with_latent(tmp_path)
    entry.write_features(0, {"a:app.q": torch.ones(2, 3, dtype=torch.float16)})
    entry.save_manifest()
    reopened = open_entry(tmp_path, REQUEST)
    assert reopened.folder == entry.folder == tmp_path / request_key(REQUEST)
    read = reopened.read_latent(0)
    assert read.dtype == torch.float32 and torch.equal(read, latent)
    assert torch.equal(reopened.read_features(0)["a:app.q"], torch.ones(2, 3, dtype=torch.float16))
    files = sorted(p.relative_to(entry.folder).as_posix() for p in entry.folder.rglob("*") if p.is_file())
    assert files == sorted(["manifest.json", entry.latent_name(0), entry.feature_name(0)])  # no temporaries


def test_a_changed_byte_fails_the_hash_check_even_when_the_file_still_parses(tmp_path):
    """Flip one byte of the tensor data: safetensors still reads the file, only the hash tells."""
    entry, latent = _entry_with_latent(tmp_path)
    path = entry.folder / entry.latent_name(0)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # inside the last float, not the header
    path.write_bytes(bytes(data))
    with pytest.raises(UserError) as error:
        open_entry(tmp_path, REQUEST).read_latent(0)
    message = _message(error, path, entry.folder, tmp_path)
    assert "corrupted" in message and "hash mismatch" in message and "--force" in message


def test_truncated_and_missing_files_are_named(tmp_path):
    entry, _ = _entry_with_latent(tmp_path)
    path = entry.folder / entry.latent_name(0)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(UserError) as error:
        entry.read_latent(0)
    assert "corrupted" in _message(error, path, tmp_path)
    path.unlink()
    with pytest.raises(UserError) as error:
        entry.read_latent(0)
    assert "missing latents/step-000.safetensors" in _message(error, entry.folder, tmp_path)
    with pytest.raises(UserError) as error:
        entry.read_latent(1)  # never written: not in the manifest
    assert "missing latents/step-001.safetensors" in _message(error, entry.folder, tmp_path)


def test_a_file_whose_hash_matches_but_is_not_safetensors_is_a_clear_error(tmp_path):
    import hashlib

    entry, _ = _entry_with_latent(tmp_path)
    path = entry.folder / entry.latent_name(0)
    path.write_bytes(b"not a safetensors file")
    entry.manifest["files"][entry.latent_name(0)] = hashlib.sha256(b"not a safetensors file").hexdigest()
    with pytest.raises(UserError) as error:
        entry.read_latent(0)
    assert "cannot be read" in _message(error, path, tmp_path)


def test_manifest_of_another_request_or_format_is_refused_and_force_starts_over(tmp_path):
    entry, _ = _entry_with_latent(tmp_path)
    manifest = json.loads(entry.manifest_path.read_text())
    assert manifest["format"] == cache.FORMAT_VERSION and manifest["request"] == REQUEST
    assert manifest["finished_steps"] == -1 and set(manifest["files"]) == {"latents/step-000.safetensors"}
    for change in ({"format": cache.FORMAT_VERSION - 1}, {"request": {**REQUEST, "steps": 5}}):
        entry.manifest_path.write_text(json.dumps({**manifest, **change}))
        with pytest.raises(UserError) as error:
            open_entry(tmp_path, REQUEST)
        assert "does not match" in _message(error, entry.folder, tmp_path)
    fresh = open_entry(tmp_path, REQUEST, force=True)
    assert fresh.manifest["files"] == {} and not (fresh.folder / "latents").exists()


def test_completeness_follows_the_manifest(tmp_path):
    entry = open_entry(tmp_path, REQUEST)
    assert entry.steps == 4 and entry.finished_steps == -1 and not entry.complete and not entry.has_features
    entry.manifest.update(encoded=True, finished_steps=3)
    assert not entry.complete
    entry.manifest.update(finished_steps=4, features_stored=True)
    assert entry.complete and entry.has_features
    entry.manifest.update(encoded=False)
    assert not entry.complete


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFFERV_CACHE", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_root(tmp_path / "given") == tmp_path / "given"
    assert cache.cache_root() == tmp_path / "env"
    monkeypatch.delenv("DIFFFERV_CACHE")
    assert cache.cache_root() == tmp_path / "xdg" / "diffferv"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_root() == tmp_path / "home" / ".cache" / "diffferv"


def test_the_key_of_a_request_is_stable_across_versions():
    """A request's key names its folder: if the hashing changed, every user's cached inversions would be
    silently orphaned (recomputed, the old folders left on disk). Changing it needs a FORMAT_VERSION bump."""
    assert cache.FORMAT_VERSION == 3
    assert request_key(REQUEST) == "8785f78d4ab5d31fe1f48e27"


def test_root_folders_are_created_and_an_empty_entry_folder_is_reused(tmp_path):
    root = tmp_path / "a" / "b" / "c"
    entry = open_entry(root, REQUEST)
    assert entry.manifest_path.is_file()
    other = tmp_path / "d"
    (other / request_key(REQUEST)).mkdir(parents=True)  # created, then interrupted before its manifest
    assert open_entry(other, REQUEST).manifest["finished_steps"] == -1


def test_manifest_records_key_and_iso_times(tmp_path):
    from datetime import datetime

    entry = open_entry(tmp_path, REQUEST)
    manifest = json.loads(entry.manifest_path.read_text())
    assert manifest["key"] == request_key(REQUEST)
    for field in ("created", "updated"):
        datetime.strptime(manifest[field], "%Y-%m-%dT%H:%M:%S")


def test_broken_manifest_and_manifest_without_files_are_clear_errors(tmp_path):
    entry, _ = _entry_with_latent(tmp_path)
    entry.manifest_path.write_text("{not json")
    with pytest.raises(UserError) as error:
        open_entry(tmp_path, REQUEST)
    assert "is broken" in _message(error, entry.folder, tmp_path) and "--force" in str(error.value)
    bare = CacheEntry(entry.folder, {"request": REQUEST})  # a manifest that lists no files
    with pytest.raises(UserError) as error:
        bare.read_latent(0)
    assert "missing latents/step-000.safetensors" in _message(error, entry.folder, tmp_path)


def test_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    entry, latent = _entry_with_latent(tmp_path)
    before = sorted(p.name for p in entry.folder.rglob("*"))

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache.os, "fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        entry.write_latent(0, latent + 1)
    monkeypatch.undo()
    assert sorted(p.name for p in entry.folder.rglob("*")) == before
    assert torch.equal(entry.read_latent(0), latent)


def test_disk_bytes_counts_every_file_of_the_entry(tmp_path):
    entry, _ = _entry_with_latent(tmp_path)
    sizes = [p.stat().st_size for p in entry.folder.rglob("*") if p.is_file()]
    assert len(sizes) == 2 and entry.disk_bytes() == sum(sizes) > 4 * 120


def test_trajectory_links_round_trip_through_the_cache(tmp_path):
    """Non-square grids keep their (height, width) and every link, for a clip of 3 frames."""
    from diffferv_cli.temporal.trajectories import ClipLinks

    links = {(2, 3): torch.tensor([[-1, 0, 4, -1, 2, 5], [1, -1, -1, 3, 0, 2]], dtype=torch.int32),
             (1, 2): torch.tensor([[1, -1], [-1, 0]], dtype=torch.int32)}
    entry = open_entry(tmp_path, REQUEST)
    entry.write_trajectories(cache.links_to_tensors(ClipLinks(3, links)))
    entry.manifest.update(frames=3, latent_size=[2, 3])  # trajectories are written with these
    entry.save_manifest()
    read = cache.links_from_tensors(open_entry(tmp_path, REQUEST).read_trajectories(), frames=3)
    assert read.frames == 3 and set(read.links) == set(links)
    for size, grid_links in links.items():
        assert read.links[size].dtype == torch.int32 and torch.equal(read.links[size], grid_links)


def test_features_are_kept_per_step_and_window(tmp_path):
    entry = open_entry(tmp_path, REQUEST)
    for step in range(2):
        for window in range(2):
            entry.write_features(step, {"a:cross": torch.full((2,), 10.0 * step + window)}, window=window)
    for step in range(2):
        for window in range(2):
            assert entry.read_features(step, window=window)["a:cross"].tolist() == [10.0 * step + window] * 2
    assert entry.read_features(1)["a:cross"].tolist() == [10.0, 10.0]  # window 0 by default


def test_a_cache_root_that_is_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "root").write_text("not a folder")
    with pytest.raises(UserError) as error:
        open_entry(tmp_path / "root", REQUEST)
    assert _message(error, tmp_path).startswith("Cannot create the cache folder") and "--cache-dir" in str(error.value)
