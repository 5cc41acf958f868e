"""`diffferv eval`: compare an edited video with its original (paper section 4.2), honestly.

Both inputs are videos or folders of frames (png/jpg/webp/bmp, natural sort order). Frames are compared
at the native size, or with `size` at that short side, through `video.read_clip`'s geometry with
multiples of 8: the short side rounded down to a multiple of 8 (so native sizes like 640x360 stay
untouched), the long side mirror-padded up to one. Folders of frames go through the same geometry, so a
video and its frames compare equal. The original and the edited video must have the same native size:
anything else is a `UserError`.

Which frames are compared: `start`/`frames`/`stride` select frames of the EDITED video. Its frame j is
frame `original_start + j * original_stride` of the original, where the two come from the options, else
from the frame selection diffferv records in every output's metadata (`edit --start 100 --stride 2`
gives an output whose frame 0 is frame 100 of its source), else they are 0 and 1. Without either (a
folder of frames, another tool's video), the same selection applies to both sides and both must have
the same number of selected frames.

Groups of metrics (definitions in `metrics.py`):

* reconstruction: MSE, PSNR (capped at 100 dB), SSIM, LPIPS (when installed with its weights);
* identity (dlib): IDP, TL-ID, TG-ID, with the frames without a face counted and skipped;
* temporal: flow-warping error of the edit under the ORIGINAL's flow (and of the original itself, for
  reference);
* attributes (TACR, NAPR) and CLIP-IQA only from models the user passes; otherwise "unavailable".

Nothing is ever downloaded; what cannot be computed is reported as unavailable with the reason.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from diffferv_cli.config import MAX_SHORT_SIDE, EvalConfig
from diffferv_cli.errors import UserError
from diffferv_cli.evaluation import metrics

Progress = Callable[[str, int, int], None] | None
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
SIZE_MULTIPLE = 8
CLIP_IQA_PROMPTS = ("Good photo.", "Bad photo.")


@dataclass(frozen=True)
class MetricResult:
    group: str
    name: str
    value: float | None  # None when unavailable
    note: str = ""
    better: Literal["lower", "higher", ""] = ""
    per_frame: Sequence[float] | None = None

    def to_json(self) -> dict:
        entry: dict = {"group": self.group, "value": _finite(self.value), "note": self.note}
        if self.better:
            entry["better"] = self.better
        if self.per_frame is not None:
            entry["per_frame"] = [_finite(v) for v in self.per_frame]
        return entry


@dataclass
class EvalReport:
    original: str
    edited: str
    frames: int
    height: int
    width: int
    config: EvalConfig
    results: list[MetricResult] = field(default_factory=list)
    original_frames: tuple[int, ...] = ()  # frame numbers of the original that were compared
    alignment: str = "same selection on both sides"  # how they were chosen
    # the original's own per-frame values beside an edit's ("tl_id": sim(S_i, S_i+1), "warp_error")
    reference_per_frame: dict[str, list[float]] = field(default_factory=dict)
    faces: dict[str, list[bool]] | None = None  # "original" / "edited": a face found in frame i

    def add(self, group: str, name: str, value: float | metrics.Unavailable | None, note: str = "",
            better: Literal["lower", "higher", ""] = "", per_frame: Sequence[float] | None = None) -> None:
        if isinstance(value, metrics.Unavailable):
            self.results.append(MetricResult(group, name, None, str(value), better))
        else:
            self.results.append(MetricResult(group, name, None if value is None else float(value), note, better,
                                              None if per_frame is None else [float(v) for v in per_frame]))

    def value(self, name: str) -> float | None:
        return next(result.value for result in self.results if result.name == name)

    def to_json(self) -> dict:
        return {
            "original": self.original,
            "edited": self.edited,
            "frames": self.frames,
            "size": {"height": self.height, "width": self.width},
            "selection": {"start": self.config.start, "frames": self.config.frames, "stride": self.config.stride},
            "original_frames": list(self.original_frames),
            "alignment": self.alignment,
            "scale": "pixel metrics on frames in [0, 1]; PSNR capped at 100 dB",
            "metrics": {result.name: result.to_json() for result in self.results},
            "reference_per_frame": {name: [_finite(v) for v in values]
                                    for name, values in self.reference_per_frame.items()},
            "faces": self.faces,
        }


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else value


# Reading ----------------------------------------------------------------------------------------------


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def _frame_files(folder: Path) -> list[Path]:
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                   key=_natural_key)
    if not files:
        raise UserError(f"{folder} holds no frames ({', '.join(IMAGE_SUFFIXES)}).")
    return files


def native_size(path: Path) -> tuple[int, int]:
    """(width, height) of a video or of the first frame of a folder, as displayed."""
    if not path.exists():
        raise UserError(f"{path} does not exist.")
    if path.is_dir():
        first = _frame_files(path)[0]
        with _open_frame(first) as image:
            return image.size
    from diffferv_cli.video.probe import probe

    info = probe(path)
    return int(info.width), int(info.height)


def _open_frame(path: Path):
    """A frame image opened (header only), refused when it cannot be read or has more pixels than PIL's
    decompression-bomb limit: nothing is decoded before that check."""
    from PIL import Image, UnidentifiedImageError

    from diffferv_cli.files import open_image

    try:
        return open_image(path)
    except Image.DecompressionBombError as err:
        raise UserError(f"The frame {path} is too large to decode ({err}).") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise UserError(f"Cannot read the frame {path} ({err}).") from None


def _short_side(width: int, height: int, size: int | None) -> int:
    if size is None and min(width, height) > MAX_SHORT_SIDE:
        raise UserError(f"The videos are {width}x{height}, larger than eval compares at native size (short side "
                        f"up to {MAX_SHORT_SIDE}); pass --size {MAX_SHORT_SIDE // 4} or another short side.")
    short = size if size is not None else min(width, height)
    return max(short // SIZE_MULTIPLE * SIZE_MULTIPLE, 2 * SIZE_MULTIPLE)


def _spec(start: int, frames: int | None, stride: int, short_side: int):
    from diffferv_cli.config import ClipSpec

    return ClipSpec(start=start, frames=frames, stride=stride, short_side=short_side, multiple=SIZE_MULTIPLE)


def frame_count(path: Path) -> int:
    """Frames in a video or a folder of frames."""
    if path.is_dir():
        return len(_frame_files(path))
    from diffferv_cli.video.probe import probe

    return probe(path).frame_count


def _fit(image: np.ndarray, geometry) -> np.ndarray:
    """One frame of a folder through the same geometry `video.read_clip` applies to a video: resize to
    the scaled size, then the centered crop (>0) / mirrored pad (<0) of `geometry.crop`."""
    import cv2

    height, width = image.shape[:2]
    scaled_width, scaled_height = geometry.scaled_size
    if (scaled_width, scaled_height) != (width, height):
        shrinking = scaled_width <= width and scaled_height <= height
        image = cv2.resize(image, (scaled_width, scaled_height),
                           interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)
    left, top, right, bottom = geometry.crop
    image = image[max(top, 0):scaled_height - max(bottom, 0), max(left, 0):scaled_width - max(right, 0)]
    pads = ((max(-top, 0), max(-bottom, 0)), (max(-left, 0), max(-right, 0)), (0, 0))
    return np.ascontiguousarray(np.pad(image, pads, mode="reflect") if any(map(any, pads)) else image)


def read_frames(path: Path, spec) -> np.ndarray:
    """The frames `spec` (a `ClipSpec` at the comparison size) selects from a video or folder, (m, H, W, 3)
    uint8 RGB."""
    if not path.exists():
        raise UserError(f"{path} does not exist.")
    if path.is_dir():
        from diffferv_cli.video.geometry import frame_selection, working_geometry

        files = _frame_files(path)
        size = native_size(path)
        geometry = working_geometry(size, spec)
        frames = []
        for index in frame_selection(len(files), spec, name=path.name):
            with _open_frame(files[index]) as image:
                if image.size != size:  # never stretched into the first frame's size and scored
                    raise UserError(f"The frame {files[index]} is {image.size[0]}x{image.size[1]} but {files[0]} "
                                    f"is {size[0]}x{size[1]}; eval compares frames of one size.")
                try:
                    frames.append(_fit(np.asarray(image.convert("RGB")), geometry))
                except (OSError, ValueError) as err:
                    raise UserError(f"Cannot read the frame {files[index]} ({err}).") from None
        if len({frame.shape for frame in frames}) > 1:
            raise UserError(f"The frames in {path} do not all have the same size.")
        return np.stack(frames)
    from diffferv_cli.video.io import read_clip

    return np.asarray(read_clip(path, spec).frames)


def alignment(edited: Path, config: EvalConfig):
    """(`SourceFrames` mapping the edited video's frames to the original's, how it was found), or
    (None, ...) when nothing says how they line up."""
    from diffferv_cli.video.geometry import SourceFrames

    recorded = None
    if not edited.is_dir():
        from diffferv_cli.video.probe import probe

        recorded = probe(edited).source_frames
    options = config.original_start is not None or config.original_stride is not None
    if recorded is None and not options:
        return None, "same selection on both sides"
    start = config.original_start if config.original_start is not None else (recorded.start if recorded else 0)
    stride = config.original_stride if config.original_stride is not None else (recorded.stride if recorded else 1)
    origin = "--original-start/--original-stride" if options else "the edited file's metadata"
    if options and recorded is not None:
        origin += " (over the edited file's metadata)"
    mapping = SourceFrames(start=start, stride=stride, count=frame_count(edited))
    return mapping, f"original frame = {start} + {stride} x edited frame, from {origin}"


def load_pair(original: Path, edited: Path, config: EvalConfig):
    """(original frames, edited frames, the original's frame numbers, how they were aligned), both at
    one size; a `UserError` when they cannot be compared."""
    original_size, edited_size = native_size(original), native_size(edited)
    if original_size != edited_size:
        raise UserError(f"The original is {original_size[0]}x{original_size[1]} but the edited video is "
                        f"{edited_size[0]}x{edited_size[1]}; eval compares videos of the same size.")
    short_side = _short_side(*original_size, config.size)
    mapping, how = alignment(edited, config)
    if mapping is None:
        spec = _spec(config.start, config.frames, config.stride, short_side)
        source = read_frames(original, spec)
        result = read_frames(edited, spec)
        if len(source) != len(result):
            raise UserError(f"The original has {len(source)} selected frames but the edited video has {len(result)}; "
                            "select the same frames on both sides (--start/--frames/--stride), or say which "
                            "frames of the original the edit holds (--original-start/--original-stride).")
        numbers = tuple(range(config.start, config.start + config.stride * len(source), config.stride))
    else:
        result = read_frames(edited, _spec(config.start, config.frames, config.stride, short_side))
        wanted = mapping.then(config.start, config.stride, len(result))
        available = frame_count(original)
        if wanted.indices[-1] >= available:
            raise UserError(f"The edited frames are frames {wanted.start}..{wanted.indices[-1]} of the original "
                            f"({how}), but the original has {available} frames; pass the video the edit was made "
                            "from, or --original-start/--original-stride.")
        source = read_frames(original, _spec(wanted.start, wanted.count, wanted.stride, short_side))
        if len(source) != len(result):  # the decoder gave fewer frames than the container promised
            raise UserError(f"Only {len(source)} of the original's frames {wanted.start}..{wanted.indices[-1]} "
                            f"could be decoded, for {len(result)} edited frames.")
        numbers = wanted.indices
    if source.shape != result.shape:  # same native size, so only a reader disagreement gets here
        raise UserError(f"The frames differ in size after reading ({source.shape[1:3]} vs {result.shape[1:3]}).")
    return source, result, numbers, how


# Evaluation -------------------------------------------------------------------------------------------


def evaluate(original: Path, edited: Path, config: EvalConfig, progress: Progress = None,
             frames_hook: Callable[[np.ndarray, np.ndarray], None] | None = None) -> EvalReport:
    """All metrics of section 4.2 that can be computed here, as an `EvalReport`. `frames_hook(original,
    edited)` sees the compared frames (m, H, W, 3) once they are read (the HTML report keeps a few)."""
    report_progress = progress or (lambda stage, done, total: None)
    source, result, numbers, how = load_pair(Path(original), Path(edited), config)
    if frames_hook is not None:
        frames_hook(source, result)
    count, height, width, _ = source.shape
    report = EvalReport(str(original), str(edited), count, height, width, config, original_frames=numbers,
                        alignment=how)

    _reconstruction(report, source, result)
    _identity(report, source, result, config, report_progress)
    if config.temporal:
        _temporal(report, source, result, config, report_progress)
    _attributes(report, source, result, config)
    _clip_iqa(report, source, result, config)
    return report


def _reconstruction(report: EvalReport, source: np.ndarray, result: np.ndarray) -> None:
    mse = metrics.mse_per_frame(source, result)
    psnr = metrics.psnr_from_mse(mse)
    ssim = metrics.ssim_per_frame(source, result)
    report.add("reconstruction", "mse", mse.mean(), "frames in [0, 1]", "lower", mse)
    report.add("reconstruction", "psnr", psnr.mean(), "dB, peak 1, per-frame capped at 100", "higher", psnr)
    report.add("reconstruction", "ssim", ssim.mean(), "Gaussian window 1.5, channels averaged", "higher", ssim)
    lpips = metrics.lpips_per_frame(source, result)
    if isinstance(lpips, metrics.Unavailable):
        report.add("reconstruction", "lpips", lpips, better="lower")
    else:
        report.add("reconstruction", "lpips", lpips.mean(), "AlexNet", "lower", lpips)


def _identity(report: EvalReport, source: np.ndarray, result: np.ndarray, config: EvalConfig,
              progress: Callable[[str, int, int], None]) -> None:
    from diffferv_cli.evaluation.faces import largest_face_descriptor
    from diffferv_cli.models.auxiliary import load_face_backend

    backend = load_face_backend()
    names = ("idp", "tl_id", "tg_id")
    if backend.analyzer is None:
        for name in names:
            report.add("identity", name, metrics.Unavailable(backend.reason or "no face analyzer"), better="higher")
        return
    count = len(source)
    source_descriptors, edited_descriptors = [], []
    for index in range(count):
        source_descriptors.append(largest_face_descriptor(backend.analyzer, source[index]))
        edited_descriptors.append(largest_face_descriptor(backend.analyzer, result[index]))
        progress("faces", index + 1, count)
    scores = metrics.identity_metrics(source_descriptors, edited_descriptors, config.similarity)
    series = metrics.identity_series(source_descriptors, edited_descriptors, config.similarity)
    report.faces = {"original": series.face_source.tolist(), "edited": series.face_edited.tolist()}
    report.reference_per_frame["tl_id"] = series.source_adjacent.tolist()
    similarity = "1 - dlib distance" if config.similarity == "dlib" else "cosine of dlib descriptors"
    note = f"{similarity}; {scores.frames_used}/{count} frames with a face on both sides"
    if scores.frames_without_face_source or scores.frames_without_face_edited:
        note += (f" (no face: {scores.frames_without_face_source} original, "
                 f"{scores.frames_without_face_edited} edited)")
    report.add("identity", "idp", scores.idp, note, "higher", series.idp)
    report.add("identity", "tl_id", scores.tl_id, "adjacent frames, relative to the original; per frame: "
               "the edit's sim(i, i+1), the original's in reference_per_frame", "higher", series.edited_adjacent)
    report.add("identity", "tg_id", scores.tg_id, "all frame pairs, relative to the original", "higher")


def _temporal(report: EvalReport, source: np.ndarray, result: np.ndarray, config: EvalConfig,
              progress: Callable[[str, int, int], None]) -> None:
    if len(source) < 2:
        report.add("temporal", "warp_error", metrics.Unavailable("needs at least two frames"), better="lower")
        return
    from diffferv_cli.temporal.flow import DISFlow, compute_flow

    flow = compute_flow(source, DISFlow(config.flow_preset), progress=lambda d, t: progress("flow", d, t))
    edited = metrics.flow_warping_error(result, flow.forward, flow.occlusion)
    own = metrics.flow_warping_error(source, flow.forward, flow.occlusion)
    note = (f"MSE [0, 1] under the original's flow (DIS {config.flow_preset}), {edited.valid_fraction:.0%} "
            f"of pixels unoccluded; original itself {own.mse:.3g}")
    report.add("temporal", "warp_error", edited.mse, note, "lower", edited.per_pair_mse)
    report.reference_per_frame["warp_error"] = own.per_pair_mse.tolist()
    report.add("temporal", "warp_error_abs", edited.mae, f"mean absolute; original itself {own.mae:.3g}", "lower")


def _attributes(report: EvalReport, source: np.ndarray, result: np.ndarray, config: EvalConfig) -> None:
    if config.attribute_model is None:
        why = metrics.Unavailable("pass --attribute-model (an image-classification model folder) "
                                  "and --target-attribute")
        report.add("attributes", "tacr", why, better="higher")
        report.add("attributes", "napr", why, better="higher")
        return
    from diffferv_cli.models.auxiliary import load_attribute_classifier

    classifier = load_attribute_classifier(config.attribute_model)
    try:
        labels, source_predictions = classify_attributes(classifier, source)
        _, edited_predictions = classify_attributes(classifier, result)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - a model that does not load is the user's input
        raise UserError(f"The attribute model {config.attribute_model} could not be used "
                        f"({type(err).__name__}: {err}).") from None
    if config.target_attribute is None or config.target_attribute not in labels:
        given = "no --target-attribute" if config.target_attribute is None else f"{config.target_attribute!r}"
        raise UserError(f"TACR/NAPR need --target-attribute, one of the model's labels ({', '.join(labels)}); "
                        f"got {given}.")
    rates = metrics.attribute_rates(source_predictions, edited_predictions, labels, config.target_attribute)
    report.add("attributes", "tacr", rates.tacr, f"target {config.target_attribute!r} changed", "higher")
    report.add("attributes", "napr", rates.napr, f"{len(labels) - 1} other attributes unchanged", "higher")


def classify_attributes(classifier, frames: np.ndarray) -> tuple[list[str], np.ndarray]:
    """(labels, binary predictions (m, labels)) from a transformers image-classification pipeline
    (`models.auxiliary.load_attribute_classifier`).

    Multi-label models (`problem_type == "multi_label_classification"`, CelebA-style) give sigmoid
    scores thresholded at 0.5; single-label models give the arg-max label as the only positive."""
    from PIL import Image

    config = classifier.model.config
    labels = [config.id2label[i] for i in range(len(config.id2label))]
    multi_label = config.problem_type == "multi_label_classification"
    outputs = classifier([Image.fromarray(frame) for frame in frames], top_k=len(labels),
                         function_to_apply="sigmoid" if multi_label else "softmax")
    scores = np.zeros((len(frames), len(labels)))
    for row, output in enumerate(outputs):
        for entry in output:
            scores[row, labels.index(entry["label"])] = entry["score"]
    if multi_label:
        return labels, scores >= 0.5
    return labels, scores == scores.max(axis=1, keepdims=True)


def _clip_iqa(report: EvalReport, source: np.ndarray, result: np.ndarray, config: EvalConfig) -> None:
    if config.clip_model is None:
        report.add("quality", "clip_iqa", metrics.Unavailable("pass --clip-model (a CLIP model folder)"),
                   better="higher")
        return
    from diffferv_cli.models.auxiliary import load_clip

    clip, processor = load_clip(config.clip_model)
    try:
        edited_scores = clip_iqa(clip, processor, result)
        source_scores = clip_iqa(clip, processor, source)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001
        raise UserError(f"The CLIP model {config.clip_model} could not be used ({type(err).__name__}: {err}).") from None
    report.add("quality", "clip_iqa", edited_scores.mean(),
               f"P({CLIP_IQA_PROMPTS[0]!r} vs {CLIP_IQA_PROMPTS[1]!r}); original {source_scores.mean():.3f}",
               "higher", edited_scores)


def clip_iqa(clip, processor, frames: np.ndarray, batch: int = 8) -> np.ndarray:
    """CLIP-IQA per frame with a transformers `CLIPModel` + `CLIPProcessor` (`models.auxiliary.load_clip`).

    The original CLIP-IQA uses a ResNet-50 CLIP without positional embeddings; any CLIP checkpoint works
    here, so values are comparable only between runs with the same model."""
    import torch
    from PIL import Image

    with torch.no_grad():
        text = processor(text=list(CLIP_IQA_PROMPTS), return_tensors="pt", padding=True)
        text_features = clip.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
        text_features = _features(text_features)
        scores = []
        for start in range(0, len(frames), batch):
            images = [Image.fromarray(frame) for frame in frames[start:start + batch]]
            pixels = processor(images=images, return_tensors="pt")["pixel_values"]
            image_features = _features(clip.get_image_features(pixel_values=pixels))
            cosine = (image_features @ text_features.T).double().numpy()  # (batch, 2)
            scores.append(metrics.clip_iqa_from_similarities(cosine[:, 0], cosine[:, 1]))
    return np.concatenate(scores)


def _features(output):
    """Unit-norm embeddings (transformers 5 may return a model output instead of a tensor)."""
    import torch

    tensor = output if isinstance(output, torch.Tensor) else output.pooler_output
    return tensor / tensor.norm(dim=-1, keepdim=True)
