"""Source-resolution output end to end: streamed source frames, compositing, writing, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from media import decode_all, make_test_clip, psnr
from typer.testing import CliRunner

from diffferv_cli.cli import app
from diffferv_cli.config import ClipSpec, CompositeConfig, InversionConfig
from diffferv_cli.editing.job import output_frames, write_result
from diffferv_cli.video.io import read_clip
from diffferv_cli.video.probe import probe

TINY = ["--model", "tiny-random", "--size", "64", "--steps", "2", "--flow-preset", "ultrafast", "--device", "cpu"]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return tmp_path_factory.mktemp("composite-media")


@pytest.fixture(scope="module")
def awkward(media):
    """Stored 65x47 (odd, yuv444p) with a 90-degree display matrix: displayed 47x65, portrait. At short
    side 64 that is 64x89, padded to 64x96; with audio."""
    return make_test_clip(media / "awkward.mp4", width=65, height=47, frames=8, rotation=90, audio=True)


@pytest.fixture(scope="module")
def plain(media):
    return make_test_clip(media / "plain.mp4", width=160, height=96, frames=6)


SELECTION = dict(start=1, stride=2, frames=3)
RESIDUAL = CompositeConfig()


def _random_like(frames: np.ndarray, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, frames.shape, dtype=np.uint8)


@pytest.mark.parametrize("region", [None, (5, 9, 30, 40)], ids=["whole-frame", "region"])
def test_no_change_writes_the_source_bit_for_bit(awkward, tmp_path, region):
    """E == R (whatever R is): the frames handed to the encoder are the selected source frames, upright
    and at source size, and a lossless write decodes to exactly them."""
    clip = read_clip(awkward, ClipSpec(short_side=64, multiple=16, region=region, **SELECTION))
    assert (clip.info.width, clip.info.height) == (47, 65)
    if region is None:
        assert clip.geometry.scaled_size == (64, 89) and clip.geometry.working_size == (64, 96)
    source = decode_all(awkward)[list(clip.frame_indices)]
    assert clip.frame_indices == (1, 3, 5)
    reference = _random_like(clip.frames, seed=1)
    handed = list(output_frames(clip, reference.copy(), CompositeConfig(), reference).frames)
    assert np.array_equal(np.stack(handed), source)
    written = write_result(clip, reference.copy(), tmp_path / "out.mp4", reference=reference, composite=RESIDUAL, lossless=True)
    assert np.array_equal(decode_all(written[0]), source)
    assert probe(written[0]).has_audio


def test_no_change_in_the_default_h264_write_is_the_source_through_one_encode(plain, tmp_path):
    clip = read_clip(plain, ClipSpec(short_side=64, multiple=16))
    reference = _random_like(clip.frames, seed=3)
    out = write_result(clip, reference.copy(), tmp_path / "out.mp4", reference=reference, composite=RESIDUAL)[0]
    quality = psnr(decode_all(plain), decode_all(out))
    print(f"unchanged frame through the default write (crf 17, yuv420p): {quality:.1f} dB")
    assert quality > 35  # the source's own pixels, not a 64-pixel render (that would be ~10 dB here)


def test_replace_is_the_working_render_scaled_up(awkward, tmp_path):
    clip = read_clip(awkward, ClipSpec(short_side=64, multiple=16, **SELECTION))
    reference = _random_like(clip.frames, seed=1)
    replace = CompositeConfig(mode="replace")
    handed = np.stack(list(output_frames(clip, reference, replace).frames))
    assert handed.shape == (3, 65, 47, 3)
    from diffferv_cli.video.geometry import to_source_resolution

    assert np.abs(handed.astype(int) - to_source_resolution(reference, clip.geometry)).max() <= 1


def test_changed_patch_keeps_the_source_around_it(media, tmp_path):
    path = make_test_clip(media / "wide.mp4", width=320, height=192, frames=2)
    clip = read_clip(path, ClipSpec(short_side=128, multiple=32))  # 213x128, padded to 224x128
    left_pad = -clip.geometry.crop[0]
    assert left_pad > 0
    reference = _random_like(clip.frames, seed=2)
    edited = reference.copy()
    rows, columns = slice(40, 60), slice(80, 110)  # working pixels
    edited[:, rows, columns] = 255 - edited[:, rows, columns]  # a strong change in one patch
    out = write_result(clip, edited, tmp_path / "out.mp4", reference=reference, composite=RESIDUAL, lossless=True)[0]
    source, written = decode_all(path), decode_all(out)
    scale = 320 / clip.geometry.scaled_size[0]
    reach = 7 * 4 + 4 * 2 + 3  # mask reach and cubic support, working pixels

    def to_source(start, stop, pad=0):  # working pixel range (grown by reach) -> source pixel range
        return max(0, int((start - reach - pad) * scale)), int((stop + reach - pad) * scale) + 1

    keep = np.ones(source.shape[1:3], bool)
    keep[slice(*to_source(rows.start, rows.stop)), slice(*to_source(columns.start, columns.stop, left_pad))] = False
    assert keep.mean() > 0.4
    assert np.array_equal(written[:, keep], source[:, keep])
    inner_rows = slice(int((rows.start + 3) * scale), int((rows.stop - 3) * scale))
    inner_columns = slice(int((columns.start + 3 - left_pad) * scale), int((columns.stop - 3 - left_pad) * scale))
    assert np.abs(written[:, inner_rows, inner_columns].astype(int) - source[:, inner_rows, inner_columns]).mean() > 30


def test_cli_reconstruct_exact_lossless_is_the_source(awkward, tmp_path):
    out = tmp_path / "rec.mp4"
    result = CliRunner().invoke(app, ["reconstruct", str(awkward), *TINY, "--exact", "--lossless", "--start", "1",
                                      "--stride", "2", "--frames", "3", "--cache-dir", str(tmp_path / "cache"),
                                      "-o", str(out)], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "At source resolution (47x65)" in result.output
    rows = [line for line in result.output.splitlines() if "residual" in line]
    assert rows and "100.00" in rows[0]  # exact reconstruction composited: the source itself
    assert np.array_equal(decode_all(out), decode_all(awkward)[[1, 3, 5]])


def test_cli_region_edit_keeps_the_frame_outside_the_box(plain, tmp_path):
    out = tmp_path / "edit.mp4"
    region = (40, 20, 80, 60)
    result = CliRunner().invoke(app, ["edit", str(plain), "--preset", "age", *TINY, "--frames", "3", "--lossless",
                                      "--region", ",".join(map(str, region)), "--cache-dir", str(tmp_path / "cache"),
                                      "-o", str(out)])
    assert result.exit_code == 0, result.output
    source, written = decode_all(plain)[:3], decode_all(out)
    assert written.shape == source.shape
    outside = np.ones(source.shape[1:3], bool)
    outside[20:80, 40:120] = False
    assert np.array_equal(written[:, outside], source[:, outside])
    assert not np.array_equal(written[:, 30:70, 50:110], source[:, 30:70, 50:110])  # the random model's "edit"
    manifests = list((tmp_path / "cache").glob("*/manifest.json"))
    assert [json.loads(path.read_text())["request"]["region"] for path in manifests] == [list(region)]


def test_region_is_part_of_the_cache_key(tiny, plain, tmp_path):
    from diffferv_cli.editing.inversion import invert

    config = InversionConfig(steps=1, flow_preset="ultrafast")
    folders = set()
    for region in (None, (0, 0, 80, 64), (8, 0, 80, 64)):
        clip = read_clip(plain, ClipSpec(short_side=32, multiple=16, frames=2, region=region))
        entry = invert(tiny, clip, config, cache_dir=tmp_path).entry
        assert ("region" in entry.manifest["request"]) == (region is not None)
        folders.add(entry.folder)
    assert len(folders) == 3


@pytest.mark.parametrize("args, message", [
    (["--region", "1,2,3"], "--region must be"),
    (["--region", "100,0,100,50"], "reaches past the 160x96 frame"),
    (["--composite", "blend"], "--composite must be"),
    (["--composite-threshold", "0"], "--composite-threshold"),
])
def test_cli_bad_composite_options_are_one_line_exit_2(plain, tmp_path, args, message):
    result = CliRunner().invoke(app, ["edit", str(plain), "--preset", "age", *TINY, *args, "--cache-dir",
                                      str(tmp_path / "c"), "-o", str(tmp_path / "o.mp4")])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o.mp4").exists()
