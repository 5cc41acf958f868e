"""One self-contained HTML page per edit: what made it, how it scores, what it looks like, frame by frame.

`eval --html`, `edit --html` and `reconstruct --html` write it. The page opens offline in any browser:
every picture is a `data:` URI inside it (frames as JPEG thumbnails, plots as PNG from matplotlib's Agg
backend), there is no script, no stylesheet, font or URL to fetch. Its size does not grow with the
clip's resolution or much with its length: at most `STRIP_FRAMES` frames, each at most
`THUMBNAIL_SIDE` pixels on its long side, and plots of a fixed size (a 2,000-frame 720p clip gives a
page of well under 2 MB).

What the page holds:

* the settings that made the output, as recorded in its metadata (`video/metadata.py`), with a warning
  banner when the model had random weights (`--model tiny-random`: a test model, its pictures are noise);
* the summary metrics (`report.EvalReport`) or, for a reconstruction, the table `reconstruct` prints;
* a strip of evenly spaced frames (first and last included): original | edit | heat map of
  |edit - original| (mean over channels, `HEAT_FULL_SCALE` of the range is full colour), with the edited
  region's box drawn when the output was made with `--region`;
* per-frame plots: identity to the original (IDP) and between neighbours (TL-ID, the edit's next to the
  original's own), PSNR, SSIM, LPIPS when computed, the flow-warping error of the edit next to the
  original's own (flicker shows as spikes). Frames without a face are marked on the identity plots
  (crosses along the bottom), never silently dropped.

Exactly the series that are plotted are also written into the page as JSON (`<script type=
"application/json" id="plotted-series">`, data, not code), so a reader (or a test) can check them
against `eval --json`.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

STRIP_FRAMES = 8
THUMBNAIL_SIDE = 240  # pixels, long side of each frame in the strip
MIN_SHOWN_SIDE = 160  # smaller frames are shown (not stored) at this long side
HEAT_FULL_SCALE = 0.25  # |edit - original| (0..1) shown at full colour
JPEG_QUALITY = 85
RANDOM_MODEL_WARNING = ("Made with a random-weight test model (--model tiny-random): its pictures are noise, "
                        "not a meaningful edit. This page only shows what a report looks like.")


# Series and panels ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Series:
    """One plotted line: `y[k]` at `x[k]`; None where the value does not exist (no face, nothing to warp).
    `source` says where the values come from (a key of `eval --json`, e.g. "metrics.psnr.per_frame")."""

    label: str
    x: list[float]
    y: list[float | None]
    source: str

    def to_json(self) -> dict:
        return {"label": self.label, "x": self.x, "y": self.y, "source": self.source}


@dataclass(frozen=True)
class Panel:
    """One plot: a title, a y-axis, its lines, and the frames (x) marked as having no face."""

    name: str
    title: str
    ylabel: str
    series: list[Series]
    note: str = ""  # shown under the plot (e.g. why a metric is unavailable)
    no_face: dict[str, list[float]] = field(default_factory=dict)  # "original"/"edit" -> x of frames without one

    def to_json(self) -> dict:
        return {"title": self.title, "ylabel": self.ylabel, "note": self.note, "no_face": self.no_face,
                "series": [series.to_json() for series in self.series]}


def _values(values: Sequence | None, count: int) -> list[float | None]:
    if values is None:
        return [None] * count
    return [None if value is None or not math.isfinite(value) else float(value) for value in values]


def eval_panels(report: dict) -> list[Panel]:
    """The plots of an eval report, from its JSON form (`EvalReport.to_json()`, what `eval --json` writes):
    frames on x as the ORIGINAL's frame numbers; a pair (i, i+1) is plotted at frame i+1."""
    numbers = [float(number) for number in report["original_frames"]]
    pairs = numbers[1:]
    found = report["metrics"]
    reference = report.get("reference_per_frame") or {}

    def per_frame(name: str) -> list[float | None]:
        entry = found.get(name) or {}
        return _values(entry.get("per_frame"), len(numbers) if name not in ("tl_id", "warp_error") else len(pairs))

    def note(*names: str) -> str:
        return "; ".join(f"{name}: {found[name]['note']}" for name in names
                         if name in found and found[name]["value"] is None and found[name]["note"])

    faces = report.get("faces")
    no_face: dict[str, list[float]] = {}
    if faces:
        for side, key in (("original", "original"), ("edit", "edited")):
            no_face[side] = [number for number, has in zip(numbers, faces[key], strict=True) if not has]
    panels = [
        Panel("idp", "Identity to the original (IDP)", "similarity", [
            Series("edit vs original", numbers, per_frame("idp"), "metrics.idp.per_frame")],
            note("idp"), no_face),
        Panel("tl_id", "Identity between neighbours (TL-ID: frame i vs i+1)", "similarity", [
            Series("edit", pairs, per_frame("tl_id"), "metrics.tl_id.per_frame"),
            Series("original", pairs, _values(reference.get("tl_id"), len(pairs)), "reference_per_frame.tl_id")],
            note("tl_id"), no_face),
        Panel("psnr", "PSNR (edit vs original)", "dB", [
            Series("edit", numbers, per_frame("psnr"), "metrics.psnr.per_frame")], note("psnr")),
        Panel("ssim", "SSIM (edit vs original)", "SSIM", [
            Series("edit", numbers, per_frame("ssim"), "metrics.ssim.per_frame")], note("ssim")),
    ]
    if found.get("lpips", {}).get("per_frame") is not None:
        panels.append(Panel("lpips", "LPIPS (edit vs original)", "LPIPS", [
            Series("edit", numbers, per_frame("lpips"), "metrics.lpips.per_frame")]))
    if "warp_error" in found:
        panels.append(Panel("warp_error", "Flow-warping error (frame i+1 warped onto i, the original's flow)",
                            "MSE", [
                                Series("edit", pairs, per_frame("warp_error"), "metrics.warp_error.per_frame"),
                                Series("original", pairs, _values(reference.get("warp_error"), len(pairs)),
                                       "reference_per_frame.warp_error")],
                            note("warp_error")))
    return panels


# Pictures ---------------------------------------------------------------------------------------------


def data_uri(image: np.ndarray, kind: str = "jpeg") -> str:
    """An RGB uint8 picture as a `data:` URI (JPEG for frames, PNG where every pixel counts)."""
    from PIL import Image

    buffer = io.BytesIO()
    picture = Image.fromarray(np.ascontiguousarray(image))
    if kind == "jpeg":
        picture.save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    else:
        picture.save(buffer, format="PNG", optimize=True)
    return f"data:image/{kind};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def thumbnail_scale(width: int, height: int, side: int = THUMBNAIL_SIDE) -> float:
    return min(1.0, side / max(width, height))


def thumbnail(frame: np.ndarray, side: int = THUMBNAIL_SIDE) -> np.ndarray:
    """`frame` shrunk (never enlarged) so its long side is at most `side`."""
    import cv2

    height, width = frame.shape[:2]
    scale = thumbnail_scale(width, height, side)
    if scale >= 1.0:
        return np.ascontiguousarray(frame)
    size = (max(round(width * scale), 1), max(round(height * scale), 1))
    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA)


def heat_map(original: np.ndarray, edited: np.ndarray) -> np.ndarray:
    """|edited - original|, mean over channels, as an RGB picture (matplotlib's "inferno": black is no
    change, pale yellow `HEAT_FULL_SCALE` of the range or more)."""
    from matplotlib import colormaps

    change = np.abs(original.astype(np.float32) - edited.astype(np.float32)).mean(axis=-1) / 255.0  # (H, W)
    colours = colormaps["inferno"](np.clip(change / HEAT_FULL_SCALE, 0.0, 1.0))  # (H, W, 4) in [0, 1]
    return (colours[..., :3] * 255).round().astype(np.uint8)


def draw_box(image: np.ndarray, box: Sequence[float] | None) -> np.ndarray:
    """`image` with the rectangle (x, y, width, height), in its own pixels, outlined; a copy."""
    if box is None:
        return image
    import cv2

    x, y, width, height = (round(value) for value in box)
    marked = np.ascontiguousarray(image).copy()
    thickness = max(1, round(max(image.shape[:2]) / 160))
    cv2.rectangle(marked, (x, y), (x + width - 1, y + height - 1), (0, 255, 80), thickness)
    return marked


def strip_positions(count: int, wanted: int = STRIP_FRAMES) -> list[int]:
    """`wanted` evenly spaced positions in a clip of `count` frames, first and last included."""
    if count <= 0:
        return []
    wanted = min(wanted, count)
    return sorted({round(index * (count - 1) / max(wanted - 1, 1)) for index in range(wanted)})


@dataclass
class StripFrames:
    """The few frames the strip shows, kept as a clip's frames go by: a `report.FramesHook`
    (`report.evaluate(frames_hook=...)` asks for `select(count)` up front, then hands over those frames)."""

    wanted: int = STRIP_FRAMES
    positions: list[int] = field(default_factory=list)
    original: list[np.ndarray] = field(default_factory=list)
    edited: list[np.ndarray] = field(default_factory=list)
    size: tuple[int, int] = (0, 0)  # (width, height) of the compared frames

    def select(self, count: int) -> list[int]:
        """The strip's positions in a clip of `count` compared frames (what is kept so far is dropped)."""
        self.positions = strip_positions(count, self.wanted)
        self.original, self.edited = [], []
        return self.positions

    def keep(self, position: int, original: np.ndarray, edited: np.ndarray) -> None:
        """Copies of frame `position` (H, W, 3) of both sides; positions come in increasing order."""
        waiting = self.positions[len(self.original):len(self.original) + 1]
        if waiting != [position]:
            raise ValueError(f"frame {position} handed to the strip, which waits for {waiting or 'nothing'}")
        self.original.append(original.copy())
        self.edited.append(edited.copy())
        self.size = (original.shape[1], original.shape[0])


@dataclass(frozen=True)
class Column:
    """One column of a strip: a heading and the frame of each row (full size; thumbnailed on output)."""

    heading: str
    frames: list[np.ndarray]
    box: Sequence[float] | None = None  # region, in the frames' pixels


def _strip_table(captions: list[str], columns: list[Column]) -> str:
    head = "".join(f"<th>{html.escape(column.heading)}</th>" for column in columns)
    rows = []
    for row, caption in enumerate(captions):
        cells = []
        for column in columns:
            frame = column.frames[row]
            scale = thumbnail_scale(frame.shape[1], frame.shape[0])
            small = thumbnail(frame)
            box = None if column.box is None else [value * scale for value in column.box]
            shown = max(1.0, MIN_SHOWN_SIDE / max(small.shape[:2]))  # tiny frames shown larger, not stored larger
            cells.append(f'<td><img src="{data_uri(draw_box(small, box))}" width="{round(small.shape[1] * shown)}" '
                         f'height="{round(small.shape[0] * shown)}" alt="{html.escape(column.heading)}, {html.escape(caption)}"></td>')
        rows.append(f"<tr><th class=\"frame\">{html.escape(caption)}</th>{''.join(cells)}</tr>")
    return f"<table class=\"strip\"><tr><th></th>{head}</tr>{''.join(rows)}</table>"


# Plots ------------------------------------------------------------------------------------------------


def plot_png(panel: Panel) -> bytes:
    """The panel as a PNG (matplotlib, Agg backend: no display, no font or file fetched)."""
    from matplotlib.figure import Figure
    from matplotlib.transforms import blended_transform_factory

    figure = Figure(figsize=(7.2, 2.4), dpi=100)
    axes = figure.add_subplot()
    drawn = False
    for series in panel.series:
        y = np.array([np.nan if value is None else value for value in series.y], dtype=np.float64)
        if series.x and np.isfinite(y).any():
            marker = "o" if len(series.x) <= 60 else None
            axes.plot(series.x, y, label=series.label, linewidth=1.2, marker=marker, markersize=3)
            drawn = True
    edge = blended_transform_factory(axes.transData, axes.transAxes)  # x in frames, y in the axes' height
    for (side, frames), (colour, height) in zip(panel.no_face.items(), (("tab:red", 0.04), ("tab:purple", 0.11)),
                                                 strict=False):
        if frames:
            axes.plot(frames, [height] * len(frames), linestyle="none", marker="x", color=colour, markersize=4,
                      transform=edge, label=f"no face: {side}")
            drawn = True
    every_x = [value for series in panel.series for value in series.x]
    if every_x:
        axes.set_xlim(min(every_x) - 0.5, max(every_x) + 0.5)
    if not drawn:
        axes.text(0.5, 0.5, "no values" + (f": {panel.note}" if panel.note else ""), ha="center", va="center",
                  transform=axes.transAxes, wrap=True, fontsize=8)
    axes.set_title(panel.title, fontsize=9)
    axes.set_xlabel("frame of the original", fontsize=8)
    axes.set_ylabel(panel.ylabel, fontsize=8)
    axes.tick_params(labelsize=7)
    axes.grid(alpha=0.3)
    if drawn:
        axes.legend(fontsize=7, loc="best")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _plots(panels: list[Panel]) -> str:
    parts = []
    for panel in panels:
        uri = "data:image/png;base64," + base64.b64encode(plot_png(panel)).decode("ascii")
        note = f"<p class=\"note\">{html.escape(panel.note)}</p>" if panel.note else ""
        parts.append(f"<figure><img src=\"{uri}\" alt=\"{html.escape(panel.title)}\">{note}</figure>")
    return f"<div class=\"plots\">{''.join(parts)}</div>"


# The page ---------------------------------------------------------------------------------------------

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em auto;max-width:1400px;padding:0 1em;
color:#222;background:#fff}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ddd;padding:.25em .5em;text-align:left;
vertical-align:top}
table.strip td,table.strip th{border:none;padding:2px}table.strip img{display:block}
th.frame{font-weight:normal;font-size:.85em;white-space:nowrap}
.banner{background:#fff3b0;border:2px solid #d9a400;padding:.6em 1em;font-weight:bold}
.note{color:#555;font-size:.85em;margin:.2em 0 1em}figure{margin:0 0 .8em}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(640px,1fr));gap:.5em}.plots img{max-width:100%}
table.strip img{image-rendering:auto}
code{background:#f4f4f4;padding:0 .2em}
"""


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _format(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def settings_section(settings: dict | None, where: str) -> str:
    if not settings:
        return (f"<h2>Settings</h2><p>{html.escape(where)} records no settings (not written by diffferv, or "
                "written before diffferv recorded them).</p>")
    return "<h2>Settings</h2>" + _table(("setting", "value"), [(key, _format(value)) for key, value in settings.items()])


def page(title: str, body: str, series: dict, random_model: bool = False) -> str:
    """The whole document: `body` (trusted markup built here) and the plotted `series` as JSON data."""
    banner = f"<p class=\"banner\">{html.escape(RANDOM_MODEL_WARNING)}</p>" if random_model else ""
    data = json.dumps(series, allow_nan=False).replace("<", "\\u003c")  # never ends the script element
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>{banner}{body}"
            f"<script type=\"application/json\" id=\"plotted-series\">{data}</script></body></html>\n")


def plotted_series(document: str) -> dict:
    """The series a page plots (the JSON `page` embeds), read back from the page's text."""
    start_tag = '<script type="application/json" id="plotted-series">'
    start = document.index(start_tag) + len(start_tag)
    return json.loads(document[start:document.index("</script>", start)])


# eval -------------------------------------------------------------------------------------------------


def _region_in(settings: dict | None, size: tuple[int, int]) -> list[float] | None:
    """The recorded region (source pixels) in the pixels of frames of `size` (width, height)."""
    if not settings or not settings.get("region") or not settings.get("source_size"):
        return None
    x, y, width, height = settings["region"]
    scale_x, scale_y = size[0] / settings["source_size"][0], size[1] / settings["source_size"][1]
    return [x * scale_x, y * scale_y, width * scale_x, height * scale_y]


def eval_page(report, strip: StripFrames, settings: dict | None, title: str | None = None) -> str:
    """The page of an `EvalReport` with the strip frames kept while it was computed."""
    data = report.to_json()
    panels = eval_panels(data)
    rows = [(result.name + {"lower": " ↓", "higher": " ↑"}.get(result.better, ""), _format(result.value),
             result.note) for result in report.results]
    numbers = data["original_frames"]
    summary = (f"<p>Original <code>{html.escape(report.original)}</code>, edited "
               f"<code>{html.escape(report.edited)}</code>: {report.frames} frames compared at "
               f"{report.width}x{report.height} ({html.escape(report.alignment)}).</p>")
    box = _region_in(settings, strip.size)
    captions = [f"frame {numbers[position]}" for position in strip.positions]
    heat = [heat_map(a, b) for a, b in zip(strip.original, strip.edited, strict=True)]
    strip_html = _strip_table(captions, [Column("original", strip.original, box), Column("edit", strip.edited, box),
                                         Column("|edit − original|", heat, box)])
    faces = data.get("faces")
    face_line = ""
    if faces:
        missing = {side: [n for n, has in zip(numbers, faces[key], strict=True) if not has]
                   for side, key in (("original", "original"), ("edit", "edited"))}
        face_line = ("<p class=\"note\">Frames without a face: " + "; ".join(
            f"{side} {len(frames)}" + (f" ({_list(frames)})" if frames else "") for side, frames in missing.items())
            + " (crosses on the identity plots).</p>")
    body = (summary + settings_section(settings, f"The edited file {report.edited}")
            + "<h2>Metrics</h2>" + _table(("metric", "value", "note"), rows)
            + f"<h2>Frames</h2><p class=\"note\">{len(strip.positions)} evenly spaced frames; the heat map is "
            f"|edit − original| averaged over channels, full colour at {HEAT_FULL_SCALE:.0%} of the range"
            + ("; the green box is the edited region" if box else "") + ".</p>" + strip_html
            + "<h2>Per frame</h2>" + face_line + _plots(panels))
    series = {panel.name: panel.to_json() for panel in panels}
    random_model = bool(settings and settings.get("model_random"))
    return page(title or f"diffferv report: {Path(report.edited).name}", body, series, random_model)


def _list(numbers: Sequence[int], shown: int = 12) -> str:
    text = ", ".join(str(number) for number in numbers[:shown])
    return text + (f", ... ({len(numbers) - shown} more)" if len(numbers) > shown else "")


def write_eval_report(original: Path, edited: Path, config, html_path: Path,
                      progress: Callable[[str, int, int], None] | None = None, title: str | None = None):
    """Evaluate `edited` against `original` (`report.evaluate`) and write the page to `html_path`
    (atomically); returns the `EvalReport`."""
    from diffferv_cli.evaluation.report import evaluate
    from diffferv_cli.video.metadata import read_settings

    strip = StripFrames()
    report = evaluate(original, edited, config, progress=progress, frames_hook=strip)
    write_page(html_path, eval_page(report, strip, read_settings(edited), title))
    return report


def write_page(path: Path, document: str) -> None:
    from diffferv_cli.errors import UserError
    from diffferv_cli.files import atomic_write_text

    try:
        atomic_write_text(path, document)
    except OSError as err:
        raise UserError(f"Cannot write {path} ({err.strerror}).") from None


# reconstruct ------------------------------------------------------------------------------------------


def reconstruction_panels(clip_frames: np.ndarray, reconstruction, numbers: Sequence[int]) -> list[Panel]:
    """PSNR and SSIM per frame of every path (and the VAE round trip) at working size, and of every
    output at source resolution (`Reconstruction.source_series`)."""
    from diffferv_cli.evaluation import metrics

    x = [float(number) for number in numbers]
    if reconstruction.working_series:  # computed in the reconstruction's own pass over the frames
        working = {label: (values["psnr"], values["ssim"]) for label, values in reconstruction.working_series.items()}
    else:
        candidates = {"vae round trip": reconstruction.reference, **reconstruction.paths}
        working = {label: (metrics.psnr_per_frame(clip_frames, np.asarray(frames)),
                           metrics.ssim_per_frame(clip_frames, np.asarray(frames)))
                   for label, frames in candidates.items() if frames is not None}
    panels = [
        Panel("psnr_working", "PSNR at working size (vs the input frames)", "dB",
              [Series(label, x, _values(psnr, len(x)), f"working.{label}.psnr") for label, (psnr, _) in working.items()]),
        Panel("ssim_working", "SSIM at working size", "SSIM",
              [Series(label, x, _values(ssim, len(x)), f"working.{label}.ssim") for label, (_, ssim) in working.items()]),
    ]
    if reconstruction.source_series:
        for name, title, unit in (("psnr", "PSNR at source resolution (vs the source frames)", "dB"),
                                  ("ssim", "SSIM at source resolution", "SSIM")):
            panels.append(Panel(f"{name}_source", title, unit, [
                Series(label, x, _values(values[name], len(x)), f"source.{label}.{name}")
                for label, values in reconstruction.source_series.items()]))
    return panels


def reconstruction_page(clip, reconstruction, composite, settings: dict | None) -> str:
    """The page of `reconstruct` (with --compare: every path side by side), at working size and at
    source resolution (each path composited as the command's --composite says)."""
    from diffferv_cli.editing.composite import composite_frame
    from diffferv_cli.video.stream import stream_frames

    positions = strip_positions(len(clip.frames))
    numbers = clip.frame_indices
    captions = [f"frame {numbers[position]}" for position in positions]
    paths = reconstruction.paths or {}
    wanted = set(positions)
    inputs = {index: frame for index, frame in enumerate(clip.frames) if index in wanted}  # one pass
    columns = [Column("input (working size)", [inputs[p] for p in positions])]
    if reconstruction.reference is not None:
        columns.append(Column("VAE round trip", [reconstruction.reference[p] for p in positions]))
    for label, frames in paths.items():
        columns.append(Column(label, [frames[p] for p in positions]))
        columns.append(Column(f"|{label} − input|", [heat_map(inputs[p], frames[p]) for p in positions]))
    sources = [frame for index, frame in enumerate(stream_frames(clip.info.path, clip.frame_indices,
                                                                 clip.spec.stride, info=clip.info))
               if index in wanted]
    region = clip.spec.region
    source_columns = [Column("source", sources, region)]
    for label, frames in paths.items():
        outputs = [composite_frame(source, frames[p], None if reconstruction.reference is None
                                   else reconstruction.reference[p], clip.geometry, composite, region)
                   for source, p in zip(sources, positions, strict=True)]
        source_columns.append(Column(f"{label} ({composite.mode})", outputs, region))
        source_columns.append(Column(f"|{label} − source|", [heat_map(s, o) for s, o in zip(sources, outputs,
                                                                                            strict=True)], region))
    working_size = "x".join(str(side) for side in clip.geometry.working_size)
    working_rows = [(label, f"{values['mse']:.6f}", f"{values['psnr']:.2f}", f"{values['ssim']:.4f}",
                     "-" if values.get("latent_mse") is None else f"{values['latent_mse']:.2e}")
                    for label, values in reconstruction.metrics.items()]
    source_rows = []
    for label, values in reconstruction.source_metrics.items():
        path, mode = label.rsplit(", ", 1)
        source_rows.append((path, mode, f"{values['mse']:.6f}", f"{values['psnr']:.2f}", f"{values['ssim']:.4f}"))
    panels = reconstruction_panels(clip.frames, reconstruction, numbers)
    body = (f"<p>Input <code>{html.escape(str(clip.info.path))}</code>: {len(numbers)} frames, working size "
            f"{working_size}, source {clip.info.width}x{clip.info.height}.</p>"
            + settings_section(settings, "This reconstruction")
            + f"<h2>Reconstruction vs input (working size {working_size})</h2>"
            + _table(("path", "MSE", "PSNR (dB)", "SSIM", "latent MSE"), working_rows)
            + f"<h2>At source resolution ({clip.info.width}x{clip.info.height})</h2>"
            + _table(("path", "output", "MSE", "PSNR (dB)", "SSIM"), source_rows)
            + "<h2>Paths side by side, working size</h2>" + _strip_table(captions, columns)
            + "<h2>Paths side by side, source resolution</h2><p class=\"note\">Heat maps: |output − source| "
            f"averaged over channels, full colour at {HEAT_FULL_SCALE:.0%} of the range"
            + ("; the green box is the edited region" if region else "") + ".</p>"
            + _strip_table(captions, source_columns)
            + "<h2>Per frame</h2>" + _plots(panels))
    series = {panel.name: panel.to_json() for panel in panels}
    random_model = bool(settings and settings.get("model_random"))
    return page(f"diffferv reconstruction: {clip.info.path.name}", body, series, random_model)


def html_path_beside(output: Path) -> Path:
    """Where `--html` writes the page of the output video `output`: `clip.age.mp4` -> `clip.age.report.html`."""
    return output.with_suffix(".report.html")
