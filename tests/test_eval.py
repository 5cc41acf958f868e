"""`diffferv eval`: perfect scores against itself, worse against a distortion, one-sentence errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from media import make_test_clip
from typer.testing import CliRunner

from diffferv_cli.cli import app
from diffferv_cli.config import EvalConfig
from diffferv_cli.evaluation.report import evaluate


def _texture_clip(frames: int = 5, height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth random texture drifting right by 2 px per frame: (m, H, W, 3) uint8, no face."""
    import cv2

    noise = np.random.default_rng(seed).standard_normal((height, width + 2 * frames, 3)).astype(np.float32)
    texture = cv2.GaussianBlur(noise, (0, 0), 2.0)
    texture = ((texture - texture.min()) / np.ptp(texture) * 255).astype(np.uint8)
    return np.stack([texture[:, 2 * (frames - i):2 * (frames - i) + width] for i in range(frames)])


def _write_frames(folder: Path, frames: np.ndarray) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for index, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"frame_{index}.png")  # natural order: frame_2 < frame_10
    return folder


def _blur(frames: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    import cv2

    return np.stack([cv2.GaussianBlur(frame, (0, 0), sigma) for frame in frames])


def _eval(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["eval", *map(str, args)])
    return result.exit_code, result.output


def _metrics(path: Path) -> dict:
    return json.loads(path.read_text())["metrics"]


@pytest.fixture(scope="module")
def texture_folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("clips")
    clip = _texture_clip()
    return _write_frames(root / "original", clip), _write_frames(root / "blurred", _blur(clip))


def test_eval_against_itself_is_perfect_and_says_no_face(texture_folders, tmp_path):
    original, _ = texture_folders
    out = tmp_path / "self.json"
    code, output = _eval(original, original, "--json", out)
    assert code == 0, output
    values = _metrics(out)
    assert values["mse"]["value"] == 0.0
    assert values["psnr"]["value"] == 100.0  # capped (documented in metrics.py)
    assert values["ssim"]["value"] == pytest.approx(1.0)
    for name in ("idp", "tl_id", "tg_id"):  # synthetic texture: no face, reported, not an error
        assert values[name]["value"] is None
        assert "no face found in 5 frames" in values[name]["note"]
    for name in ("tacr", "napr", "clip_iqa"):
        assert values[name]["value"] is None and values[name]["note"].startswith("unavailable: pass --")
    assert values["warp_error"]["value"] >= 0.0
    assert len(values["psnr"]["per_frame"]) == 5
    assert "mse" in output and "unavailable" in output


def test_eval_against_a_blurred_copy_is_worse(texture_folders, tmp_path):
    original, blurred = texture_folders
    out = tmp_path / "blur.json"
    code, output = _eval(original, blurred, "--json", out, "--no-temporal")
    assert code == 0, output
    values = _metrics(out)
    assert values["mse"]["value"] > 1e-4
    assert 10.0 < values["psnr"]["value"] < 100.0
    assert values["ssim"]["value"] < 0.99
    assert "warp_error" not in values


def test_frame_selection_applies_to_both_sides(texture_folders, tmp_path):
    original, blurred = texture_folders
    out = tmp_path / "sel.json"
    code, output = _eval(original, blurred, "--start", "1", "--stride", "2", "--frames", "2", "--size", "32",
                         "--json", out, "--no-temporal")
    assert code == 0, output
    report = json.loads(out.read_text())
    # 64x48 -> short side 32: 43x32, padded to a multiple of 8 like video.read_clip does
    assert report["frames"] == 2 and report["size"] == {"height": 32, "width": 48}


def _one_sentence_error(code: int, output: str, *fragments: str) -> None:
    assert code == 2, output
    assert "Traceback" not in output
    message = " ".join(output.split())  # the terminal may wrap the sentence
    for fragment in fragments:
        assert fragment in message, output


def test_different_frame_counts_are_a_user_error(texture_folders, tmp_path):
    original, _ = texture_folders
    shorter = _write_frames(tmp_path / "short", _texture_clip()[:3])
    _one_sentence_error(*_eval(original, shorter), "5 selected frames", "has 3")


def test_different_sizes_are_a_user_error(texture_folders, tmp_path):
    original, _ = texture_folders
    other = _write_frames(tmp_path / "other", _texture_clip(height=40, width=64))
    _one_sentence_error(*_eval(original, other), "64x48", "64x40", "same size")


def test_unreadable_inputs_are_user_errors(texture_folders, tmp_path):
    original, _ = texture_folders
    _one_sentence_error(*_eval(original, tmp_path / "missing"), "does not exist")
    broken = _write_frames(tmp_path / "broken", _texture_clip())
    (broken / "frame_3.png").write_bytes(b"not a png")
    _one_sentence_error(*_eval(original, broken), "frame_3.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_sentence_error(*_eval(original, empty), "holds no frames")


def test_unreadable_video_is_a_user_error(texture_folders, tmp_path):
    bogus = tmp_path / "bogus.mp4"
    bogus.write_bytes(b"\x00" * 1000)
    code, output = _eval(bogus, bogus)
    assert code == 2 and "Traceback" not in output, output


def test_video_against_itself(tmp_path):
    clip = make_test_clip(tmp_path / "clip.mp4", width=64, height=48, frames=4, fps=8)
    out = tmp_path / "video.json"
    code, output = _eval(clip, clip, "--json", out, "--no-temporal")
    assert code == 0, output
    values = _metrics(out)
    assert values["mse"]["value"] == 0.0 and values["ssim"]["value"] == pytest.approx(1.0)
    assert json.loads(out.read_text())["frames"] == 4


def test_a_video_and_its_frames_compare_equal(tmp_path):
    """Folders of frames go through read_clip's geometry: an odd long side is padded the same way."""
    from diffferv_cli.config import ClipSpec
    from diffferv_cli.video.io import read_clip

    clip_path = make_test_clip(tmp_path / "clip.mp4", width=70, height=48, frames=3, fps=8)
    clip = read_clip(clip_path, ClipSpec(short_side=48, multiple=8))
    left, top, right, bottom = clip.geometry.crop  # negative: padding added on that side
    assert clip.frames.shape[1:3] == (48, 72) and (left, right) == (-1, -1)
    folder = _write_frames(tmp_path / "frames", clip.frames[:, :, -left:clip.frames.shape[2] + right])
    out = tmp_path / "mixed.json"
    code, output = _eval(clip_path, folder, "--json", out, "--no-temporal")
    assert code == 0, output
    assert _metrics(out)["mse"]["value"] == 0.0


# Real faces -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def face_folders(fixtures_dir, tmp_path_factory) -> tuple[Path, Path]:
    import cv2

    capture = cv2.VideoCapture(str(fixtures_dir / "single_face.mp4"))
    frames = []
    while len(frames) < 4:
        ok, frame = capture.read()
        assert ok, "could not read single_face.mp4"
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    capture.release()
    clip = np.stack(frames)
    root = tmp_path_factory.mktemp("faces")
    return _write_frames(root / "original", clip), _write_frames(root / "blurred", _blur(clip, 2.5))


@pytest.mark.fixtures
def test_identity_on_a_real_face(face_folders):
    original, blurred = face_folders
    same = evaluate(original, original, EvalConfig(temporal=False))
    assert same.value("idp") == pytest.approx(1.0)
    assert same.value("tl_id") == pytest.approx(1.0) and same.value("tg_id") == pytest.approx(1.0)
    worse = evaluate(original, blurred, EvalConfig(temporal=False))
    assert 0.4 < worse.value("idp") < 1.0  # still the same person, no longer the same descriptor
    assert worse.value("ssim") < same.value("ssim")


# User-supplied models (tiny random ones here, to exercise the code path offline) -------------------------


def _tiny_attribute_model(folder: Path) -> Path:
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    labels = ["Smiling", "Eyeglasses", "Young"]
    config = ViTConfig(image_size=32, patch_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, id2label=dict(enumerate(labels)),
                       label2id={label: i for i, label in enumerate(labels)},
                       problem_type="multi_label_classification")
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _tiny_clip_model(folder: Path) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from diffferv_cli.models.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    vocab = tokenizer.get_vocab()
    text = dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    vision = dict(image_size=32, patch_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(folder)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_user_supplied_attribute_and_clip_models(texture_folders, tmp_path):
    original, blurred = texture_folders
    attributes = _tiny_attribute_model(tmp_path / "attributes")
    clip = _tiny_clip_model(tmp_path / "clip")
    out = tmp_path / "models.json"
    code, output = _eval(original, original, "--no-temporal", "--attribute-model", attributes,
                         "--target-attribute", "Smiling", "--clip-model", clip, "--json", out)
    assert code == 0, output
    values = _metrics(out)
    assert values["tacr"]["value"] == 0.0 and values["napr"]["value"] == 1.0  # nothing changed
    assert 0.0 <= values["clip_iqa"]["value"] <= 1.0
    assert len(values["clip_iqa"]["per_frame"]) == 5

    _one_sentence_error(*_eval(original, blurred, "--no-temporal", "--attribute-model", attributes),
                        "--target-attribute", "Smiling, Eyeglasses, Young")
    _one_sentence_error(*_eval(original, blurred, "--no-temporal", "--clip-model", tmp_path / "nowhere"),
                        "does not exist")


# Edits of a frame selection ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def selection_pair(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A 12-frame clip, an "edit" of its frames 3, 5, 7 (the frames themselves, written by write_video
    with the selection in the metadata), and the same video with its metadata stripped."""
    from diffferv_cli.config import ClipSpec
    from diffferv_cli.video.geometry import SourceFrames
    from diffferv_cli.video.io import ffmpeg_exe, read_clip, write_video
    from diffferv_cli.video.probe import file_url

    root = tmp_path_factory.mktemp("selection")
    original = make_test_clip(root / "clip.mp4", width=64, height=48, frames=12, fps=24,
                              pattern="life=ratio=0.5:mold=10:seed=7")  # every frame differs a lot from the next
    clip = read_clip(original, ClipSpec(start=3, stride=2, frames=3, short_side=48, multiple=16))
    edited = write_video(clip.frames, root / "clip.edit.mp4", clip.fps, geometry=clip.geometry,
                         source_frames=SourceFrames.of(clip.frame_indices, 12))
    stripped = root / "clip.stripped.mp4"
    import subprocess

    subprocess.run([ffmpeg_exe(), "-v", "error", "-nostdin", "-i", file_url(edited), "-map_metadata", "-1",
                    "-c", "copy", file_url(stripped)], check=True)
    return original, edited, stripped


def _report(*args) -> dict:
    code, output = _eval(*args)
    assert code == 0, output
    return json.loads(Path(args[args.index("--json") + 1]).read_text())


def test_an_edit_of_a_selection_is_compared_with_the_frames_it_came_from(selection_pair, tmp_path):
    original, edited, stripped = selection_pair
    report = _report(original, edited, "--no-temporal", "--json", tmp_path / "tag.json")
    assert report["frames"] == 3 and report["original_frames"] == [3, 5, 7]
    assert "metadata" in report["alignment"]
    assert report["metrics"]["psnr"]["value"] > 30  # the same pictures, re-encoded once (measured 35 dB)
    # --start/--stride/--frames pick frames of the edited video: its frame 2 is the original's frame 7
    late = _report(original, edited, "--no-temporal", "--start", "2", "--json", tmp_path / "late.json")
    assert late["original_frames"] == [7] and late["metrics"]["psnr"]["value"] > 30


def test_without_metadata_the_original_takes_its_own_selection(selection_pair, tmp_path):
    original, edited, stripped = selection_pair
    _one_sentence_error(*_eval(original, stripped, "--no-temporal"), "12 selected frames", "has 3",
                        "--original-start")
    given = _report(original, stripped, "--no-temporal", "--original-start", "3", "--original-stride", "2",
                    "--json", tmp_path / "given.json")
    tagged = _report(original, edited, "--no-temporal", "--json", tmp_path / "tagged.json")
    assert given["original_frames"] == [3, 5, 7] and "--original-start" in given["alignment"]
    assert given["metrics"]["psnr"]["value"] == tagged["metrics"]["psnr"]["value"]
    shifted = _report(original, stripped, "--no-temporal", "--original-start", "4", "--original-stride", "2",
                      "--json", tmp_path / "shifted.json")
    assert shifted["original_frames"] == [4, 6, 8]
    assert shifted["metrics"]["psnr"]["value"] < tagged["metrics"]["psnr"]["value"] - 10  # measured 8 vs 35 dB
    _one_sentence_error(*_eval(original, stripped, "--original-start", "9", "--original-stride", "2"),
                        "frames 9..13 of the original", "has 12 frames")


def test_eval_reads_the_selection_of_a_real_edit(tmp_path):
    """End to end: `edit --start --stride --frames` with the tiny model, then `eval ORIGINAL EDITED`."""
    original = make_test_clip(tmp_path / "clip.mp4", width=96, height=64, frames=10, fps=24)
    out = tmp_path / "clip.age.mp4"
    result = CliRunner().invoke(app, ["edit", str(original), "--preset", "age", "--model", "tiny-random", "--size",
                                      "64", "--steps", "2", "--start", "2", "--stride", "3", "--frames", "3",
                                      "--flow-preset", "ultrafast", "--cache-dir", str(tmp_path / "cache"),
                                      "--device", "cpu", "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = _report(original, out, "--no-temporal", "--json", tmp_path / "edit.json")
    assert report["frames"] == 3 and report["original_frames"] == [2, 5, 8]
