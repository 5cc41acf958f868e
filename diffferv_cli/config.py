"""Typed, frozen configuration objects. The CLI builds them; the library only reads them.

Every number is checked here, once: floats must be finite (`allow_inf_nan=False`: `--guidance inf` or
`--lr nan` is refused, not turned into a black video or NaN weights) and within a range; integers have an
upper bound too, so that a huge value (`--seed 2**64`, `--steps 10**30`) is one sentence, not an overflow
deep inside torch. `MAX_COUNT` bounds counts (frames, steps, batch sizes); `MAX_SEED` seeds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_SOURCE_PROMPT = "a photo of a person"
MAX_COUNT = 2**31 - 1
MAX_SEED = 2**63 - 1  # torch generators take 64 bits; the seed plus a small offset must still fit
MAX_GUIDANCE = 50.0
MAX_SHORT_SIDE = 2048  # working sizes; `eval` compares larger videos with --size
Pixels = Annotated[int, Field(ge=0, le=MAX_COUNT)]

# Default window: 24 frames. An edit at 512x512 in recompute mode runs 3 branches, a batch of 72. The
# CPU measurement in the README (bench/bench_edit_memory.py: 16 frames, batch 48, float32, 10.9 GiB peak
# for the whole job) scales to about 16 GiB for 24 frames in float32 and about half that in float16, so a
# 24 GB GPU holds it with room to spare. An estimate from that measurement, not a GPU measurement.
DEFAULT_WINDOW_FRAMES = 24


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


def default(model: type[BaseModel], field: str):
    """The default of `model.field`: the CLI's options take their defaults from here, never a copy."""
    return model.model_fields[field].default


def choices(model: type[BaseModel], field: str) -> tuple[str, ...]:
    """The values a `Literal` field of `model` allows, in order (what the CLI lists in its messages)."""
    return get_args(model.model_fields[field].annotation)


class ClipSpec(Frozen):
    """Which frames of a video to work on, and at what size.

    The working size keeps the aspect ratio: the short side becomes `short_side`, then each side is
    rounded to a multiple of `multiple` (the UNet needs /64 at SD1.5 resolution) by a small center crop
    or pad, which is recorded and undone on output."""

    start: int = Field(0, ge=0, le=MAX_COUNT, description="first frame (0-based, in decoded frame order)")
    frames: int | None = Field(None, ge=1, le=MAX_COUNT, description="how many frames; all remaining when None")
    stride: int = Field(1, ge=1, le=MAX_COUNT, description="take every n-th frame")
    short_side: int = Field(512, ge=16, le=MAX_SHORT_SIDE)
    multiple: int = Field(64, ge=8, le=256)
    region: tuple[Pixels, Pixels, Pixels, Pixels] | None = Field(
        None, description="(x, y, width, height) of the part of the displayed frame that is edited; None: all")

    @model_validator(mode="after")
    def _short_side_fits(self) -> ClipSpec:
        if self.short_side % self.multiple:
            raise ValueError(f"short side {self.short_side} must be a multiple of {self.multiple}")
        if self.region is not None:
            x, y, width, height = self.region
            if x < 0 or y < 0 or width < 8 or height < 8:
                raise ValueError(f"region {x},{y},{width},{height} needs x, y >= 0 and a size of at least 8x8")
        return self


class TemporalConfig(Frozen):
    """Paper section 3.3: SWCFA window and the two switches of the Table 5 ablation."""

    window: int = Field(3, ge=1, le=MAX_COUNT, description="SWCFA window length w (frames), eq. 6")
    swcfa: bool = True
    tta: bool = True


class InversionConfig(Frozen):
    """Paper section 3.4, inversion with preservation-feature caching."""

    prompt: str = DEFAULT_SOURCE_PROMPT
    steps: int = Field(50, ge=1, le=1000, description="DDIM steps T")
    feature_mode: Literal["recompute", "disk"] = "recompute"
    temporal: TemporalConfig = TemporalConfig()
    flow_preset: Literal["ultrafast", "fast", "medium"] = "medium"
    window_frames: int = Field(DEFAULT_WINDOW_FRAMES, ge=1, le=MAX_COUNT, description="frames per temporal window of every UNet pass")
    window_overlap: int | None = Field(None, ge=0, le=MAX_COUNT, description="frames shared by neighbouring windows "
                                       "(default: a quarter of the window, at least the SWCFA window)")

    @model_validator(mode="after")
    def _window_fits(self) -> InversionConfig:
        from diffferv_cli.temporal.windows import check_window

        check_window(self.window_frames, self.temporal.window, self.window_overlap)
        return self

    @property
    def overlap(self) -> int:
        from diffferv_cli.temporal.windows import check_window

        return check_window(self.window_frames, self.temporal.window, self.window_overlap)


class EditConfig(Frozen):
    """Paper section 3.4, sampling with preservation-feature injection."""

    prompt_edit: str
    tau_app: float = Field(0.9, ge=0.0, le=1.0, description="inject SWCFA Q,K while t > (1-tau_app)*T")
    tau_motion: float = Field(1.0, ge=0.0, le=1.0, description="inject TTA Q,K while t > (1-tau_motion)*T")
    tau_cross: float = Field(1.0, ge=0.0, le=1.0, description="replace shared-word cross-attention maps while t > (1-tau_cross)*T")
    guidance: float = Field(5.0, ge=0.0, le=MAX_GUIDANCE, description="g in noise = neg + g*(pos - neg)")
    inject: bool = True
    exact: bool = False  # correct the edit path with the cached inversion path (reconstruction is then exact)


class CompositeConfig(Frozen):
    """How the working-size edit goes back into the source-resolution frame (editing/composite.py).

    `residual`: output = S + up(E - R) where the edit changed little and up(E) where it changed a lot
    (R = decode of the cached z_0, E = decoded edit), blended by a feathered mask of the low-passed
    change |E - R|. `replace`: output = up(E), the working render scaled up. Lengths are in working-size
    pixels."""

    mode: Literal["residual", "replace"] = "residual"
    threshold: float = Field(0.1, gt=0.0, le=1.0, description="low-passed |E - R| (0..1 scale) above which the edit replaces the source")
    lowpass: float = Field(2.0, ge=0.0, le=256.0, description="Gaussian sigma of the low-pass on |E - R|")
    feather: float = Field(4.0, ge=0.0, le=256.0, description="Gaussian sigma of the mask's soft edge")
    border: float = Field(16.0, ge=0.0, le=2048.0, description="width of the ramp joining an edited region to the rest of the frame")


class TrainConfig(Frozen):
    """Paper sections 3.2 and 4.1: fine-tune the UNet on captioned faces mixed with general image-text pairs.

    Defaults are the paper's where it gives them (Adam, lr 2.5e-6, batch 8, 10 % prior pairs); the rest
    (steps, augmentation ranges, checkpointing) are this tool's choices, described in `training.py`."""

    faces: Path
    out: Path
    prior: Path | None = None
    prior_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="share of samples drawn from `prior`")
    captions: Path | None = Field(None, description="JSONL or CSV manifest (file,text) for the face images")
    prior_captions: Path | None = Field(None, description="JSONL or CSV manifest for the prior images")
    steps: int = Field(10_000, ge=1, le=MAX_COUNT, description="optimizer steps")
    batch_size: int = Field(8, ge=1, le=65536, description="samples per process per micro-batch")
    grad_accum: int = Field(1, ge=1, le=65536)
    lr: float = Field(2.5e-6, gt=0.0, le=1.0)
    lr_warmup_steps: int = Field(0, ge=0, le=MAX_COUNT)
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    resolution: int = Field(512, ge=8, le=8192, multiple_of=8)
    center_crop: bool = False
    max_zoom: float = Field(1.3, ge=1.0, le=4.0, description="face zoom-in drawn from [1, max_zoom]")
    max_rotation: float = Field(15.0, ge=0.0, le=45.0, description="face rotation in degrees, +-")
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    ema: bool = False
    lora_rank: int | None = Field(None, ge=1, le=1024, description="train a LoRA of this rank on the UNet's "
                                  "attention projections instead of the whole UNet, and export it (models/lora.py)")
    ema_decay: float = Field(0.9999, gt=0.0, lt=1.0)
    checkpoint_every: int = Field(1000, ge=0, le=MAX_COUNT, description="0: no checkpoints")
    keep_checkpoints: int = Field(3, ge=0, le=MAX_COUNT, description="most recent checkpoints kept; 0 keeps all")
    resume: str | None = Field(None, description="'latest' or a checkpoint folder")
    validate_every: int = Field(0, ge=0, le=MAX_COUNT, description="0: no validation images")
    validation_prompts: tuple[str, ...] = ()
    validation_steps: int = Field(25, ge=1, le=1000, description="DDIM steps of a validation image")
    validation_guidance: float = Field(7.5, ge=0.0, le=MAX_GUIDANCE)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    workers: int = Field(2, ge=0, le=1024, description="data-loading processes")


class EvalConfig(Frozen):
    """What to compare and how. The CLI builds it; `evaluate` only reads it."""

    start: int = Field(0, ge=0, le=MAX_COUNT, description="first frame of the edited video")
    frames: int | None = Field(None, ge=1, le=MAX_COUNT)
    stride: int = Field(1, ge=1, le=MAX_COUNT)
    original_start: int | None = Field(None, ge=0, le=MAX_COUNT, description="the original's frame shown as the "
                                       "edited video's frame 0 (default: from the edited file's metadata)")
    original_stride: int | None = Field(None, ge=1, le=MAX_COUNT, description="original frames per edited frame "
                                        "(default: from the edited file's metadata)")
    size: int | None = Field(None, ge=16, le=MAX_SHORT_SIDE, description="short side to compare at; None = native size")
    similarity: Literal["dlib", "cosine"] = "dlib"
    temporal: bool = True
    flow_preset: Literal["ultrafast", "fast", "medium"] = "medium"
    attribute_model: Path | None = None
    target_attribute: str | None = None
    clip_model: Path | None = None
