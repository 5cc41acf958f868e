"""What made an edit (or a reconstruction path), as the plain dict `write_video(settings=...)` records in
the output's metadata (`video/metadata.py`) and the HTML report shows."""

from __future__ import annotations

from diffferv_cli.config import CompositeConfig, EditConfig, InversionConfig


def edit_settings(components, clip, inversion: InversionConfig, config: EditConfig, label: str,
                  composite: CompositeConfig, kind: str = "edit") -> dict:
    """The settings of one output: `kind` ("edit" or "reconstruct"), `label` (the preset's name, "edit"
    for --prompt-edit, or the reconstruction path), prompts, tau, guidance, injection, the model (and
    whether its weights are random), the inversion, the frame selection, the working size, the region
    (pixels of the displayed source frame, None for the whole frame) and the compositing."""
    width, height = clip.geometry.working_size
    indices = clip.frame_indices
    return {
        "kind": kind,
        "label": label,
        "prompt": inversion.prompt,
        "prompt_edit": config.prompt_edit,
        "tau_app": config.tau_app,
        "tau_motion": config.tau_motion,
        "tau_cross": config.tau_cross,
        "guidance": config.guidance,
        "inject": config.inject,
        "exact": config.exact,
        "model": components.model_id,
        "model_random": bool(components.is_random),
        "loras": [[digest, scale] for digest, scale in components.loras],
        "clip_skip": components.clip_skip,
        "steps": inversion.steps,
        "window": inversion.temporal.window,
        "swcfa": inversion.temporal.swcfa,
        "tta": inversion.temporal.tta,
        "feature_mode": inversion.feature_mode,
        "flow_preset": inversion.flow_preset,
        "window_frames": inversion.window_frames,
        "frames": {"start": indices[0], "stride": clip.spec.stride, "count": len(indices),
                   "source_count": clip.info.frame_count},
        "working_size": [width, height],
        "source_size": [clip.info.width, clip.info.height],
        "region": None if clip.spec.region is None else [int(side) for side in clip.spec.region],
        "composite": {"mode": composite.mode, "threshold": composite.threshold},
    }
