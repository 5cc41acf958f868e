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
    with pytest.raises(UserError, match="Cannot write the cache file .*step-000.safetensors: no space left"):
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
    # links stored in another integer type (a file of an older writer) still come back as int32
    wide = cache.links_from_tensors({f"{h}x{w}.links": t.long().flatten() for (h, w), t in links.items()}, frames=3)
    assert all(wide.links[size].dtype == torch.int32 and torch.equal(wide.links[size], t) for size, t in links.items())


def _recorded_fsyncs(monkeypatch) -> list[str]:
    """The paths of every file or folder fsync'ed from now on, in order (the fsyncs still happen)."""
    import os

    flushed, real_fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda handle: flushed.append(os.readlink(f"/proc/self/fd/{handle}"))
                        or real_fsync(handle))
    return flushed


def test_tensor_files_are_flushed_to_the_disk_unless_told_otherwise(tmp_path, monkeypatch):
    """Latents, features and trajectories are durable by default; the inversion loop's `durable=False`
    leaves them to its group commits (no fsync of the file when it is written)."""
    entry = open_entry(tmp_path, REQUEST)
    flushed = _recorded_fsyncs(monkeypatch)
    writes = {entry.latent_name(1): lambda durable: entry.write_latent(1, torch.ones(4, 2, 3), **durable),
              entry.feature_name(2, 1): lambda durable: entry.write_features(2, {"q": torch.ones(2)}, window=1,
                                                                            **durable)}
    for name, write in writes.items():
        for durable, expected in (({}, True), ({"durable": True}, True), ({"durable": False}, False)):
            flushed.clear()
            write(durable)
            assert any(path.endswith(".safetensors") and "partial" in path for path in flushed) == expected, \
                (name, durable)
            assert entry.holds(name)
    flushed.clear()
    entry.write_trajectories({"1x2.links": torch.zeros(1, 2, dtype=torch.int32)})
    assert any("trajectories" in path for path in flushed)


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


# Exact names, messages and bookkeeping ------------------------------------------------------------------


def test_file_names_of_latents_features_and_links():
    entry = CacheEntry(cache.Path("/nowhere"))
    assert entry.latent_name(7) == "latents/step-007.safetensors"
    assert entry.feature_name(12) == "features/step-012-w000.safetensors"
    assert entry.feature_name(12, window=3) == "features/step-012-w003.safetensors"
    from diffferv_cli.temporal.trajectories import ClipLinks

    links = ClipLinks(2, {(2, 3): torch.zeros(1, 6, dtype=torch.int64)})
    tensors = cache.links_to_tensors(links)
    assert list(tensors) == ["2x3.links"] and tensors["2x3.links"].dtype == torch.int32


def test_frames_hash_is_sha256_of_dtype_shape_and_pixels():
    import hashlib

    import numpy as np

    frames = np.arange(12, dtype=np.uint8).reshape(1, 2, 2, 3)
    expected = hashlib.sha256(b"|u1(1, 2, 2, 3)" + bytes(range(12))).hexdigest()
    assert cache.frames_sha256(frames) == expected


def test_every_write_records_the_sha256_of_the_file_and_takes_any_layout(tmp_path):
    import hashlib

    entry = CacheEntry(tmp_path / "entry", {"request": REQUEST})  # no "files" yet
    transposed = torch.arange(6, dtype=torch.float32).reshape(2, 3).t()  # not contiguous
    entry.write_features(1, {"a:cross": transposed}, window=2)
    entry.write_latent(0, torch.ones(1, 4, 2, 3, dtype=torch.float16))
    for name in (entry.feature_name(1, 2), entry.latent_name(0)):
        assert entry.manifest["files"][name] == hashlib.sha256((entry.folder / name).read_bytes()).hexdigest()
    assert torch.equal(entry.read_features(1, window=2)["a:cross"], transposed)
    latent = entry.read_latent(0)
    assert latent.dtype == torch.float32 and torch.equal(latent, torch.ones(1, 4, 2, 3))


def test_the_manifest_file_is_sorted_indented_json_with_an_update_time(tmp_path, monkeypatch):
    from diffferv_cli.files import to_json

    entry = open_entry(tmp_path, REQUEST)
    entry.manifest["zzz"], entry.manifest["aaa"] = 1, 2
    writes = []
    real_write = cache.atomic_write_bytes
    monkeypatch.setattr(cache, "atomic_write_bytes",
                        lambda path, data, durable=True: writes.append(durable) or real_write(path, data, durable=durable))
    entry.save_manifest()
    entry.save_manifest(durable=False)
    assert writes == [True, False]
    text = entry.manifest_path.read_text()
    assert text == to_json(entry.manifest, sort_keys=True) and text.index('"aaa"') < text.index('"zzz"')
    assert json.loads(text)["updated"] == entry.manifest["updated"]


def test_cache_errors_read_as_one_exact_sentence(tmp_path):
    import hashlib

    entry, _ = _entry_with_latent(tmp_path)
    folder, name = entry.folder, entry.latent_name(0)
    path = folder / name
    with pytest.raises(UserError) as error:
        entry.read_latent(3)
    assert str(error.value) == f"The cache at {folder} is missing latents/step-003.safetensors; rerun with --force to recompute it."
    path.write_bytes(path.read_bytes()[:-1] + bytes([path.read_bytes()[-1] ^ 0x01]))
    with pytest.raises(UserError) as error:
        entry.read_latent(0)
    assert str(error.value) == f"The cache file {path} is corrupted (hash mismatch); rerun with --force to recompute it."
    from safetensors.torch import save

    for value, what in ((float("nan"), "NaN"), (float("inf"), "infinity"), (float("-inf"), "minus infinity")):
        data = save({"latent": torch.tensor([1.0, value]), "steps": torch.tensor([1, 2])})
        path.write_bytes(data)
        entry.manifest["files"][name] = hashlib.sha256(data).hexdigest()
        with pytest.raises(UserError) as error:
            entry.read_latent(0)
        assert str(error.value) == (f"The cache file {path} holds NaN or infinite values (latent); rerun with "
                                    "--force to recompute it."), what
    path.write_bytes(b"{}")
    entry.manifest["files"][name] = hashlib.sha256(b"{}").hexdigest()
    with pytest.raises(UserError) as error:
        entry.read_latent(0)
    assert str(error.value).startswith(f"The cache file {path} cannot be read (")
    assert str(error.value).endswith("); rerun with --force.")
    entry.manifest["request"]["unet_dtype"] = "float16"
    with pytest.raises(UserError) as error:
        entry.write_latent(4, torch.tensor([0.0, float("nan")]))
    assert str(error.value) == ("The inversion produced NaN or infinite latents at step 4 (the model's dtype float16 "
                                "may overflow); try --dtype fp32.")
    assert not (folder / entry.latent_name(4)).exists()


def test_manifest_errors_read_as_one_exact_sentence(tmp_path):
    entry, _ = _entry_with_latent(tmp_path)
    manifest = json.loads(entry.manifest_path.read_text())
    entry.manifest_path.write_text(json.dumps({**manifest, "request": {**REQUEST, "steps": 9}}))
    with pytest.raises(UserError) as error:
        open_entry(tmp_path, REQUEST)
    assert str(error.value) == f"The cache at {entry.folder} does not match this request; rerun with --force to recompute."
    for broken in ("[1", json.dumps({**manifest, "files": {"trajectories.safetensors": "00"}}),
                   json.dumps({**manifest, "finished_steps": 2}), json.dumps({**manifest, "feature_steps": -1}),
                   json.dumps({**manifest, "frames": 0}), json.dumps({**manifest, "latent_size": [1, 2, 3]})):
        entry.manifest_path.write_text(broken)
        with pytest.raises(UserError) as error:
            open_entry(tmp_path, REQUEST)
        kind = "JSONDecodeError" if broken == "[1" else "ValidationError"
        assert str(error.value) == (f"The cache manifest {entry.manifest_path} is broken ({kind}); rerun with --force "
                                    "to recompute."), broken
    hashes = {name: "0" * 64 for name in ("trajectories.safetensors", *(entry.latent_name(i) for i in range(3)))}
    written = {**manifest, "files": hashes, "frames": 3, "latent_size": [2, 3], "encoded": True,
               "finished_steps": 2, "timesteps": [1, 2, 3, 4]}
    entry.manifest_path.write_text(json.dumps(written))
    assert open_entry(tmp_path, REQUEST).manifest == written  # written together: accepted


def test_unwritable_cache_folders_are_one_sentence(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError) as error:
        with cache.entry_lock(tmp_path / "file", REQUEST):
            pass
    assert str(error.value) in (f"Cannot create the cache folder {tmp_path / 'file'}: file exists; pass --cache-dir.",
                                f"Cannot create the cache folder {tmp_path / 'file'}: a part of the path is not a "
                                "folder; pass --cache-dir.")
    monkeypatch.setattr(cache.os, "access", lambda path, mode: False)
    with pytest.raises(UserError) as error:
        with cache.entry_lock(tmp_path / "root", REQUEST):
            pass
    assert str(error.value) == f"The cache folder {tmp_path / 'root'} is not writable; pass --cache-dir."
    with pytest.raises(UserError) as error:
        open_entry(tmp_path / "root", REQUEST)
    folder = tmp_path / "root" / request_key(REQUEST)
    assert str(error.value) == f"The cache folder {folder} is not writable; pass --cache-dir."
    monkeypatch.undo()
    with pytest.raises(UserError) as error:
        open_entry(tmp_path / "file", REQUEST)
    assert str(error.value) == (f"Cannot create the cache folder {tmp_path / 'file' / request_key(REQUEST)}: a part "
                                "of the path is not a folder; pass --cache-dir to use another folder.")


def test_the_lock_is_a_file_per_entry_and_is_released(tmp_path):
    from filelock import FileLock

    lock_path = tmp_path / ".locks" / f"{request_key(REQUEST)}.lock"
    with cache.entry_lock(tmp_path, REQUEST):
        assert lock_path.exists()
        with pytest.raises(TimeoutError):
            FileLock(lock_path).acquire(timeout=0)
    FileLock(lock_path).acquire(timeout=0)  # free again


def test_cache_roots_expand_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("DIFFFERV_CACHE", "~/env")
    assert cache.cache_root("~/given") == tmp_path / "given"
    assert cache.cache_root("") == cache.cache_root(None) == tmp_path / "env"
    monkeypatch.setenv("DIFFFERV_CACHE", "")
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    assert cache.cache_root() == tmp_path / ".cache" / "diffferv"


def test_steps_and_finished_steps_are_numbers_from_the_manifest():
    entry = CacheEntry(cache.Path("/nowhere"), {"request": {"steps": "5"}, "finished_steps": "2"})
    assert entry.steps == 5 and entry.finished_steps == 2
    assert CacheEntry(cache.Path("/nowhere"), {"request": {"steps": 5}}).finished_steps == -1


def test_a_group_commit_flushes_the_files_it_names_then_the_manifest(tmp_path, monkeypatch):
    import diffferv_cli.files as files_module

    entry = open_entry(tmp_path, REQUEST)
    entry.write_latent(1, torch.ones(4, 2, 3), durable=False)
    entry.write_features(0, {"q": torch.ones(2)}, durable=False)
    entry.manifest["finished_steps"] = 1
    monkeypatch.setattr(files_module, "_syncfs", lambda folder: False)  # file by file, so each one shows
    flushed = _recorded_fsyncs(monkeypatch)
    entry.make_durable([entry.latent_name(1), entry.feature_name(0)])
    folder = entry.folder
    files = [str(folder / entry.latent_name(1)), str(folder / entry.feature_name(0))]
    assert flushed[:2] == files and sorted(flushed[2:4]) == [str(folder / "features"), str(folder / "latents")]
    assert any(".manifest." in path for path in flushed[4:]) and flushed[-1] == str(folder)  # then the manifest
    assert json.loads(entry.manifest_path.read_text())["finished_steps"] == 1
