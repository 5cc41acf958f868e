"""HTML reports (`eval --html`, `edit --html`, `reconstruct --html`): valid, self-contained pages whose
plots are the JSON metrics, small for long clips, reachable from every command, and shown by a browser."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from media import make_test_clip
from typer.testing import CliRunner

from diffferv_cli.cli import app
from diffferv_cli.config import EvalConfig
from diffferv_cli.evaluation import metrics
from diffferv_cli.evaluation.html import (
    THUMBNAIL_SIDE,
    StripFrames,
    eval_page,
    eval_panels,
    plotted_series,
    strip_positions,
)
from diffferv_cli.evaluation.report import EvalReport
from diffferv_cli.video.metadata import parse_settings_tag, read_settings, settings_tag

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class PageChecker(HTMLParser):
    """Walks a page: every non-void element closed in order, every <img> and its data URI collected,
    every attribute value kept (to look for URLs)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.open: list[str] = []
        self.errors: list[str] = []
        self.images: list[dict] = []
        self.tags: list[str] = []
        self.attributes: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attributes += [value or "" for _, value in attrs]
        if tag == "img":
            self.images.append(dict(attrs))
        if tag not in VOID:
            self.open.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.open.pop()

    def handle_endtag(self, tag):
        if not self.open or self.open[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.open[-1:] or 'nothing'}")
        else:
            self.open.pop()


def check_page(document: str) -> PageChecker:
    """Assert the page is well-formed, self-contained and offline; return what was walked."""
    assert document.startswith("<!DOCTYPE html>")
    checker = PageChecker()
    checker.feed(document)
    checker.close()
    assert not checker.errors, checker.errors[:5]
    assert not checker.open, f"unclosed: {checker.open}"
    assert {"html", "head", "body", "title"} <= set(checker.tags)
    assert checker.images, "no picture on the page"
    for image in checker.images:
        assert re.fullmatch(r"data:image/(png|jpeg);base64,[A-Za-z0-9+/=]+", image.get("src", "")), image.get("src", "")[:60]
    assert not re.search(r"https?://", document, re.IGNORECASE), re.search(r".{30}https?://.{30}", document, re.I)
    assert not re.search(r"\burl\(|@import|<link|<iframe", document, re.IGNORECASE)
    assert all(not value.startswith(("//", "file:", "ftp:")) for value in checker.attributes)
    return checker


def decoded_images(checker: PageChecker) -> list:
    import base64
    import io

    from PIL import Image

    pictures = []
    for image in checker.images:
        picture = Image.open(io.BytesIO(base64.b64decode(image["src"].split(",", 1)[1])))
        picture.load()
        pictures.append(picture)
    return pictures


def _texture(frames: int, height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    import cv2

    noise = np.random.default_rng(seed).standard_normal((height, width + 2 * frames, 3)).astype(np.float32)
    texture = cv2.GaussianBlur(noise, (0, 0), 2.0)
    texture = ((texture - texture.min()) / np.ptp(texture) * 255).astype(np.uint8)
    return np.stack([texture[:, 2 * (frames - i):2 * (frames - i) + width] for i in range(frames)])


def _folder(folder: Path, frames: np.ndarray) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    for index, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{index:03d}.png")
    return folder


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory):
    """`eval --json --html` of a drifting texture against a copy with a flickering, brightened frame 4."""
    root = tmp_path_factory.mktemp("eval")
    clip = _texture(9)
    edited = clip.copy()
    edited[4] = np.clip(edited[4].astype(int) + 60, 0, 255).astype(np.uint8)
    original, changed = _folder(root / "original", clip), _folder(root / "edited", edited)
    result = CliRunner().invoke(app, ["eval", str(original), str(changed), "--json", str(root / "r.json"),
                                      "--html", str(root / "r.html")])
    assert result.exit_code == 0, result.output
    return root / "r.json", root / "r.html"


def test_the_eval_page_is_valid_self_contained_html(eval_run):
    _, page = eval_run
    document = page.read_text(encoding="utf-8")
    checker = check_page(document)
    pictures = decoded_images(checker)
    assert sum(picture.format == "JPEG" for picture in pictures) == 3 * 8  # original | edit | heat, 8 frames
    assert sum(picture.format == "PNG" for picture in pictures) >= 5  # IDP, TL-ID, PSNR, SSIM, warp error
    assert "records no settings" in document  # folders of frames carry no metadata: said, not invented
    assert "no face found in 9 frames" in document


def _at(data: dict, dotted: str):
    for key in dotted.split("."):
        data = data[key]
    return data


def _same(plotted: list, recorded: list) -> None:
    assert len(plotted) == len(recorded)
    for a, b in zip(plotted, recorded, strict=True):
        assert (a is None and b is None) or (a is not None and b is not None and math.isclose(a, b, rel_tol=1e-12)), (a, b)


def test_the_plotted_series_are_the_json_metrics_frame_by_frame(eval_run):
    json_path, page = eval_run
    recorded = json.loads(json_path.read_text())
    plotted = plotted_series(page.read_text(encoding="utf-8"))
    assert {"idp", "tl_id", "psnr", "ssim", "warp_error"} <= set(plotted)
    frames = recorded["original_frames"]
    for panel in plotted.values():
        for series in panel["series"]:
            values = _at(recorded, series["source"]) if series["source"].startswith("reference") \
                else recorded["metrics"][series["source"].split(".")[1]].get("per_frame")
            _same(series["y"], values if values is not None else [None] * len(series["x"]))
            assert series["x"] in (frames, frames[1:])  # frames, or pairs plotted at their second frame
    psnr = plotted["psnr"]["series"][0]["y"]
    assert int(np.argmin(psnr)) == 4  # the changed frame is the dip in the plot
    warp = {series["label"]: series["y"] for series in plotted["warp_error"]["series"]}
    assert set(warp) == {"edit", "original"} and all(v is not None for v in warp["original"])
    assert warp["edit"][3] > 10 * warp["original"][3]  # the flicker into frame 4 is a spike next to the original's


def test_identity_series_give_the_identity_metrics_and_frames_without_a_face_are_marked():
    rng = np.random.default_rng(1)
    source = [rng.normal(size=128) * 0.05 for _ in range(7)]
    edited = [d + rng.normal(size=128) * 0.02 for d in source]
    source[2] = None  # no face in the original's frame 2
    edited[5] = None  # nor in the edit's frame 5
    scores = metrics.identity_metrics(source, edited)
    series = metrics.identity_series(source, edited)
    assert np.isnan(series.idp[[2, 5]]).all() and np.isfinite(np.delete(series.idp, [2, 5])).all()
    assert np.nanmean(series.idp) == pytest.approx(scores.idp, rel=1e-12)
    assert np.nanmean(series.edited_adjacent) / np.nanmean(series.source_adjacent) == pytest.approx(scores.tl_id, rel=1e-12)

    report = EvalReport("a", "b", 7, 8, 8, EvalConfig(), original_frames=tuple(range(10, 17)))
    report.add("identity", "idp", scores.idp, per_frame=series.idp)
    report.add("identity", "tl_id", scores.tl_id, per_frame=series.edited_adjacent)
    report.reference_per_frame["tl_id"] = series.source_adjacent.tolist()
    report.faces = {"original": series.face_source.tolist(), "edited": series.face_edited.tolist()}
    panels = {panel.name: panel for panel in eval_panels(report.to_json())}
    assert panels["idp"].no_face == {"original": [12.0], "edit": [15.0]}  # marked at the original's numbers
    assert panels["idp"].series[0].y[2] is None and panels["idp"].series[0].y[5] is None
    assert len(panels["idp"].series[0].y) == 7  # the frames are there, not dropped


def test_the_page_stays_small_for_a_long_large_clip():
    rng = np.random.default_rng(0)
    count = 3000
    report = EvalReport("long.mp4", "long.edit.mp4", count, 720, 1280, EvalConfig(), original_frames=tuple(range(count)))
    for name in ("mse", "psnr", "ssim"):
        report.add("reconstruction", name, 0.5, per_frame=rng.random(count))
    report.add("temporal", "warp_error", 0.01, per_frame=rng.random(count - 1))
    report.reference_per_frame["warp_error"] = rng.random(count - 1).tolist()
    strip = StripFrames()
    strip.select(count)  # positions only
    worst = rng.integers(0, 256, size=(len(strip.positions), 720, 1280, 3), dtype=np.uint8)  # noise: JPEG's worst case
    strip.original, strip.edited, strip.size = list(worst), list(worst[::-1]), (1280, 720)
    document = eval_page(report, strip, {"region": [100, 50, 400, 300], "source_size": [1280, 720]})
    checker = check_page(document)
    assert len(document.encode()) < 3_000_000, len(document.encode()) / 1e6
    assert strip.positions == strip_positions(count) and strip.positions[0] == 0 and strip.positions[-1] == count - 1
    assert all(max(picture.size) <= THUMBNAIL_SIDE for picture in decoded_images(checker) if picture.format == "JPEG")
    assert len(plotted_series(document)["psnr"]["series"][0]["y"]) == count


def test_eval_html_is_refused_over_an_existing_file_before_any_work(tmp_path):
    original = _folder(tmp_path / "o", _texture(3))
    page = tmp_path / "r.html"
    page.write_text("keep")
    result = CliRunner().invoke(app, ["eval", str(original), str(original), "--html", str(page)])
    assert result.exit_code == 2 and "already exists" in result.output and "--html" in result.output
    assert page.read_text() == "keep"


def test_settings_round_trip_through_the_tag():
    settings = {"prompt_edit": 'a "quoted" <old> person', "tau_app": 0.8, "region": [1, 2, 30, 40]}
    assert parse_settings_tag(settings_tag(settings)) == settings
    assert list(parse_settings_tag(settings_tag(settings))) == list(settings)  # the order shown on the page
    assert parse_settings_tag("made with another tool") is None
    assert parse_settings_tag("diffferv settings: {broken") is None


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    return make_test_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", width=96, height=64, frames=6)


TINY = ["--model", "tiny-random", "--size", "64", "--steps", "2", "--frames", "4", "--flow-preset", "ultrafast",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def edit_run(clip_path, tmp_path_factory):
    """`edit --html` with two presets and a region: a page beside each output."""
    root = tmp_path_factory.mktemp("edit")
    result = CliRunner().invoke(app, ["edit", str(clip_path), "-p", "age", "-p", "smiling", *TINY, "--tau-app", "0.7",
                                      "--region", "16,8,64,48", "--html", "-o", str(root / "out"),
                                      "--cache-dir", str(root / "cache")])
    assert result.exit_code == 0, result.output
    return root / "out", result.output


def test_edit_html_writes_a_page_beside_each_output_with_its_recorded_settings(edit_run, clip_path):
    out, output = edit_run
    for label in ("age", "smiling"):
        video, page = out / f"clip.{label}.mp4", out / f"clip.{label}.report.html"
        assert f"Wrote {page}" in output.replace("\n", "")
        settings = read_settings(video)
        assert settings["label"] == label and settings["tau_app"] == 0.7 and settings["model"] == "tiny-random"
        assert settings["region"] == [16, 8, 64, 48] and settings["frames"] == {
            "start": 0, "stride": 1, "count": 4, "source_count": 6}
        document = page.read_text(encoding="utf-8")
        check_page(document)
        assert "random-weight test model" in document  # a tiny-model page says so
        assert settings["prompt_edit"] in document and "green box is the edited region" in document
        assert len(plotted_series(document)["psnr"]["series"][0]["y"]) == 4


def test_an_existing_report_is_refused_before_any_work(clip_path, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "clip.age.report.html").write_text("keep")
    result = CliRunner().invoke(app, ["edit", str(clip_path), "-p", "age", *TINY, "--html", "-o", str(out),
                                      "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 2 and "already exists" in result.output
    assert not (out / "clip.age.mp4").exists() and not (tmp_path / "cache").exists()


class TableCells(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag == "td":
            self._cell = []

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None


def test_reconstruct_compare_html_shows_every_path_and_its_series_average_to_the_table(clip_path, tmp_path):
    target = tmp_path / "rec.mp4"
    result = CliRunner().invoke(app, ["reconstruct", str(clip_path), *TINY, "--compare", "--html", "-o", str(target),
                                      "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    document = target.with_suffix(".report.html").read_text(encoding="utf-8")
    check_page(document)
    assert read_settings(target)["kind"] == "reconstruct"
    paths = ("injected (paper)", "exact", "plain DDIM")
    for label in paths:
        assert f"{label} (residual)" in document  # the source-resolution strip
    cells = TableCells()
    cells.feed(document)
    printed = {row[0]: float(row[2]) for row in cells.rows if len(row) == 5 and row[0] in (*paths, "vae round trip")
               and row[1] not in ("replace", "residual")}
    plotted = plotted_series(document)
    working = {series["label"]: series["y"] for series in plotted["psnr_working"]["series"]}
    assert set(working) == {*paths, "vae round trip"} and set(printed) == set(working)
    for label, values in working.items():
        assert len(values) == 4
        assert np.mean(values) == pytest.approx(printed[label], abs=0.006)  # the table rounds to 0.01 dB
    source = {series["label"] for series in plotted["psnr_source"]["series"]}
    assert {f"{label}, residual" for label in paths} <= source


CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)),
                None)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--hide-scrollbars"]
DECODE_CHECK = ("<script>window.addEventListener('load',function(){var ok=Array.prototype.every.call(document.images,"
                "function(i){return i.complete&&i.naturalWidth>0});document.body.setAttribute('data-decoded',"
                "ok?'all '+document.images.length:'broken')});</script>")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install -y chromium)")
def test_headless_chromium_renders_the_page_with_every_image_decoded(eval_run, tmp_path):
    from PIL import Image

    _, page = eval_run
    document = page.read_text(encoding="utf-8")
    count = len(check_page(document).images)
    probe = tmp_path / "probe.html"  # the page plus a test-only script that reports decoded images
    probe.write_text(document.replace("</body>", DECODE_CHECK + "</body>"), encoding="utf-8")
    home = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    dom = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120, env=home)
    assert f'data-decoded="all {count}"' in dom.stdout, dom.stderr[-2000:]
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, "--window-size=1200,1600", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120, env=home, cwd=tmp_path)
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    assert pixels.shape[:2] == (1600, 1200)
    assert pixels.std() > 20  # not blank
    colours = len(np.unique(pixels.reshape(-1, 3).astype(np.uint8), axis=0))
    assert colours > 500  # frames and heat maps were drawn, not only text on white
