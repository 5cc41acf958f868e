"""Hostile input, by category: each ends with one sentence on stderr and exit code 2 (or a correct result), writes nothing, and
never hangs. (Cache entries with NaN or wrong types: test_cache.py; tampered checkpoints: test_training.py;
no model and no hub: test_components.py.)"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import threading
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from diffferv_cli.cli import app
from diffferv_cli.config import (
    ClipSpec,
    CompositeConfig,
    EditConfig,
    EvalConfig,
    InversionConfig,
    TemporalConfig,
    TrainConfig,
)
from diffferv_cli.editing.presets import Preset


def _invoke(args: list[str], timeout: float = 120):
    """Run the CLI in a thread; a hang fails the test instead of stalling the suite."""
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(result=CliRunner().invoke(app, args)), daemon=True)
    worker.start()
    worker.join(timeout)
    assert not worker.is_alive(), f"diffferv {' '.join(args)} did not finish within {timeout} s"
    return outcome["result"]


def _one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    text = " ".join(result.output.split())
    for fragment in fragments:
        assert fragment in text, result.output
    return text


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory) -> Path:
    from media import make_test_clip

    return make_test_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", width=64, height=48, frames=3, fps=8)


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("faces")
    for index in range(2):
        cv2.imwrite(str(folder / f"img{index}.png"), np.full((40, 40, 3), 60 * index, np.uint8))
    return folder


def _edit_args(clip_path: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["edit", str(clip_path), "--model", "tiny-random", "--size", "64", "--steps", "2", "--frames", "2",
            "--flow-preset", "ultrafast", "--cache-dir", str(tmp_path / "cache"), "-o", str(tmp_path / "out.mp4"),
            "--device", "cpu", *extra]


def _train_args(faces: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["train", "--faces", str(faces), "--out", str(tmp_path / "model"), "--model", "tiny-random",
            "--steps", "2", "--batch-size", "2", "--resolution", "32", "--workers", "0", "--cpu", *extra]


# ------------------------------------------------------------------------------ non-finite and huge numbers


@pytest.mark.parametrize("option, value", [("--guidance", "inf"), ("--guidance", "nan"), ("--guidance", "-inf"),
                                           ("--guidance", "1e300"), ("--tau-app", "nan"), ("--tau-motion", "inf")])
def test_edit_refuses_non_finite_or_out_of_range_floats(clip_path, tmp_path, option, value):
    _one_line_error(_invoke(_edit_args(clip_path, tmp_path, "--prompt-edit", "a photo of an old person",
                                       option, value)), option.removeprefix("--").replace("-", "_"))
    assert not (tmp_path / "out.mp4").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("option, value", [("--lr", "inf"), ("--lr", "nan"), ("--lr", "1e9"), ("--max-zoom", "inf"),
                                           ("--prior-ratio", "nan"), ("--max-rotation", "-inf"),
                                           ("--seed", str(2**64)), ("--seed", str(2**63)), ("--seed", "-1"),
                                           ("--steps", str(10**30)), ("--batch-size", str(2**64)),
                                           ("--warmup", str(2**70)), ("--checkpoint-every", str(2**64))])
def test_train_refuses_non_finite_and_huge_numbers(faces, tmp_path, option, value):
    _one_line_error(_invoke(_train_args(faces, tmp_path, option, value)), option)
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("option, value", [("--start", str(2**64)), ("--frames", str(10**30)),
                                           ("--stride", str(2**63)), ("--window", str(2**64)), ("--steps", "1001"),
                                           ("--window-frames", str(2**64)), ("--region", f"0,0,{2**64},8")])
def test_invert_refuses_huge_counts(clip_path, tmp_path, option, value):
    args = _edit_args(clip_path, tmp_path)
    args[0] = "invert"
    args = args[:args.index("-o")] + args[args.index("-o") + 2:]
    _one_line_error(_invoke([*args, option, value]))
    assert not (tmp_path / "cache").exists()


def _float_and_int_fields(model) -> tuple[list[str], list[str]]:
    floats, ints = [], []
    for name, field in model.model_fields.items():
        annotation = str(field.annotation)
        if "float" in annotation:
            floats.append(name)
        elif "int" in annotation and "bool" not in annotation:
            ints.append(name)
    return floats, ints


def _huge(model, name: str):
    """2**64 in the shape of the field (a tuple field gets a tuple of them)."""
    annotation = str(model.model_fields[name].annotation)
    return (2**64,) * annotation.count("int") if "tuple" in annotation else 2**64


CONFIG_MODELS = [
    (ClipSpec, {}), (TemporalConfig, {}), (InversionConfig, {}), (EditConfig, {"prompt_edit": "x"}),
    (CompositeConfig, {}), (TrainConfig, {"faces": Path("f"), "out": Path("o")}), (EvalConfig, {}),
    (Preset, {"name": "p", "description": "d", "edit_prompt": "a photo of an old {subject}"}),
]


@pytest.mark.parametrize("model, required", CONFIG_MODELS, ids=[m.__name__ for m, _ in CONFIG_MODELS])
def test_every_number_of_every_config_is_bounded(model, required):
    """Every float field refuses inf and nan, every int field refuses 2**64: checked in the models once,
    so a field added later is covered or this test says which one is not."""
    from pydantic import ValidationError

    floats, ints = _float_and_int_fields(model)
    model(**required)  # the defaults are valid
    for name in floats:
        for bad in (float("inf"), float("-inf"), float("nan")):
            with pytest.raises(ValidationError):
                model(**{**required, name: bad})
    for name in ints:
        with pytest.raises(ValidationError):
            model(**{**required, name: _huge(model, name)})
    assert floats or ints or model is TemporalConfig


# ---------------------------------------------------------------------------------------------- devices


@pytest.mark.parametrize("device", ["npu", "cuda:9", "cuda:x", "gpu", "meta", "cpu:3"])
def test_unknown_or_unavailable_device(clip_path, tmp_path, device):
    import torch

    if device == "cuda:9" and torch.cuda.device_count() > 9:
        pytest.skip("this machine has ten GPUs")
    args = [a if a != "cpu" else device for a in _edit_args(clip_path, tmp_path, "--preset", "age")]
    _one_line_error(_invoke(args), device)
    assert not (tmp_path / "out.mp4").exists()


def test_cuda_on_a_machine_without_cuda(clip_path, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    args = [a if a != "cpu" else "cuda" for a in _edit_args(clip_path, tmp_path, "--preset", "age")]
    _one_line_error(_invoke(args), "CUDA is not available")


def test_caption_checks_its_device_too(faces):
    _one_line_error(_invoke(["caption", str(faces), "--model", "nobody/nothing", "--device", "npu"]), "npu")


# ------------------------------------------------------------------------------- training manifests


@pytest.mark.parametrize("row, fragment", [
    ({"file": ["img0.png"], "text": "a face"}, "'file' must be a string, not a list"),
    ({"file": "img0.png", "text": None}, "'text' must be a string, not null"),
    ({"file": "img0.png", "text": 5}, "'text' must be a string, not a number"),
    ({"file": 7, "text": "a face"}, "'file' must be a string, not a number"),
    ({"image": {"path": "img0.png"}, "caption": "a face"}, "'image' must be a string, not an object"),
    ({"file": "img0.png", "caption": ["a", "face"]}, "'caption' must be a string, not a list"),
    (["img0.png", "a face"], "expected an object"),
    ("img0.png", "expected an object"),
    (12, "expected an object"),
    (None, "expected an object"),
])
def test_manifest_fields_of_the_wrong_json_type(faces, tmp_path, row, fragment):
    manifest = tmp_path / "captions.jsonl"
    good = {"file": "img1.png", "text": "another face"}
    manifest.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    _one_line_error(_invoke(_train_args(faces, tmp_path, "--captions", str(manifest))), "row 2", fragment)
    assert not (tmp_path / "model").exists()


def test_manifest_that_is_not_json_lines(faces, tmp_path):
    manifest = tmp_path / "captions.jsonl"
    manifest.write_text("[" * 100_000 + "\n")  # deep nesting
    _one_line_error(_invoke(_train_args(faces, tmp_path, "--captions", str(manifest))), "Cannot read caption manifest")


def test_tar_shard_caption_of_the_wrong_type_counts_as_missing(tmp_path):
    import io
    import tarfile

    from diffferv_cli.errors import UserError
    from diffferv_cli.training.data import scan_images

    shards = tmp_path / "shards"
    shards.mkdir()
    png = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
    with tarfile.open(shards / "000000.tar", "w") as tar:
        for name, data in (("a.png", png), ("a.json", json.dumps({"caption": ["not", "text"]}).encode()),
                           ("b.png", png), ("b.json", json.dumps({"caption": "a face"}).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(UserError, match="1 of 2 images"):
        scan_images(shards)


def test_oversized_captions(faces, tmp_path):
    import io
    import tarfile

    from diffferv_cli.errors import UserError
    from diffferv_cli.training.data import scan_images

    folder = tmp_path / "sidecars"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), np.zeros((8, 8, 3), np.uint8))
    (folder / "a.txt").write_text("a photo " * 20_000)  # 160 kB
    _one_line_error(_invoke(_train_args(folder, tmp_path)), "caption file", "at most")

    shards = tmp_path / "shards"
    shards.mkdir()
    png = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
    with tarfile.open(shards / "000000.tar", "w") as tar:
        for name, data in (("a.png", png), ("a.txt", b"a photo " * 20_000), ("b.png", png), ("b.txt", b"a face")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(UserError, match="1 of 2 images"):
        scan_images(shards)


# ---------------------------------------------------------------------------------------- device files


@pytest.fixture
def fifo(tmp_path) -> Path:
    path = tmp_path / "pipe.toml"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("preset", ["/dev/zero", "/dev/urandom", "fifo"])
def test_preset_naming_a_device_or_fifo_is_refused_at_once(clip_path, tmp_path, fifo, preset):
    preset = str(fifo) if preset == "fifo" else preset
    if not Path(preset).exists():
        pytest.skip(f"{preset} does not exist here")
    _one_line_error(_invoke(_edit_args(clip_path, tmp_path, "-p", preset), timeout=60), "not a regular file")
    assert not (tmp_path / "cache").exists()


def test_huge_preset_file_is_refused(clip_path, tmp_path):
    big = tmp_path / "big.toml"
    big.write_text('description = "x"\nedit_prompt = "a photo of an old {subject}"\n' + "#" * 100_000 + "\n")
    _one_line_error(_invoke(_edit_args(clip_path, tmp_path, "-p", str(big))), "at most")


def test_caption_manifest_naming_a_device_or_fifo_is_refused(faces, tmp_path, fifo):
    for manifest in ("/dev/zero", str(fifo)):
        _one_line_error(_invoke(_train_args(faces, tmp_path, "--captions", manifest), timeout=60), "not a regular file")
    assert not (tmp_path / "model").exists()


# ------------------------------------------------------------------------------------------------ eval


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny PNG file that declares `width` x `height` pixels (its data is a few bytes): what a
    decompression bomb looks like before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("width, height", [(10_000, 10_000), (40_000, 40_000)])  # over PIL's limit, over twice it
def test_eval_frame_folder_with_an_enormous_png(tmp_path, width, height):
    frames = tmp_path / "frames"
    frames.mkdir()
    cv2.imwrite(str(frames / "0.png"), np.zeros((48, 64, 3), np.uint8))
    _png_header_only(frames / "1.png", width, height)
    bomb_first = tmp_path / "bomb"
    bomb_first.mkdir()
    _png_header_only(bomb_first / "0.png", width, height)
    for folder in (frames, bomb_first):
        _one_line_error(_invoke(["eval", str(folder), str(folder), "--no-temporal"]), "too large to decode")


def test_eval_on_a_video_whose_short_side_exceeds_2048(tmp_path):
    from diffferv_cli.video.io import ffmpeg_exe

    big = tmp_path / "big.mp4"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-nostdin", "-f", "lavfi", "-i", "color=gray:s=2112x2064:d=0.2:r=10",
                    "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(big)], check=True)
    _one_line_error(_invoke(["eval", str(big), str(big), "--no-temporal"]), "--size")
    _one_line_error(_invoke(["eval", str(big), str(big), "--no-temporal", "--size", "4096"]), "size")
    result = _invoke(["eval", str(big), str(big), "--no-temporal", "--size", "64", "--frames", "1"])
    assert result.exit_code == 0, result.output


def test_eval_json_never_overwrites_without_asking(clip_path, tmp_path):
    existing = tmp_path / "metrics.json"
    existing.write_text("keep me")
    _one_line_error(_invoke(["eval", str(clip_path), str(clip_path), "--no-temporal", "--json", str(existing)]),
                    "already exists", "--overwrite")
    assert existing.read_text() == "keep me"
    before = clip_path.read_bytes()
    for flags in ([], ["--overwrite"]):
        _one_line_error(_invoke(["eval", str(clip_path), str(clip_path), "--no-temporal", "--json", str(clip_path),
                                 *flags]), "is one of the inputs")
    assert clip_path.read_bytes() == before
    _one_line_error(_invoke(["eval", str(clip_path), str(clip_path), "--json", str(tmp_path)]), "is a folder")
    _one_line_error(_invoke(["eval", str(clip_path), str(clip_path), "--json", str(tmp_path / "no" / "m.json")]),
                    "does not exist")
    replaced = _invoke(["eval", str(clip_path), str(clip_path), "--no-temporal", "--json", str(existing), "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert json.loads(existing.read_text())["frames"] == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


# ------------------------------------------------------------------------------ cache values (issue 23)
# A manifest with the right types but values that do not fit, or a tensor file swapped with its hash
# updated to match: one sentence naming the entry and --force, before any step runs.


@pytest.fixture(scope="module")
def inverted(clip_path, tmp_path_factory) -> Path:
    """A finished disk-feature inversion of the clip (the cache folder), for tests to copy and tamper with."""
    cache = tmp_path_factory.mktemp("inverted") / "cache"
    args = _edit_args(clip_path, cache.parent)
    args = ["invert", *args[1:args.index("-o")], *args[args.index("-o") + 2:], "--features", "disk"]
    result = _invoke(args)
    assert result.exit_code == 0, result.output
    return cache


def _cache_copy(inverted: Path, tmp_path: Path) -> Path:
    """A copy of the inverted cache as `tmp_path/cache`; returns its entry folder."""
    import shutil

    shutil.copytree(inverted, tmp_path / "cache")
    (entry,) = [path for path in (tmp_path / "cache").iterdir() if not path.name.startswith(".")]
    return entry


def _rewrite_manifest(entry: Path, **changes) -> None:
    manifest = json.loads((entry / "manifest.json").read_text())
    (entry / "manifest.json").write_text(json.dumps({**manifest, **changes}))


def _swap_tensors(entry: Path, relative: str, change) -> None:
    """Replace `relative` with `change(its tensors)` and update its hash in the manifest, as a careful
    tamperer (or a buggy tool) would: only the values can tell."""
    import hashlib

    from safetensors.torch import load, save

    tensors = {name: tensor.contiguous() for name, tensor in change(load((entry / relative).read_bytes())).items()}
    data = save(tensors)
    (entry / relative).write_bytes(data)
    manifest = json.loads((entry / "manifest.json").read_text())
    manifest["files"][relative] = hashlib.sha256(data).hexdigest()
    (entry / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("changes", [
    {"frames": 99}, {"frames": 1}, {"latent_size": [1, 1]}, {"latent_size": [-4, 0]}, {"latent_size": [8, 8]},
    {"timesteps": [1]}, {"timesteps": [900, 1]}, {"finished_steps": 2, "files": {}}, {"finished_steps": 7},
    {"feature_steps": 9}, {"encoded_frames": 99}, {"latent_channels": 3},
], ids=lambda changes: "-".join(f"{k}={v}" for k, v in changes.items()))
def test_a_manifest_whose_values_do_not_fit_is_refused(clip_path, inverted, tmp_path, changes):
    entry = _cache_copy(inverted, tmp_path)
    _rewrite_manifest(entry, **changes)
    before = (entry / "manifest.json").read_bytes()
    _one_line_error(_invoke(_edit_args(clip_path, tmp_path, "-p", "age", "--features", "disk")),
                    str(entry), "--force")
    assert (entry / "manifest.json").read_bytes() == before and not (tmp_path / "out.mp4").exists()


LATENT = "latents/step-{:03d}.safetensors"
FEATURES = "features/step-{:03d}-w000.safetensors"


@pytest.mark.parametrize("relative, change, extra", [
    (LATENT.format(2), lambda t: {"latent": t["latent"][:1]}, ()),  # z_T of one frame
    (LATENT.format(2), lambda t: {"z": t["latent"]}, ()),  # its name
    (LATENT.format(2), lambda t: {"latent": t["latent"].double()}, ()),
    (LATENT.format(1), lambda t: {"latent": t["latent"][..., :-1]}, ("--features", "recompute")),
    (LATENT.format(0), lambda t: {"latent": t["latent"][:, :3]}, ("--composite", "residual")),  # channels
    ("trajectories.safetensors", lambda t: {name: links[:, :-1] for name, links in t.items()}, ()),
    ("trajectories.safetensors", lambda t: {name: links + 10**6 for name, links in t.items()}, ()),
    ("trajectories.safetensors", lambda t: {"7x7.links": next(iter(t.values()))}, ()),
    ("trajectories.safetensors", lambda t: {name: links.long() for name, links in t.items()}, ()),
    (FEATURES.format(1), lambda t: {name: value[..., :1, :] for name, value in t.items()}, ()),  # tokens
    (FEATURES.format(0), lambda t: dict(list(t.items())[1:]), ()),  # a feature missing
    (FEATURES.format(0), lambda t: {name: value[..., :1] for name, value in t.items()}, ()),  # channels
    (FEATURES.format(0), lambda t: {name: value[:1] for name, value in t.items()}, ()),  # frames
], ids=["z_T-frames", "z_T-name", "z_T-dtype", "z_1-width", "z_0-channels", "links-shape", "links-range",
        "links-grid", "links-dtype", "features-tokens", "features-missing", "features-channels", "features-frames"])
def test_a_tensor_file_that_does_not_fit_is_refused_even_with_its_hash_updated(clip_path, inverted, tmp_path,
                                                                                relative, change, extra):
    entry = _cache_copy(inverted, tmp_path)
    _swap_tensors(entry, relative, change)
    args = _edit_args(clip_path, tmp_path, "-p", "age", "--features", "disk", *extra)
    _one_line_error(_invoke(args), "does not fit its entry", "--force")
    assert not (tmp_path / "out.mp4").exists()


def test_the_untampered_copy_is_used(clip_path, inverted, tmp_path):
    """The control of the two tests above: their copy, untouched, edits without recomputing."""
    entry = _cache_copy(inverted, tmp_path)
    before = (entry / "manifest.json").read_bytes()
    result = _invoke(_edit_args(clip_path, tmp_path, "-p", "age", "--features", "disk"))
    assert result.exit_code == 0, result.output
    assert "Used the cached inversion" in result.output and (entry / "manifest.json").read_bytes() == before


def test_a_manifest_that_is_a_folder(clip_path, inverted, tmp_path):
    entry = _cache_copy(inverted, tmp_path)
    (entry / "manifest.json").unlink()
    (entry / "manifest.json").mkdir()
    _one_line_error(_invoke(_edit_args(clip_path, tmp_path, "-p", "age")), "is not a file", "--force")
    result = _invoke(_edit_args(clip_path, tmp_path, "-p", "age", "--force"))
    assert result.exit_code == 0, result.output
    assert (entry / "manifest.json").is_file()


def test_force_on_a_symlinked_entry_replaces_the_link_and_keeps_its_target(clip_path, inverted, tmp_path):
    entry = _cache_copy(inverted, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    entry.rename(elsewhere)
    entry.symlink_to(elsewhere, target_is_directory=True)
    kept = sorted(path.relative_to(elsewhere) for path in elsewhere.rglob("*"))
    result = _invoke(_edit_args(clip_path, tmp_path, "-p", "age"))  # read through the link
    assert result.exit_code == 0 and "Used the cached inversion" in result.output, result.output
    result = _invoke(_edit_args(clip_path, tmp_path, "-p", "age", "--force", "--overwrite"))
    assert result.exit_code == 0, result.output
    assert not entry.is_symlink() and (entry / "manifest.json").is_file()
    assert sorted(path.relative_to(elsewhere) for path in elsewhere.rglob("*")) == kept


def _read_only(monkeypatch, cache_root: Path) -> None:
    """The cache as a read-only disk shows it (tests run as root, whom chmod does not stop): nothing under
    `cache_root` is writable, and every write there fails with EROFS."""
    import errno

    from diffferv_cli import files
    from diffferv_cli.editing import cache

    real_access, real_write = os.access, files.atomic_write_bytes

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and str(path).startswith(str(cache_root)):
            return False
        return real_access(path, mode, *args, **kwargs)

    def write(path, data, **kwargs):
        if str(path).startswith(str(cache_root)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_write(path, data, **kwargs)

    monkeypatch.setattr(cache.os, "access", access)
    monkeypatch.setattr(cache, "atomic_write_bytes", write)


def test_a_finished_entry_on_a_read_only_disk_is_used(clip_path, inverted, tmp_path, monkeypatch):
    entry = _cache_copy(inverted, tmp_path)
    _read_only(monkeypatch, tmp_path / "cache")
    result = _invoke(_edit_args(clip_path, tmp_path, "-p", "age", "--features", "disk"))
    assert result.exit_code == 0 and "Used the cached inversion" in result.output, result.output
    assert (tmp_path / "out.mp4").is_file()
    _rewrite_manifest(entry, finished_steps=1)  # unfinished: it would have to be written
    _one_line_error(_invoke(_edit_args(clip_path, tmp_path, "-p", "age", "--overwrite")),
                    str(tmp_path / "cache"), "not writable", "--cache-dir")


# --------------------------------------------------------------- the operating system's failures (issue 23)


def test_the_file_size_limit_while_writing_the_cache_is_one_sentence(clip_path, tmp_path):
    """`ulimit -f` for real (Python ignores SIGXFSZ, so the write fails with EFBIG)."""
    import resource
    import sys

    args = _edit_args(clip_path, tmp_path)
    args = ["invert", *args[1:args.index("-o")], *args[args.index("-o") + 2:], "--features", "disk"]
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # noqa: E731
    run = subprocess.run([sys.executable, "-m", "diffferv_cli", *args], capture_output=True, text=True, timeout=300,
                         preexec_fn=limit, env={**os.environ, "DIFFFERV_NO_FACE_CHECK": "1"})
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert "Cannot write the cache file" in run.stderr and "ulimit -f" in run.stderr and str(tmp_path) in run.stderr


@pytest.mark.parametrize("code, reason", [
    ("ENOSPC", "no space left on the device"), ("EDQUOT", "the disk quota is exceeded"), ("EFBIG", "ulimit -f"),
    ("EROFS", "the file system is read-only"), ("EACCES", "permission denied"), ("ELOOP", "a symbolic link loop"),
    ("EISDIR", "it is a folder"), ("EIO", "input/output error"),
])
def test_every_kind_of_write_failure_in_the_cache_names_the_file_and_the_action(tmp_path, monkeypatch, code,
                                                                                 reason):
    import errno

    import torch

    from diffferv_cli.editing import cache
    from diffferv_cli.errors import UserError

    entry = cache.open_entry(tmp_path, {"steps": 1})

    def fail(path, data, **kwargs):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)), str(path))

    monkeypatch.setattr(cache, "atomic_write_bytes", fail)
    with pytest.raises(UserError) as error:
        entry.write_latent(0, torch.zeros(1, 4, 2, 2))
    assert str(error.value).startswith(f"Cannot write the cache file {entry.folder / entry.latent_name(0)}: ")
    assert reason in str(error.value)
    with pytest.raises(UserError, match=f"Cannot write the cache file {entry.manifest_path}: .*{reason}"):
        entry.save_manifest()


def test_a_read_failure_in_the_cache_names_the_file_and_the_action(tmp_path, monkeypatch):
    import errno
    from pathlib import PosixPath

    import torch

    from diffferv_cli.editing import cache
    from diffferv_cli.errors import UserError

    entry = cache.open_entry(tmp_path, {"steps": 1})
    entry.write_latent(0, torch.zeros(1, 4, 2, 2))

    def fail(self):
        raise OSError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(PosixPath, "read_bytes", fail)
    with pytest.raises(UserError, match=r"Cannot read the cache file .*step-000.safetensors: permission denied"):
        entry.read_latent(0)


def test_os_errors_nobody_named_become_one_sentence_and_others_stay_bugs():
    import errno

    import typer

    from diffferv_cli.cli import friendly

    def failing(number):
        @friendly
        def command():
            raise OSError(number, os.strerror(number), "/some/file")
        return command

    with pytest.raises(typer.Exit) as stopped:
        failing(errno.ENOSPC)()
    assert stopped.value.exit_code == 2
    with pytest.raises(OSError):  # not a user's mistake or the disk's: a traceback
        failing(errno.ECONNRESET)()


def test_a_symlink_loop_is_named_as_one(tmp_path):
    (tmp_path / "a.mp4").symlink_to(tmp_path / "b.mp4")
    (tmp_path / "b.mp4").symlink_to(tmp_path / "a.mp4")
    _one_line_error(_invoke(["invert", str(tmp_path / "a.mp4"), "--model", "tiny-random", "--device", "cpu",
                             "--cache-dir", str(tmp_path / "cache")]), "symbolic link loop", str(tmp_path / "a.mp4"))
    _one_line_error(_invoke(["invert", str(tmp_path / "none.mp4"), "--model", "tiny-random", "--device", "cpu",
                             "--cache-dir", str(tmp_path / "cache")]), "does not exist")


def _permissions_apply(tmp_path: Path) -> list[str]:
    """A command prefix under which file permissions stop this process: none for a plain user; for root
    (whom chmod does not stop), util-linux's setpriv without the two capabilities that override them.
    Skips when a probe shows that permissions still do not apply."""
    import shutil
    import sys

    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: permissions cannot be made to apply")
        prefix = [setpriv, "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps",
                  "-dac_override,-dac_read_search", "--"]
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "file").write_bytes(b"")
    probe.chmod(0o600)
    try:
        check = subprocess.run([*prefix, sys.executable, "-c", "import os, sys; os.stat(sys.argv[1])",
                                str(probe / "file")], capture_output=True, text=True, timeout=60)
    finally:
        probe.chmod(0o700)
    if "PermissionError" not in check.stderr:
        pytest.skip(f"permissions do not apply to this process here ({check.stderr.strip()[-200:] or 'stat passed'})")
    return prefix


@pytest.mark.parametrize("command", ["invert", "eval", "train", "caption"])
def test_an_input_inside_a_folder_without_search_permission(clip_path, faces, tmp_path, command):
    """For real: the folder is mode 0600 (listable by nobody, searchable by nobody) and the command runs
    where permissions apply, so every stat of the input fails with EACCES."""
    import shutil
    import sys

    prefix = _permissions_apply(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    shutil.copy(clip_path, locked / "clip.mp4")
    shutil.copytree(faces, locked / "faces")
    args = {"invert": ["invert", str(locked / "clip.mp4"), "--model", "tiny-random", "--device", "cpu",
                       "--cache-dir", str(tmp_path / "cache")],
            "eval": ["eval", str(locked / "clip.mp4"), str(clip_path), "--no-temporal"],
            "train": _train_args(locked / "faces", tmp_path),
            "caption": ["caption", str(locked / "faces"), "--model", "nobody/nothing", "--device", "cpu"]}[command]
    named = locked / ("clip.mp4" if command in ("invert", "eval") else "faces")
    locked.chmod(0o600)
    try:
        run = subprocess.run([*prefix, sys.executable, "-m", "diffferv_cli", *args], capture_output=True, text=True,
                             timeout=300, env={**os.environ, "COLUMNS": "300"})
    finally:
        locked.chmod(0o700)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, run.stderr
    assert str(named) in errors[0] and "may not be searched" in errors[0], errors[0]
    assert not (tmp_path / "cache").exists() and not (tmp_path / "model").exists()


# ------------------------------------------------------------------------------- model folders (issue 23)
# A foreign pickle where a model's weights should be (`--model` folder, `caption --model` folder, a single
# file): one sentence naming the file, and its code never runs -- each payload below creates a marker file
# when unpickled, and the marker must not exist afterwards.


class _Payload:
    """Unpickling this creates `marker`: proof that a pickle's code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _foreign_pickle(kind: str, marker: Path) -> bytes:
    """The bytes of a pickled weight file that is not a plain state dict: code (plain pickle, or torch's
    zip format), or data of the wrong kind (a tensor, a list, numbers where tensors belong)."""
    import io
    import pickle

    import torch

    if kind == "code":
        return pickle.dumps({"conv_in.weight": _Payload(marker)})
    value = {"code-in-zip": {"conv_in.weight": _Payload(marker)}, "tensor": torch.zeros(2), "list": [1, 2, 3],
             "numbers": {"conv_in.weight": 5}}[kind]
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """The tiny random model saved as a diffusers folder (safetensors weights)."""
    from diffferv_cli.models.loading import save_components
    from diffferv_cli.models.tiny import build_tiny_random

    folder = tmp_path_factory.mktemp("model") / "tiny"
    save_components(build_tiny_random(), folder)
    return folder


def _model_copy(model_folder: Path, tmp_path: Path, subfolder: str, name: str, data: bytes) -> tuple[Path, Path]:
    """A copy of the model folder whose `subfolder` holds `name` (with these bytes) instead of its
    safetensors weights, so the loaders would read `name`; returns (folder, file)."""
    import shutil

    folder = tmp_path / "mine"
    shutil.copytree(model_folder, folder)
    for weights in (folder / subfolder).glob("*.safetensors"):
        weights.unlink()
    (folder / subfolder / name).write_bytes(data)
    return folder, folder / subfolder / name


def _with_model(args: list[str], model: str) -> list[str]:
    args = list(args)
    args[args.index("--model") + 1] = model
    return args


def _invert_args(clip_path: Path, tmp_path: Path, *extra: str) -> list[str]:
    args = _edit_args(clip_path, tmp_path, *extra)
    return ["invert", *args[1:args.index("-o")], *args[args.index("-o") + 2:]]


@pytest.mark.parametrize("subfolder, name, kind", [
    ("text_encoder", "pytorch_model.bin", "code"),  # transformers' name; a plain pickle
    ("unet", "diffusion_pytorch_model.bin", "code-in-zip"),  # diffusers' name; torch.save's format
    ("vae", "diffusion_pytorch_model.bin", "tensor"),
    ("text_encoder", "pytorch_model.bin", "list"),
    ("unet", "diffusion_pytorch_model.bin", "numbers"),
])
def test_a_foreign_pickle_in_a_model_folder_is_named_and_never_runs(clip_path, model_folder, tmp_path, subfolder,
                                                                      name, kind):
    marker = tmp_path / "pickled-code-ran"
    folder, weights = _model_copy(model_folder, tmp_path, subfolder, name, _foreign_pickle(kind, marker))
    text = _one_line_error(_invoke(_with_model(_invert_args(clip_path, tmp_path), str(folder))),
                           f"its weight file {weights}")
    assert ("could run code" in text) == kind.startswith("code"), text
    assert not marker.exists() and not (tmp_path / "cache").exists()


def test_train_refuses_a_foreign_pickle_in_its_model_folder(faces, model_folder, tmp_path):
    marker = tmp_path / "pickled-code-ran"
    folder, weights = _model_copy(model_folder, tmp_path, "unet", "diffusion_pytorch_model.bin",
                                  _foreign_pickle("code-in-zip", marker))
    _one_line_error(_invoke(_with_model(_train_args(faces, tmp_path), str(folder))), f"its weight file {weights}",
                    "could run code")
    assert not marker.exists() and not (tmp_path / "model").exists()


@pytest.mark.parametrize("suffix, words", [(".ckpt", "without running its pickled code"),
                                           (".pt", "a single-file model is a .safetensors (or .ckpt)"),
                                           (".bin", "a single-file model is a .safetensors (or .ckpt)")])
def test_a_single_file_that_is_a_pickle_never_runs(clip_path, tmp_path, suffix, words):
    import pickle

    marker = tmp_path / "pickled-code-ran"
    model = tmp_path / f"model{suffix}"
    model.write_bytes(pickle.dumps({"state_dict": {"model.diffusion_model.x": _Payload(marker)}}))
    _one_line_error(_invoke(_with_model(_invert_args(clip_path, tmp_path), str(model))), str(model), words)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["code", "code-in-zip", "numbers"])
def test_a_foreign_pickle_in_a_caption_model_folder_is_named_and_never_runs(faces, tmp_path, kind):
    marker = tmp_path / "pickled-code-ran"
    folder = tmp_path / "captioner"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llava"}))
    (folder / "pytorch_model.bin").write_bytes(_foreign_pickle(kind, marker))
    _one_line_error(_invoke(["caption", str(faces), "--model", str(folder), "--device", "cpu"]),
                    f"Captioning model {str(folder)!r} cannot be loaded: its weight file {folder / 'pytorch_model.bin'}")
    assert not marker.exists() and not list(faces.glob("*.txt"))


def test_the_loaders_own_refusal_of_a_pickle_is_one_sentence_too(model_folder, tmp_path, monkeypatch):
    """Where no check of ours ran first (a hub model being downloaded), transformers and diffusers read
    pickles with weights_only and raise UnpicklingError: said in one sentence, not a traceback."""
    import pickle

    import transformers

    from diffferv_cli.errors import UserError
    from diffferv_cli.models import auxiliary, loading

    def refuse(*args, **kwargs):
        raise pickle.UnpicklingError("Weights only load failed.")

    monkeypatch.setattr(transformers, "pipeline", refuse)
    with pytest.raises(UserError, match=r"^Captioning model 'someone/captioner' cannot be loaded: .* could run code"):
        auxiliary.load_captioner("someone/captioner", device="cpu")
    monkeypatch.setattr(loading, "_load_from_pretrained", refuse)
    with pytest.raises(UserError, match="is a pickle that could run code"):
        loading.load_components(str(model_folder), device="cpu")


def test_plain_pickled_weights_load_and_files_the_loaders_never_read_are_left_alone(model_folder, tmp_path):
    """The control: a folder of .bin state dicts (the older save format) loads with the same weights, and
    a Trainer's training_args.bin -- a pickle of code that no loader reads -- neither runs nor refuses it."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from diffferv_cli.models.loading import load_components
    from diffferv_cli.models.pickled import pickled_weight_files

    folder = tmp_path / "bins"
    shutil.copytree(model_folder, folder)
    for weights in folder.glob("*/*.safetensors"):
        name = "pytorch_model.bin" if weights.parent.name.startswith("text_encoder") else "diffusion_pytorch_model.bin"
        torch.save(load_file(weights), weights.parent / name)
        weights.unlink()
    marker = tmp_path / "pickled-code-ran"
    (folder / "unet" / "training_args.bin").write_bytes(_foreign_pickle("code", marker))
    assert [path.name for path in pickled_weight_files(folder / "unet")] == ["diffusion_pytorch_model.bin"]
    loaded = load_components(str(folder), device="cpu", dtype="fp32")
    original = load_components(str(model_folder), device="cpu", dtype="fp32")
    for got, expected in ((loaded.unet, original.unet), (loaded.text_encoder, original.text_encoder)):
        assert all(torch.equal(got.state_dict()[key], value) for key, value in expected.state_dict().items())
    assert not marker.exists()
    # beside safetensors weights a .bin is never read; the shards an index names are
    (folder / "vae" / "model.safetensors").write_bytes(b"")
    (folder / "text_encoder" / "model.safetensors").write_bytes(b"")
    assert pickled_weight_files(folder / "text_encoder") == []
    (folder / "vae" / "diffusion_pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {"a": "part-1.bin", "b": "part-2.bin", "c": "missing.bin"}}))
    for part in ("part-1.bin", "part-2.bin"):
        (folder / "vae" / part).write_bytes(b"")
    assert [path.name for path in pickled_weight_files(folder / "vae")] == [
        "diffusion_pytorch_model.bin", "part-1.bin", "part-2.bin"]


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.safetensors"])
def test_weights_of_another_model_are_refused_rather_than_filled_at_random(clip_path, model_folder, tmp_path, name):
    """A state dict whose names are not the model's: transformers would initialise the text encoder at random
    without a word (diffusers leave the tensors empty and fail later with a traceback)."""
    import io

    import torch
    from safetensors.torch import save

    state = {"something.else.weight": torch.zeros(2, 2)}
    if name.endswith(".bin"):
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
    else:
        data = save(state)
    folder, _ = _model_copy(model_folder, tmp_path, "text_encoder", name, data)
    _one_line_error(_invoke(_with_model(_invert_args(clip_path, tmp_path), str(folder))),
                    "the weights in text_encoder/ lack", "of the model's tensors")


# ------------------------------------------------------------------------------------ outputs (issue 23)
# Every target checked before any work (no cache entry is made), never two targets one file, never a
# second command on a file the first is writing, no leftover of a killed writer kept.


def _pirate(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pirate.toml").write_text('description = "Arr."\nedit_prompt = "a photo of a {subject} as a pirate"\n')
    return folder / "pirate.toml"


@pytest.mark.parametrize("case", ["suffix", "no-folder", "hard-link", "symlink", "device", "folder", "same-preset",
                                  "same-file-name", "side-by-side-clash", "empty"])
def test_output_targets_are_checked_before_any_work(clip_path, tmp_path, case):
    import shutil

    clip = tmp_path / "clip.mp4"
    shutil.copy(clip_path, clip)
    base = _edit_args(clip, tmp_path)
    out = base.index("-o") + 1
    fragments: tuple[str, ...] = ()
    if case == "suffix":
        base[out], fragments = str(tmp_path / "out.avi"), ("must end in .mp4",)
    elif case == "no-folder":
        base[out], fragments = str(tmp_path / "none" / "deeper" / "out.mp4"), ("does not exist",)
    elif case == "hard-link":
        os.link(clip, tmp_path / "out.mp4")
        base += ["--overwrite"]
        fragments = ("is the input",)
    elif case == "symlink":
        (tmp_path / "out.mp4").symlink_to(clip)
        base += ["--overwrite"]
        fragments = ("is the input",)
    elif case == "device":
        (tmp_path / "out.mp4").symlink_to("/dev/null")
        base += ["--overwrite"]
        fragments = ("not a regular file",)
    elif case == "folder":  # -o names a folder; the file it would write there is a folder
        (tmp_path / "box" / "clip.age.mp4").mkdir(parents=True)
        base[out] = str(tmp_path / "box")
        base += ["--overwrite"]
        fragments = ("is a folder",)
    elif case == "same-preset":
        base[out], fragments = str(tmp_path / "outs"), ("same file",)
        base += ["-p", "age", "-p", "age"]
    elif case == "same-file-name":  # two presets named alike in two folders
        base[out], fragments = str(tmp_path / "outs"), ("same file",)
        base += ["-p", str(_pirate(tmp_path / "one")), "-p", str(_pirate(tmp_path / "two"))]
    elif case == "side-by-side-clash":  # an edit labelled like another's comparison
        (tmp_path / "presets").mkdir()
        (tmp_path / "presets" / "age.side-by-side.toml").write_text(
            'description = "x"\nedit_prompt = "a photo of an old {subject}"\n')
        base[out], fragments = str(tmp_path / "outs"), ("same file",)
        base += ["-p", "age", "-p", str(tmp_path / "presets" / "age.side-by-side.toml"), "--side-by-side"]
    elif case == "empty":
        base[out], fragments = "", ("empty",)
    if case not in ("same-preset", "same-file-name", "side-by-side-clash"):
        base += ["-p", "age"]
    result = _invoke(base)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert all(fragment in text for fragment in fragments), result.output
    assert not (tmp_path / "cache").exists() and not (tmp_path / "outs").exists()
    assert clip.read_bytes() == clip_path.read_bytes()
    if case == "device":
        assert (tmp_path / "out.mp4").is_symlink()


def _claim_lock(target: Path):
    """The lock `files.claim_outputs` takes for `target`, opened separately: held, it is another command."""
    import hashlib

    from filelock import FileLock

    from diffferv_cli.files import _claims_folder, _target_key

    _claims_folder().mkdir(parents=True, exist_ok=True)
    return FileLock(_claims_folder() / f"{hashlib.sha256(_target_key(target).encode()).hexdigest()[:32]}.lock")


def test_a_second_command_writing_the_same_output_is_refused(clip_path, tmp_path):
    other = _claim_lock(tmp_path / "out.mp4")
    other.acquire(timeout=0)
    try:
        _one_line_error(_invoke(_edit_args(clip_path, tmp_path, "-p", "age")), "Another diffferv command is writing",
                        str(tmp_path / "out.mp4"))
        assert not (tmp_path / "cache").exists()
        reconstruct = _edit_args(clip_path, tmp_path)
        reconstruct[0] = "reconstruct"
        _one_line_error(_invoke(reconstruct), "Another diffferv command is writing")
    finally:
        other.release()


def test_a_command_lets_go_of_its_outputs_and_removes_leftovers_of_killed_writers(clip_path, tmp_path):
    killed = [tmp_path / ".out.k1ll3d_9.partial.mp4", tmp_path / ".out.zzzzzzzz.partial.mp4"]
    killed[0].write_bytes(b"half a video")  # SIGTERM mid-write (an older version), and SIGKILL: 0 bytes
    killed[1].write_bytes(b"")
    others = [tmp_path / ".out.b.zzzzzzzz.partial.mp4", tmp_path / ".out.zzzzzzzz.partial.mov",
              tmp_path / ".outer.zzzzzzzz.partial.mp4"]  # another target's, never touched
    for path in others:
        path.write_bytes(b"")
    result = _invoke(_edit_args(clip_path, tmp_path, "-p", "age"))
    assert result.exit_code == 0, result.output
    assert not any(path.exists() for path in killed) and all(path.exists() for path in others)
    assert (tmp_path / "out.mp4").is_file()
    lock = _claim_lock(tmp_path / "out.mp4")
    lock.acquire(timeout=0)  # released when the command ended
    lock.release()


def test_sigterm_is_handled_as_an_interrupt(monkeypatch):
    """The CLI's entry point turns SIGTERM into KeyboardInterrupt, so writers remove their temporary file."""
    import signal

    from diffferv_cli import cli

    installed = {}
    monkeypatch.setattr(signal, "signal", lambda number, handler: installed.update({number: handler}))
    monkeypatch.setattr(cli, "app", lambda: None)
    cli.main()
    with pytest.raises(KeyboardInterrupt):
        installed[signal.SIGTERM](signal.SIGTERM, None)


# ------------------------------------------------------------------------------------ prompts (issue 23)


@pytest.mark.parametrize("option, value", [("--prompt", ""), ("--prompt", "   "), ("--prompt-edit", ""),
                                           ("--prompt-edit", "\t")])
def test_an_empty_prompt_is_refused(clip_path, tmp_path, option, value):
    args = _edit_args(clip_path, tmp_path, option, value)
    if option == "--prompt":
        args += ["-p", "age"]
    _one_line_error(_invoke(args), option, "empty")
    assert not (tmp_path / "cache").exists()


def test_a_prompt_longer_than_the_text_encoder_warns_once_naming_the_cut_words(clip_path, tmp_path, caplog):
    """Encoded by the inversion and again by the edit, said once (on stderr; pytest's log capture takes it here)."""
    import logging

    prompt = "a photo of a person " + " ".join(f"w{index}" for index in range(90)) + " lastword"
    with caplog.at_level(logging.WARNING, logger="diffferv"):
        result = _invoke(_edit_args(clip_path, tmp_path, "--prompt", prompt, "--prompt-edit", "a photo of a woman"))
    assert result.exit_code == 0, result.output
    warnings = [record.getMessage() for record in caplog.records if "text encoder" in record.getMessage()]
    assert len(warnings) == 1, warnings
    assert "longer than the text encoder's 77 tokens; these words are cut: " in warnings[0]
    assert "(68 words)" in warnings[0] and "w89" not in warnings[0].split("cut: ")[1]  # the list is shortened


def test_cut_words_are_exactly_those_past_the_encoder_length():
    from diffferv_cli.editing.prompts import cut_words
    from diffferv_cli.models.loading import load_components

    tokenizer = load_components("tiny-random", device="cpu", dtype="fp32").tokenizer
    room = tokenizer.model_max_length - 2
    fits = " ".join(["a"] * room)
    assert len(tokenizer(fits, add_special_tokens=False).input_ids) == room
    assert cut_words(tokenizer, fits) == []
    assert cut_words(tokenizer, fits + " old") == ["old"]
    assert cut_words(tokenizer, fits + " old man") == ["old", "man"]


# ------------------------------------------------------------------------------- eval and training (issue 23)


def test_eval_refuses_frame_folders_of_mixed_sizes(tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    cv2.imwrite(str(frames / "0.png"), np.zeros((48, 64, 3), np.uint8))
    cv2.imwrite(str(frames / "1.png"), np.zeros((48, 80, 3), np.uint8))  # wider: it used to be stretched
    _one_line_error(_invoke(["eval", str(frames), str(frames), "--no-temporal"]), "80x48", "64x48", "one size")


def test_a_checkpoint_whose_state_contradicts_its_run_is_refused(faces, tmp_path):
    import shutil

    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps({"file": f"img{index}.png", "text": "a face"}) + "\n" for index in range(2)))
    result = _invoke(_train_args(faces, tmp_path, "--checkpoint-every", "1", "--captions", str(captions)), timeout=300)
    assert result.exit_code == 0, result.output
    checkpoint = tmp_path / "model" / "checkpoints" / "step-0000001"
    state = json.loads((checkpoint / "train_state.json").read_text())
    (checkpoint / "train_state.json").write_text(json.dumps({**state, "step": 10**9}))
    resume = [*_train_args(faces, tmp_path, "--captions", str(captions)), "--resume", "latest"]
    resume[resume.index("--steps") + 1] = "3"
    _one_line_error(_invoke(resume, timeout=300), "step 1000000000", "not 1")
    renamed = tmp_path / "mine"  # a folder of any name: its optimizer's step count tells
    shutil.copytree(checkpoint, renamed)
    resume[-1] = str(renamed)
    _one_line_error(_invoke(resume, timeout=300), "step 1000000000", "optimizer took 1 steps")


# ----------------------------------------------------------------------------- same bytes (issue 23)


def test_compile_is_part_of_the_cache_key(clip_path, inverted, tmp_path, monkeypatch):
    """A compiled inversion's latents are ~1e-6 from eager: never under the eager key (torch.compile itself
    is replaced by the plain UNet here; only the key is under test)."""
    from diffferv_cli.editing import inversion

    monkeypatch.setattr(inversion, "unet_for_loop", lambda unet, compile_unet=False: unet)
    entry = _cache_copy(inverted, tmp_path)
    args = _edit_args(clip_path, tmp_path)
    args = ["invert", *args[1:args.index("-o")], *args[args.index("-o") + 2:]]
    eager = _invoke(args)
    assert eager.exit_code == 0 and "reused" in eager.output, eager.output  # the eager key is unchanged
    compiled = _invoke([*args, "--compile"])
    assert compiled.exit_code == 0 and "2 steps run" in compiled.output, compiled.output
    entries = [path for path in (tmp_path / "cache").iterdir() if not path.name.startswith(".")]
    assert len(entries) == 2 and entry in entries
    again = _invoke([*args, "--compile"])
    assert "reused" in again.output, again.output


# -------------------------------------------------- --region auto on wide boxes in landscape frames (issue 23)
# The face box found by `--region auto` (the union of the tracked faces, grown by the head margins, then
# to the working aspect) in 16:9 and wider frames, with wide faces at the left and right edges and faces
# moving across the frame: inside the frame, holding every face, wide when the faces are, scaling to the
# working size with real pixels, not mirrored pad (where the frame has them).


def _faces(frame: tuple[int, int], where: str) -> list:
    """Synthetic detections (one per frame, wide: 2:1) for a `where` of the frame."""
    from diffferv_cli.evaluation.faces import Box

    width, height = frame
    face_height = max(8, height // 8)
    face_width = 2 * face_height
    middle = height // 2 - face_height // 2
    lefts = {"left-edge": [-face_width // 4, 0, face_width // 2],  # partly outside, then at the edge
             "right-edge": [width - face_width - face_width // 2, width - face_width, width - 3 * face_width // 4],
             "across": [0, (width - face_width) // 2, width - face_width],
             "across-top": [0, (width - face_width) // 2, width - face_width]}[where]
    top = -face_height // 4 if where == "across-top" else middle
    return [Box(left, top, left + face_width, top + face_height) for left in lefts]


@pytest.mark.parametrize("frame", [(1920, 1080), (1280, 720), (192, 108), (2560, 1080)])
@pytest.mark.parametrize("where", ["left-edge", "right-edge", "across", "across-top"])
@pytest.mark.parametrize("short_side, multiple", [(512, 64), (64, 16)])
def test_region_auto_on_wide_faces_in_landscape_frames(frame, where, short_side, multiple):
    from diffferv_cli.editing.region import fit_working_aspect, head_box
    from diffferv_cli.video.geometry import MAX_ASPECT, working_geometry

    spec = ClipSpec(short_side=short_side, multiple=multiple)
    faces = _faces(frame, where)
    head = head_box(faces, frame)
    x, y, width, height = region = fit_working_aspect(head, frame, spec)
    assert 0 <= x and 0 <= y and x + width <= frame[0] and y + height <= frame[1], region
    for left, top, right, bottom in [*faces, (head[0], head[1], head[0] + head[2], head[1] + head[3])]:
        left, top, right, bottom = max(left, 0), max(top, 0), min(right, frame[0]), min(bottom, frame[1])
        assert x <= left and y <= top and right <= x + width and bottom <= y + height, (region, faces)
    assert (width >= height) == (head[2] >= head[3]), (head, region)  # wide stays wide: no square assumed
    geometry = working_geometry((width, height), spec)
    work_width, work_height = geometry.working_size
    assert work_width % multiple == 0 and work_height % multiple == 0 and min(work_width, work_height) == short_side
    pad = work_width - geometry.scaled_size[0] + work_height - geometry.scaled_size[1]
    long_side_at_the_frame = (width if width >= height else height) == (frame[0] if width >= height else frame[1])
    assert pad <= 1 or (long_side_at_the_frame and pad < multiple), (region, geometry)
    if max(head[2], head[3]) <= MAX_ASPECT * min(head[2], head[3]):  # the box needed no taller: same work
        assert geometry.working_size == working_geometry(head[2:], spec).working_size


@pytest.mark.parametrize("faces, region", [
    # three wide faces (160x100) moving right in the right half: the box shifts left to stay inside
    ([(1100, 500, 1260, 600), (1400, 500, 1560, 600), (1700, 500, 1860, 600)], (970, 340, 950, 380)),
    # the same at the left edge: grown to the right only
    ([(60, 500, 220, 600), (360, 500, 520, 600), (660, 500, 820, 600)], (0, 340, 950, 380)),
    # small faces (120x80) at the top edge, from edge to edge: the head box (1920x170, 11:1) used to be
    # refused as "Frames of 1920x170 are too elongated"; it grows to 8:1 instead
    ([(0, 0, 120, 80), (900, 0, 1020, 80), (1800, 0, 1920, 80)], (0, 0, 1920, 240)),
])
def test_region_auto_boxes_in_a_full_hd_frame_by_hand(faces, region):
    """Worked by hand for 1920x1080 at the default 512 / 64: head box = union + margins (0.75 side left,
    right and below, 1 side above), clipped; then the long side grows to what scales to the working width.
    First case: side 160, union 1100..1860 x 500..600 -> 980..1920 x 340..720 (940x380); 380 -> 512 scales
    940 to 1266.5, working 1280, and 950 is the widest that scales to 1280: centred at 975, shifted to 970."""
    from diffferv_cli.editing.region import fit_working_aspect, head_box
    from diffferv_cli.evaluation.faces import Box
    from diffferv_cli.video.geometry import working_geometry

    spec = ClipSpec()
    assert fit_working_aspect(head_box([Box(*face) for face in faces], (1920, 1080)), (1920, 1080), spec) == region
    geometry = working_geometry(region[2:], spec)
    assert geometry.scaled_size == geometry.working_size  # real pixels only


def test_cli_region_auto_on_a_wide_face_at_the_edge_of_a_landscape_clip(tmp_path, monkeypatch):
    """End to end with the detector replaced: the region the job gets is the one above, and the edit
    leaves every pixel outside it as the source has it (lossless), in a 16:9 clip."""
    import re
    from types import SimpleNamespace

    from media import decode_all, make_test_clip

    from diffferv_cli.editing import region as regions
    from diffferv_cli.editing.region import fit_working_aspect, head_box
    from diffferv_cli.evaluation.faces import Box
    from diffferv_cli.models import auxiliary

    clip = make_test_clip(tmp_path / "wide.mp4", width=192, height=108, frames=2, fps=8)
    faces = [Box(120, 40, 150, 58), Box(140, 40, 170, 58)]  # 30x18, moving right towards the edge
    detections = [[face] for face in faces]

    class Faces:
        name = "fake"

        def detect(self, frame):
            assert frame.shape[:2] == (108, 192)
            return detections.pop(0)

    monkeypatch.setattr(auxiliary, "load_face_backend", lambda *args: SimpleNamespace(analyzer=Faces(), reason=None))
    monkeypatch.setattr(regions, "_landmark_source", lambda: None)
    out = tmp_path / "out.mp4"
    args = _edit_args(clip, tmp_path, "-p", "age", "--region", "auto", "--lossless")
    args[args.index("-o") + 1] = str(out)
    result = _invoke(args)
    assert result.exit_code == 0, result.output
    found = re.search(r"Face region (\d+),(\d+),(\d+),(\d+)", " ".join(result.output.split()))
    assert found, result.output
    x, y, width, height = (int(value) for value in found.groups())
    assert "face found in every frame" in " ".join(result.output.split()), result.output
    assert (x, y, width, height) == fit_working_aspect(head_box(faces, (192, 108)), (192, 108),
                                                       ClipSpec(short_side=64, multiple=16)) == (86, 10, 106, 71)
    source, written = decode_all(clip)[:2], decode_all(out)
    outside = np.ones((108, 192), bool)
    outside[y:y + height, x:x + width] = False
    assert np.array_equal(written[:, outside], source[:, outside])
    assert not np.array_equal(written[:, ~outside], source[:, ~outside])


# ------------------------------------------------------------------ every flag reaches the job (issue 23)
# Each option of invert / edit / reconstruct, given a value other than its default, changes exactly the
# field of the configuration the job gets that it names, and nothing else: an option wired to the wrong
# field (--tau-motion into tau_cross, --no-tta into swcfa) or to none fails here. A new option without an
# entry below fails too.


class _Stop(Exception):
    """Raised by a stand-in for the library once the CLI has handed over what it built."""


@pytest.fixture
def handed_over(monkeypatch):
    """Stand-ins for the loader and the job runners that record what a command hands them, then stop."""
    from types import SimpleNamespace

    import diffferv_cli.cli.edit as edit_cli
    import diffferv_cli.editing.job as job
    import diffferv_cli.editing.settings as settings

    seen: dict = {}
    check_writable = job.check_writable

    def load(clip_path, spec, model, device, dtype, report, region="full", model_options=None):
        seen.update(spec=spec, model=model, device=device, dtype=dtype, region=region,
                    model_options=dict(model_options or {}))
        return SimpleNamespace(), SimpleNamespace()

    def record(*args, **kwargs):
        seen.update(args=args[2:], kwargs={name: value for name, value in kwargs.items() if name != "progress"})

    def stop(*args, **kwargs):
        record(*args, **kwargs)
        raise _Stop

    def reconstruct(*args, **kwargs):
        record(*args, **kwargs)
        return SimpleNamespace(), SimpleNamespace(result=SimpleNamespace(frames=None), reference=None)

    def write(video, frames, target, **kwargs):
        seen.update(target=target, lossless=kwargs["lossless"])
        raise _Stop

    def checked(path, inputs, overwrite, *args, **kwargs):
        seen["overwrite_checked"] = overwrite
        return check_writable(path, inputs, overwrite, *args, **kwargs)

    monkeypatch.setattr(edit_cli, "_load", load)
    monkeypatch.setattr(edit_cli, "lora_options", lambda values: [(Path(value), 1.0) for value in values or ()])
    monkeypatch.setattr(edit_cli, "_report_paths", lambda clip, outputs, overwrite: (
        seen.update(reports=list(outputs)) or {output: output.with_suffix(".report.html") for output in outputs}))
    monkeypatch.setattr(job, "run_inversion", stop)
    monkeypatch.setattr(job, "run_edits", stop)
    monkeypatch.setattr(job, "run_reconstruction", reconstruct)
    monkeypatch.setattr(job, "write_result", write)
    monkeypatch.setattr(job, "check_writable", checked)
    monkeypatch.setattr(settings, "edit_settings", lambda *args, **kwargs: {})
    return seen


def _flat(value, prefix: str = "") -> dict[str, object]:
    """Nested configs and dicts as {"inversion.temporal.tta": False, ...}."""
    from pydantic import BaseModel

    if isinstance(value, BaseModel):
        value = value.model_dump()
    if isinstance(value, dict):
        flat = {}
        for name, item in value.items():
            flat.update(_flat(item, f"{prefix}.{name}" if prefix else str(name)))
        return flat
    return {prefix: value}


def _handed_over(command: str, seen: dict) -> dict[str, object]:
    """What the job got, by field: the clip, model and device, the configs, the runner's keywords."""
    got = {name: seen.get(name) for name in ("spec", "model", "device", "dtype", "region", "model_options",
                                               "target", "lossless", "reports", "overwrite_checked")}
    got["inversion"] = seen["args"][0]
    if command == "edit":
        got["edits"] = {label: config for label, config in seen["args"][1]}
    if command == "reconstruct":
        got["path"] = seen["args"][1]
    got["kwargs"] = seen["kwargs"]
    return _flat(got)


def _run_flags(seen: dict, args: list[str]) -> dict[str, object]:
    seen.clear()
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, _Stop), (args, result.output)
    return _handed_over(args[0], seen)


def _job_flags(tmp_path: Path) -> dict[str, tuple[list[str], dict[str, object]]]:
    """The options every job command has: option -> (arguments, {field: value it must set})."""
    return {
        "prompt": (["--prompt", "a photo of a cat"], {"inversion.prompt": "a photo of a cat"}),
        "model": (["--model", str(tmp_path / "model.safetensors")], {"model": str(tmp_path / "model.safetensors")}),
        "prediction_type": (["--prediction-type", "v_prediction"], {"model_options.prediction_type": "v_prediction"}),
        "clip_skip": (["--clip-skip", "2"], {"model_options.clip_skip": 2}),
        "lora": (["--lora", "person.safetensors"], {"model_options.loras": [(Path("person.safetensors"), 1.0)]}),
        "start": (["--start", "3"], {"spec.start": 3}),
        "frames": (["--frames", "5"], {"spec.frames": 5}),
        "stride": (["--stride", "2"], {"spec.stride": 2}),
        "size": (["--size", "256"], {"spec.short_side": 256}),
        "steps": (["--steps", "7"], {"inversion.steps": 7}),
        "window": (["--window", "5"], {"inversion.temporal.window": 5}),
        "no_swcfa": (["--no-swcfa"], {"inversion.temporal.swcfa": False}),
        "no_tta": (["--no-tta"], {"inversion.temporal.tta": False}),
        "features": (["--features", "disk"], {"inversion.feature_mode": "disk"}),
        "flow_preset": (["--flow-preset", "fast"], {"inversion.flow_preset": "fast"}),
        "window_frames": (["--window-frames", "30"], {"inversion.window_frames": 30}),
        "cache_dir": (["--cache-dir", str(tmp_path / "c")], {"kwargs.cache_dir": tmp_path / "c"}),
        "force": (["--force"], {"kwargs.force": True}),
        "device": (["--device", "cpu"], {"device": "cpu"}),
        "dtype": (["--dtype", "fp32"], {"dtype": "fp32"}),
        "region": (["--region", "0,0,32,32"], {"region": "0,0,32,32"}),
        "compile_unet": (["--compile"], {"kwargs.compile_unet": True}),
    }


def _output_flags(tmp_path: Path, command: str) -> dict[str, tuple[list[str], dict[str, object]]]:
    out = tmp_path / "result.mp4"
    default_out = tmp_path / f"clip.{'edit' if command == 'edit' else 'reconstruct'}.mp4"
    return {
        "out": (["-o", str(out)], {"kwargs.out": out} if command == "edit" else {"target": out}),
        "overwrite": (["--overwrite"], {"overwrite_checked": True, **({"kwargs.overwrite": True}
                                                                        if command == "edit" else {})}),
        "composite": (["--composite", "replace"], {"kwargs.composite.mode": "replace"}),
        "composite_threshold": (["--composite-threshold", "0.3"], {"kwargs.composite.threshold": 0.3}),
        "lossless": (["--lossless"], {"kwargs.lossless": True} if command == "edit" else {"lossless": True}),
        "html": (["--html"], {"reports": [default_out]}),
    }


def _edit_flags(tmp_path: Path) -> dict[str, tuple[list[str], dict[str, object]]]:
    from diffferv_cli.editing.presets import load_preset

    mine = tmp_path / "presets"
    mine.mkdir(exist_ok=True)
    (mine / "mine.toml").write_text('description = "x"\nedit_prompt = "a photo of a {subject} wearing a hat"\n')
    age = load_preset("age", []).prompts(None)[1]
    return {
        "preset": (["-p", "age"], {"edits.age.prompt_edit": age}),
        "preset_dir": (["--preset-dir", str(mine), "-p", "mine"],
                       {"edits.mine.prompt_edit": "a photo of a person wearing a hat"}),
        "prompt_edit": (["--prompt-edit", "a photo of a young person"],
                        {"edits.edit.prompt_edit": "a photo of a young person"}),
        "subject": (["--subject", "cat"], {}),  # with a preset: below
        "tau_app": (["--tau-app", "0.3"], {"edits.edit.tau_app": 0.3}),
        "tau_motion": (["--tau-motion", "0.4"], {"edits.edit.tau_motion": 0.4}),
        "tau_cross": (["--tau-cross", "0.6"], {"edits.edit.tau_cross": 0.6}),
        "guidance": (["--guidance", "3"], {"edits.edit.guidance": 3.0}),
        "no_inject": (["--no-inject"], {"edits.edit.inject": False}),
        "exact": (["--exact"], {"edits.edit.exact": True}),
        "side_by_side": (["--side-by-side"], {"kwargs.side_by_side": True}),
        **_output_flags(tmp_path, "edit"),
    }


def _reconstruct_flags(tmp_path: Path) -> dict[str, tuple[list[str], dict[str, object]]]:
    return {
        "prompt": (["--prompt", "a photo of a cat"],  # a reconstruction's edit prompt is its source prompt
                   {"inversion.prompt": "a photo of a cat", "path.prompt_edit": "a photo of a cat"}),
        "plain": (["--plain"], {"path.inject": False}),
        "exact": (["--exact"], {"path.exact": True}),
        "compare": (["--compare"], {"kwargs.compare": True}),
        **_output_flags(tmp_path, "reconstruct"),
    }


@pytest.mark.parametrize("command", ["invert", "edit", "reconstruct"])
def test_every_flag_reaches_the_field_it_names_and_no_other(handed_over, tmp_path, monkeypatch, command):
    import typer

    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")  # named only: the loader is a stand-in
    flags = _job_flags(tmp_path)
    flags.update({"edit": _edit_flags, "reconstruct": _reconstruct_flags}.get(command, lambda _: {})(tmp_path))
    params = {param.name for param in typer.main.get_command(app).commands[command].params} - {"clip"}
    assert set(flags) == params, f"options without a wiring check: {sorted(params - set(flags))}"

    base = [command, str(tmp_path / "clip.mp4")] + (["--prompt-edit", "a photo of an old person"]
                                                    if command == "edit" else [])
    baseline = _run_flags(handed_over, base)
    for name, (args, expected) in flags.items():
        if name == "subject":
            continue
        got = _run_flags(handed_over, [*base, *args])
        changed = {key: got.get(key) for key in set(got) | set(baseline) if got.get(key) != baseline.get(key)}
        if name in ("preset", "preset_dir"):  # a new edit: its fields are new keys
            label = expected and next(iter(expected)).split(".")[1]
            changed = {key: value for key, value in changed.items()
                       if not key.startswith(f"edits.{label}.") or key in expected}
        if name == "model":  # the working size is the model's own
            changed = {key: value for key, value in changed.items() if not key.startswith("spec.")}
        assert changed == expected, f"{command} {' '.join(args)}: changed {changed}, expected {expected}"
    if command == "edit":
        preset = [*base[:2], "-p", str(_pirate(tmp_path / "own"))]
        before, after = _run_flags(handed_over, preset), _run_flags(handed_over, [*preset, "--subject", "cat"])
        changed = {key: after[key] for key in after if after[key] != before.get(key)}
        assert changed == {"inversion.prompt": "a photo of a cat",
                           "edits.pirate.prompt_edit": "a photo of a cat as a pirate"}, changed
