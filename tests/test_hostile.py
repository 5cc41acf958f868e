"""Hostile input, by category: each ends with one sentence on stderr and exit code 2, writes nothing, and
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
