"""`diffferv cache` and editing/cache_admin.py: listing, removing, pruning, clearing and cleaning the
inversion cache, on real entries written through editing/cache.py (no model runs)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from diffferv_cli.cli import app
from diffferv_cli.editing import cache_admin
from diffferv_cli.editing.cache import entry_lock, open_entry, request_key
from diffferv_cli.editing.cache_admin import human_size, parse_age
from diffferv_cli.errors import UserError
from diffferv_cli.files import atomic_path

DAY = 86400


def _request(prompt: str = "a photo of a person", steps: int = 3) -> dict:
    return {"prompt": prompt, "steps": steps, "model": "tiny-random-v1-seed0", "working_size": [96, 64],
            "selection": {"start": 0, "frames": None, "stride": 1, "indices": [0, 1]}}


def _entry(root: Path, prompt: str = "a photo of a person", *, steps: int = 3, finished: int = 3, frames: int = 2,
           clip: str = "/videos/clip.mp4"):
    """A real entry: manifest and latent files written by editing/cache.py, `finished` of `steps` done."""
    entry = open_entry(root, _request(prompt, steps))
    entry.manifest["source"] = {"path": clip}
    for index in range(finished + 1):
        entry.write_latent(index, torch.full((frames, 4, 8, 12), float(index)))
    entry.manifest.update(encoded=True, finished_steps=finished, frames=frames, latent_size=[8, 12],
                          timesteps=list(range(steps)))
    entry.save_manifest()
    return entry


def _age(folder: Path, days: float) -> None:
    """Set every file of `folder` (and the folder) to `days` old."""
    when = time.time() - days * DAY
    for path in [*folder.rglob("*"), folder]:
        os.utime(path, (when, when))


def _cache(*args, input: str | None = None):
    return CliRunner().invoke(app, ["cache", *map(str, args)], input=input, env={"COLUMNS": "300"})


def _listed(root: Path) -> dict[str, dict]:
    result = _cache("list", "--json", "--cache-dir", root)
    assert result.exit_code == 0, result.output
    listing = json.loads(result.stdout)
    assert listing["root"] == str(root)
    return {entry["key"]: entry for entry in listing["entries"]}


def _one_error(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [f"Error: {message}"]
    assert "Traceback" not in result.output


# ---------------------------------------------------------------------------------------------- list


def test_list_shows_each_entry_with_its_settings_steps_and_size(tmp_path):
    done = _entry(tmp_path, clip="/videos/a.mp4")
    half = _entry(tmp_path, "a photo of a woman", steps=4, finished=1, frames=3, clip="/videos/[b].mp4")
    listed = _listed(tmp_path)
    assert set(listed) == {done.folder.name, half.folder.name}
    first, second = listed[done.folder.name], listed[half.folder.name]
    assert (first["clip"], first["model"], first["prompt"], first["working_size"]) == \
        ("/videos/a.mp4", "tiny-random-v1-seed0", "a photo of a person", [96, 64])
    assert second["clip"] == "/videos/[b].mp4"
    assert (first["frames"], first["finished_steps"], first["steps"], first["complete"]) == (2, 3, 3, True)
    assert (second["frames"], second["finished_steps"], second["steps"], second["complete"]) == (3, 1, 4, False)
    assert first["problem"] is None and second["problem"] is None
    assert first["size"] == done.disk_bytes() and second["size"] == half.disk_bytes()
    # four latents of 2x4x8x12 float32 (3 KiB each) plus headers and the manifest
    assert 4 * 2 * 4 * 8 * 12 * 4 < first["size"] < 4 * 2 * 4 * 8 * 12 * 4 + 4000
    total = json.loads(_cache("list", "--json", "--cache-dir", tmp_path).stdout)["total_size"]
    assert total == done.disk_bytes() + half.disk_bytes()

    table = _cache("list", "--cache-dir", tmp_path)
    assert table.exit_code == 0
    row = next(line for line in table.stdout.splitlines() if done.folder.name in line)
    assert "/videos/a.mp4" in row and "3/3" in row and human_size(done.disk_bytes()) in row and "complete" in row
    row = next(line for line in table.stdout.splitlines() if half.folder.name in line)
    assert "1/4" in row and "partial" in row and "/videos/[b].mp4" in row  # brackets are not rich markup
    assert f"2 entries, {human_size(total)} in {tmp_path}" in table.stdout


def test_bare_cache_lists_the_default_location(tmp_path, monkeypatch):
    """`diffferv cache` alone is `cache list`, at $DIFFFERV_CACHE; --cache-dir replaces the variable."""
    home, other = tmp_path / "home", tmp_path / "other"
    monkeypatch.setenv("DIFFFERV_CACHE", str(home))
    mine = _entry(home)
    theirs = _entry(other, "a photo of a dog")
    bare = _cache()
    assert bare.exit_code == 0 and mine.folder.name in bare.stdout and theirs.folder.name not in bare.stdout
    assert f"1 entry, {human_size(mine.disk_bytes())} in {home}" in bare.stdout
    assert set(_listed(other)) == {theirs.folder.name}


def test_last_use_is_the_newest_file_and_entries_come_newest_first(tmp_path):
    old, new = _entry(tmp_path, "a photo of an old person"), _entry(tmp_path)
    _age(old.folder, 10)
    _age(new.folder, 2)
    os.utime(old.manifest_path, (time.time() - DAY, time.time() - DAY))  # one newer file is enough
    entries = cache_admin.list_entries(tmp_path)
    assert [entry.key for entry in entries] == [old.folder.name, new.folder.name]
    assert abs(entries[0].last_used - (time.time() - DAY)) < 60 and abs(entries[1].last_used - (time.time() - 2 * DAY)) < 60


def test_broken_entries_are_listed_as_broken_next_to_good_ones(tmp_path):
    good = _entry(tmp_path)
    keys = {"no manifest": "a" * 24, "not json": "b" * 24, "no request": "c" * 24, "old format": "d" * 24}
    for key in keys.values():
        (tmp_path / key).mkdir()
    (tmp_path / keys["not json"] / "manifest.json").write_text("{not json")
    (tmp_path / keys["no request"] / "manifest.json").write_text("[1, 2]")
    (tmp_path / keys["old format"] / "manifest.json").write_text(json.dumps({"format": 2, "request": _request()}))
    (tmp_path / "notes").mkdir()  # not named like a key: not an entry, never listed or touched
    listed = _listed(tmp_path)
    assert set(listed) == {good.folder.name, *keys.values()}
    assert listed[good.folder.name]["problem"] is None
    assert listed[keys["no manifest"]]["problem"].startswith("no manifest")
    assert listed[keys["not json"]]["problem"] == "the manifest does not read (JSONDecodeError)"
    assert listed[keys["no request"]]["problem"] == "the manifest has no request"
    assert listed[keys["old format"]]["problem"].startswith("cache format 2, this diffferv reads")
    assert listed[keys["old format"]]["prompt"] == "a photo of a person"  # still shows what it was
    table = _cache("list", "--cache-dir", tmp_path)
    assert table.exit_code == 0 and table.stdout.count("broken: ") == 4


def test_a_missing_cache_folder_lists_nothing(tmp_path):
    result = _cache("list", "--cache-dir", tmp_path / "never")
    assert result.exit_code == 0 and f"0 entries, 0 B in {tmp_path / 'never'}" in result.stdout
    assert not (tmp_path / "never").exists()


def test_human_sizes():
    assert [human_size(size) for size in (0, 999, 1000, 3_149_000, 12_400_000_000, 5 * 10**15)] == \
        ["0 B", "999 B", "1.0 kB", "3.1 MB", "12.4 GB", "5000.0 TB"]


# ------------------------------------------------------------------------------------------- removing


def test_rm_removes_only_the_named_entries_by_key_or_unique_prefix(tmp_path):
    one, two, three = _entry(tmp_path, "a"), _entry(tmp_path, "b"), _entry(tmp_path, "c")
    freed = one.disk_bytes() + three.disk_bytes()
    result = _cache("rm", one.folder.name, three.folder.name[:8].upper(), "--cache-dir", tmp_path)
    assert result.exit_code == 0, result.output
    assert f"Removed {one.folder.name}" in result.stdout and f"Removed {three.folder.name}" in result.stdout
    assert f"Freed {human_size(freed)}." in result.stdout
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([two.folder.name, ".locks"])
    assert open_entry(tmp_path, _request("b")).read_latent(3).eq(3).all()  # the other entry is whole


def test_rm_of_an_unknown_or_ambiguous_key_is_one_sentence_and_removes_nothing(tmp_path):
    kept = _entry(tmp_path)
    for key in ("ab" + "0" * 22, "ab" + "1" * 22):
        (tmp_path / key).mkdir()
    _one_error(_cache("rm", kept.folder.name, "ffff", "--cache-dir", tmp_path),
               "No cache entry has the key 'ffff'; `diffferv cache list` shows the keys.")
    _one_error(_cache("rm", "ab", "--cache-dir", tmp_path),
               f"The key prefix 'ab' matches 2 cache entries (ab{'0' * 22}, ab{'1' * 22}); give more of the key.")
    _one_error(_cache("rm", "", "--cache-dir", tmp_path),
               "No cache entry has the key ''; `diffferv cache list` shows the keys.")
    assert kept.folder.is_dir() and len(list(tmp_path.iterdir())) == 3


def test_prune_removes_the_entries_last_used_longer_ago(tmp_path):
    old, recent, fresh = _entry(tmp_path, "old"), _entry(tmp_path, "recent"), _entry(tmp_path, "fresh")
    _age(old.folder, 31)
    _age(recent.folder, 29)
    dry = _cache("prune", "--older-than", "30d", "--dry-run", "--cache-dir", tmp_path)
    assert dry.exit_code == 0 and f"Would remove {old.folder.name}" in dry.stdout and recent.folder.name not in dry.stdout
    assert old.folder.is_dir()
    result = _cache("prune", "--older-than", "720h", "--cache-dir", tmp_path)  # 30 days in hours
    assert result.exit_code == 0, result.output
    assert not old.folder.exists() and recent.folder.is_dir() and fresh.folder.is_dir()
    assert _cache("prune", "--older-than", "1d", "--cache-dir", tmp_path).exit_code == 0
    assert not recent.folder.exists() and fresh.folder.is_dir()


@pytest.mark.parametrize("text, seconds", [("30d", 30 * DAY), ("12h", 43200), ("90m", 5400), ("45s", 45),
                                           ("1.5h", 5400), (" 2 d ", 2 * DAY), ("0s", 0)])
def test_ages_take_a_number_and_a_unit(text, seconds):
    assert parse_age(text) == seconds


@pytest.mark.parametrize("text", ["30", "d", "30 days", "-1d", "", "30D", "1e3s", "3w"])
def test_a_bad_age_is_one_sentence(text, tmp_path):
    with pytest.raises(UserError):
        parse_age(text)
    kept = _entry(tmp_path)
    _age(kept.folder, 100)
    _one_error(_cache("prune", "--older-than", text, "--cache-dir", tmp_path),
               f"--older-than takes a number and a unit s, m, h or d (for example 30d), not {text!r}.")
    assert kept.folder.is_dir()


def test_clear_asks_first_unless_yes_and_leaves_what_is_not_an_entry(tmp_path):
    entries = [_entry(tmp_path, "a"), _entry(tmp_path, "b")]
    (tmp_path / ("e" * 24)).mkdir()  # a broken entry goes too
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    refused = _cache("clear", "--cache-dir", tmp_path, input="n\n")
    assert refused.exit_code == 1 and "Remove all 3 cache entries" in refused.stdout
    assert all(entry.folder.is_dir() for entry in entries)
    accepted = _cache("clear", "--cache-dir", tmp_path, input="y\n")
    assert accepted.exit_code == 0, accepted.output
    assert sorted(path.name for path in tmp_path.iterdir()) == [".locks", "notes"]
    _entry(tmp_path, "c")
    assert _cache("clear", "--yes", "--cache-dir", tmp_path).exit_code == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == [".locks", "notes"]
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    empty = _cache("clear", "--cache-dir", tmp_path)
    assert empty.exit_code == 0 and "holds no entries" in empty.stdout


def test_an_entry_in_use_by_another_run_is_skipped_never_deleted(tmp_path):
    """The lock `cache.entry_lock` takes while an inversion writes: rm, prune, clear and clean leave the entry."""
    busy, idle = _entry(tmp_path, "busy"), _entry(tmp_path, "idle")
    _age(busy.folder, 40)
    temporary = busy.folder / "latents" / ".step-004.x1y2.partial.safetensors"
    temporary.write_bytes(b"being written")
    with entry_lock(tmp_path, _request("busy")):
        result = _cache("rm", busy.folder.name, idle.folder.name, "--cache-dir", tmp_path)
        assert result.exit_code == 1
        assert f"Skipped {busy.folder.name}: another diffferv process is using it." in result.stderr
        assert not idle.folder.exists()
        assert _cache("prune", "--older-than", "1d", "--cache-dir", tmp_path).exit_code == 0
        assert _cache("clear", "--yes", "--cache-dir", tmp_path).exit_code == 0
        assert "Skipped" in _cache("clean", "--cache-dir", tmp_path).stderr
        assert busy.folder.is_dir() and temporary.is_file()
    assert _cache("rm", busy.folder.name[:6], "--cache-dir", tmp_path).exit_code == 0
    assert not busy.folder.exists()


# ------------------------------------------------------------------------------------------- cleaning


def _interrupted_write(path: Path) -> Path:
    """The temporary file `files.atomic_path` makes for `path`, left behind as a killed process leaves it."""
    with pytest.raises(KeyboardInterrupt), atomic_path(path) as temp:
        raise KeyboardInterrupt
    temp.write_bytes(b"half a tensor")
    return temp


def test_clean_removes_leftovers_of_interrupted_writes_and_keeps_complete_entries(tmp_path):
    complete = _entry(tmp_path)
    partial = _entry(tmp_path, "a photo of a woman", steps=5, finished=2)
    before = {path: path.read_bytes() for entry in (complete, partial) for path in entry.folder.rglob("*") if path.is_file()}
    leftovers = [_interrupted_write(complete.folder / "latents" / complete.latent_name(9).split("/")[1]),
                 _interrupted_write(partial.folder / "manifest.json"),
                 _interrupted_write(partial.folder / partial.latent_name(3))]
    stray = partial.folder / partial.latent_name(4)  # renamed into place, the manifest never named it
    stray.write_bytes(b"not named")
    unstarted = tmp_path / ("f" * 24)  # an inversion killed before its first manifest
    (unstarted / "latents").mkdir(parents=True)
    (unstarted / "trajectories.safetensors").write_bytes(b"x" * 10)
    removing = tmp_path / f".{'9' * 24}.removing"  # an interrupted `cache rm`
    removing.mkdir()
    (removing / "manifest.json").write_text("{}")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / ".a.b.partial.txt").write_text("not ours")  # outside any entry: kept

    result = _cache("clean", "--cache-dir", tmp_path)
    assert result.exit_code == 0, result.output
    after = {path: path.read_bytes() for entry in (complete, partial) for path in entry.folder.rglob("*") if path.is_file()}
    assert after == before  # every file of both entries, byte for byte, and nothing else
    assert not unstarted.exists() and not removing.exists()
    assert (tmp_path / "notes" / ".a.b.partial.txt").is_file()
    assert all(path.name in result.stdout for path in [*leftovers, stray])
    assert f"Removed unfinished {unstarted.name}" in result.stdout
    assert open_entry(tmp_path, _request("a photo of a woman", 5)).read_latent(2).eq(2).all()
    again = _cache("clean", "--cache-dir", tmp_path)
    assert again.exit_code == 0 and again.stdout.strip() == "Freed 0 B."


def test_clean_keeps_the_files_of_an_entry_whose_manifest_does_not_read(tmp_path):
    broken = tmp_path / ("b" * 24)
    (broken / "latents").mkdir(parents=True)
    (broken / "manifest.json").write_text("{not json")
    (broken / "latents" / "step-000.safetensors").write_bytes(b"data")
    temporary = _interrupted_write(broken / "latents" / "step-001.safetensors")
    assert _cache("clean", "--cache-dir", tmp_path).exit_code == 0
    assert (broken / "latents" / "step-000.safetensors").is_file() and not temporary.exists()


def test_the_temporary_pattern_is_the_one_atomic_path_uses(tmp_path):
    for name in ("manifest.json", "step-000.safetensors", "noext"):
        assert cache_admin.TEMPORARY.match(_interrupted_write(tmp_path / name).name)
    assert not cache_admin.TEMPORARY.match("step-000.safetensors")
    assert not cache_admin.TEMPORARY.match("manifest.json")


def test_keys_are_what_request_key_makes():
    assert cache_admin.KEY.match(request_key(_request()))


# --------------------------------------------------------------------------------------------- doctor


def test_doctor_shows_the_cache_location_and_size(tmp_path, monkeypatch):
    entry = _entry(tmp_path / "cache")
    result = CliRunner().invoke(app, ["doctor", "--cache-dir", str(tmp_path / "cache")], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    line = next(line for line in result.stdout.splitlines() if "inversion cache" in line)
    assert f"{tmp_path / 'cache'}: 1 entry, {human_size(entry.disk_bytes())}" in line
    monkeypatch.setenv("DIFFFERV_CACHE", str(tmp_path / "elsewhere"))
    check = __import__("diffferv_cli.cli.doctor", fromlist=["_cache_check"])._cache_check(None)
    assert check.detail == f"{tmp_path / 'elsewhere'}: 0 entries, 0 B (not created yet)"
