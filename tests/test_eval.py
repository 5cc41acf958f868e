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
from diffferv_cli.evaluation import metrics
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


# Streaming: both inputs read in step, a chunk at a time, with the values of a whole-clip computation ---------


class _MarkedFaces:
    """A stand-in face analyzer: the whole frame is a "face" unless its top-left 2x2 block is black; the
    descriptor is the frame's grey 16x8 thumbnail (128 numbers), scaled so similarities stay near 1."""

    name = "marked"

    def detect(self, frame: np.ndarray):
        from diffferv_cli.evaluation.faces import Box

        return [] if not frame[:2, :2].any() else [Box(0, 0, frame.shape[1], frame.shape[0])]

    def descriptor(self, frame: np.ndarray, box) -> np.ndarray:
        import cv2

        grey = frame.mean(axis=2).astype(np.float32)
        return cv2.resize(grey, (16, 8), interpolation=cv2.INTER_AREA).reshape(128).astype(np.float64) / 2550


class _BrightnessAttributes:
    """A stand-in image-classification pipeline (multi-label): "Smiling" scores the frame's mean level,
    "Young" the top half's red, both around 0.5 on the test texture, so predictions differ from frame to
    frame and flip where an edit darkens a frame."""

    def __init__(self) -> None:
        from types import SimpleNamespace

        self.model = SimpleNamespace(config=SimpleNamespace(id2label={0: "Smiling", 1: "Young"},
                                                            problem_type="multi_label_classification"))

    def __call__(self, images, top_k: int, function_to_apply: str):
        assert top_k == 2 and function_to_apply == "sigmoid"
        outputs = []
        for image in images:
            pixels = np.asarray(image, dtype=np.float64)
            top_red = pixels[:pixels.shape[0] // 2, :, 0].mean()
            outputs.append([{"label": "Young", "score": (top_red - 135) / 10 + 0.5},
                            {"label": "Smiling", "score": (pixels.mean() - 132) / 10 + 0.5}])
        return outputs


def _squared_error_lpips(a, b):
    """A stand-in LPIPS network: mean squared difference of the two [-1, 1] images."""
    return ((a - b) ** 2).mean()


class _Held:
    """Wraps `report.frames_of`: counts the frames each reader hands out and, through `weakref.finalize`,
    how many of them are still alive, keeping the most at any time."""

    def __init__(self, frames_of) -> None:
        self.frames_of = frames_of
        self.handed: dict[str, int] = {}
        self.alive = 0
        self.most = 0

    def __call__(self, path, spec):
        import weakref

        self.handed[Path(path).name] = 0
        for frame in self.frames_of(path, spec):
            self.handed[Path(path).name] += 1
            self.alive += 1
            self.most = max(self.most, self.alive)
            weakref.finalize(frame, self._gone)
            yield frame

    def _gone(self) -> None:
        self.alive -= 1


def _approx(values):
    return pytest.approx(np.asarray(values, dtype=np.float64), rel=1e-12, abs=1e-15, nan_ok=True)


def test_eval_streams_a_chunk_at_a_time_and_gives_the_whole_clip_values(monkeypatch, tmp_path):
    """45 frames read 8 at a time (a chunk boundary inside every metric's state: the flow's previous frame,
    CLIP-IQA's batches): every value equals the whole-clip computation written out below, and no more than
    a chunk a side (+ the previous frame) of what the readers handed out is alive at any time, where
    reading whole would hold all 90."""
    import itertools

    import diffferv_cli.evaluation.report as report_module
    import diffferv_cli.models.auxiliary as auxiliary
    from diffferv_cli.evaluation.faces import FaceBackend, largest_face_descriptor
    from diffferv_cli.evaluation.html import StripFrames, strip_positions
    from diffferv_cli.temporal.flow import DISFlow, compute_flow

    count, chunk = 45, 8
    source = _texture_clip(frames=count, seed=3)
    edited = _blur(source, 1.0)
    edited[20] = np.clip(edited[20].astype(int) + 40, 0, 255)  # a flicker
    edited[30:36] -= 30  # darker frames across a chunk boundary: both attributes flip there
    source[:, :2, :2], edited[:, :2, :2] = 128, 128
    source[7, :2, :2] = 0  # no face in the original's frame 7, the edit's frames 20 and 21
    edited[20:22, :2, :2] = 0
    original_folder = _write_frames(tmp_path / "original", source)
    edited_folder = _write_frames(tmp_path / "edited", edited)
    analyzer = _MarkedFaces()
    monkeypatch.setattr(auxiliary, "load_face_backend", lambda upsample=0: FaceBackend(analyzer))
    monkeypatch.setattr(auxiliary, "load_lpips", lambda: (_squared_error_lpips, None))
    monkeypatch.setattr(auxiliary, "load_attribute_classifier", lambda model: _BrightnessAttributes())
    held = _Held(report_module.frames_of)
    monkeypatch.setattr(report_module, "frames_of", held)
    monkeypatch.setattr(report_module, "CHUNK", chunk)
    config = EvalConfig(flow_preset="ultrafast", attribute_model=tmp_path / "attributes", target_attribute="Smiling",
                        clip_model=_tiny_clip_model(tmp_path / "clip"))
    strip = StripFrames()
    progress = []
    report = evaluate(original_folder, edited_folder, config, progress=lambda *call: progress.append(call),
                      frames_hook=strip)

    assert held.handed == {"original": count, "edited": count}
    assert held.most <= 2 * chunk + 2, held.most  # whole-clip reading: 2 * 45
    assert progress == [("frames", done, count) for done in (8, 16, 24, 32, 40, 45)]
    assert strip.positions == strip_positions(count)
    for position, kept_source, kept_edited in zip(strip.positions, strip.original, strip.edited, strict=True):
        assert np.array_equal(kept_source, source[position]) and np.array_equal(kept_edited, edited[position])

    # the whole-clip reference: (m, H, W, 3) arrays in memory, each metric over all of them at once
    mse = metrics.mse_per_frame(source, edited)
    descriptors_source = [largest_face_descriptor(analyzer, frame) for frame in source]
    descriptors_edited = [largest_face_descriptor(analyzer, frame) for frame in edited]
    identity = metrics.identity_metrics(descriptors_source, descriptors_edited)
    series = metrics.identity_series(descriptors_source, descriptors_edited)
    kept = [i for i in range(count) if descriptors_source[i] is not None and descriptors_edited[i] is not None]
    pairs = list(itertools.combinations(kept, 2))

    def all_pairs(descriptors):
        return np.mean([1 - np.linalg.norm(descriptors[i] - descriptors[j]) for i, j in pairs])

    flow = compute_flow(source, DISFlow("ultrafast"))
    warp = metrics.flow_warping_error(edited, flow.forward, flow.occlusion)
    own = metrics.flow_warping_error(source, flow.forward, flow.occlusion)
    classifier = auxiliary.load_attribute_classifier(config.attribute_model)
    labels, predicted_source = report_module.classify_attributes(classifier, source)
    _, predicted_edited = report_module.classify_attributes(classifier, edited)
    rates = metrics.attribute_rates(predicted_source, predicted_edited, labels, "Smiling")
    clip_iqa = report_module.clip_iqa(*auxiliary.load_clip(config.clip_model), edited)
    expected = {
        "mse": (mse.mean(), mse),
        "psnr": (metrics.psnr_from_mse(mse).mean(), metrics.psnr_from_mse(mse)),
        "ssim": (metrics.ssim(source, edited), metrics.ssim_per_frame(source, edited)),
        "lpips": (metrics.lpips_per_frame(source, edited).mean(), metrics.lpips_per_frame(source, edited)),
        "idp": (identity.idp, series.idp),
        "tl_id": (identity.tl_id, series.edited_adjacent),
        "tg_id": (all_pairs(descriptors_edited) / all_pairs(descriptors_source), None),
        "warp_error": (warp.mse, warp.per_pair_mse),
        "warp_error_abs": (warp.mae, None),
        "tacr": (rates.tacr, None),
        "napr": (rates.napr, None),
        "clip_iqa": (clip_iqa.mean(), clip_iqa),
    }
    assert [result.name for result in report.results] == list(expected)
    for result in report.results:
        value, per_frame = expected[result.name]
        assert result.value == _approx(value), result.name
        assert (result.per_frame is None) == (per_frame is None), result.name
        if per_frame is not None:
            assert list(result.per_frame) == _approx(per_frame), result.name
    assert identity.frames_without_face_source == 1 and identity.frames_without_face_edited == 2
    assert 0 < rates.tacr < 1 and 0 < rates.napr < 1
    assert report.faces == {"original": series.face_source.tolist(), "edited": series.face_edited.tolist()}
    assert report.reference_per_frame["tl_id"] == _approx(series.source_adjacent)
    assert report.reference_per_frame["warp_error"] == _approx(own.per_pair_mse)
    assert f"original itself {own.mse:.3g}" in next(r.note for r in report.results if r.name == "warp_error")
    assert (report.frames, report.height, report.width) == (count, 48, 64)


def test_a_video_streams_as_read_clip_reads_it(tmp_path):
    """eval decodes a video frame by frame through read_clip's ffmpeg graph: the same pixels, at a reduced
    size with a mirrored pad too (scaling the RGB frames instead moves edge pixels by up to ~200 levels)."""
    from diffferv_cli.config import ClipSpec
    from diffferv_cli.evaluation.report import frames_of
    from diffferv_cli.video.io import read_clip

    clip_path = make_test_clip(tmp_path / "clip.mp4", width=96, height=64, frames=5, fps=8)
    for spec in (ClipSpec(short_side=48, multiple=8), ClipSpec(start=1, stride=2, short_side=64, multiple=8),
                 ClipSpec(short_side=32, multiple=8, frames=2)):
        streamed = np.stack(list(frames_of(clip_path, spec)))
        assert np.array_equal(streamed, np.asarray(read_clip(clip_path, spec).frames)), spec


def _short_reader(monkeypatch, short: str, frames: int):
    """`report.frames_of` with the input named `short` ending after `frames` frames, as a decoder that
    gives fewer frames than its container promised."""
    import itertools

    import diffferv_cli.evaluation.report as report_module

    reader = report_module.frames_of

    def frames_of(path, spec):
        frames_read = reader(path, spec)
        yield from itertools.islice(frames_read, frames) if Path(path).name == short else frames_read
        frames_read.close()

    monkeypatch.setattr(report_module, "frames_of", frames_of)


def test_a_decoder_that_gives_fewer_frames_than_promised_is_a_user_error(texture_folders, monkeypatch, tmp_path):
    original, blurred = texture_folders
    _short_reader(monkeypatch, "blurred", 3)
    _one_sentence_error(*_eval(original, blurred, "--no-temporal"), "Only 3 of the 5 selected frames",
                        "could be decoded")


def test_an_original_that_decodes_short_of_the_edited_frames_is_a_user_error(selection_pair, monkeypatch):
    original, edited, _ = selection_pair
    _short_reader(monkeypatch, "clip.mp4", 2)
    _one_sentence_error(*_eval(original, edited, "--no-temporal"),
                        "Only 2 of the original's frames 3..7 could be decoded, for 3 edited frames")
