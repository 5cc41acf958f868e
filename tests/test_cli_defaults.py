"""The CLI's defaults are the config models' defaults: a number retyped in an option (and then changed in
only one place) fails here. Two views: the options Typer shows, and the configs a bare command builds."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import typer
from typer.testing import CliRunner

from diffferv_cli.cli import app
from diffferv_cli.config import (
    DEFAULT_MODEL,
    ClipSpec,
    CompositeConfig,
    EditConfig,
    EvalConfig,
    InversionConfig,
    TemporalConfig,
    TrainConfig,
)


class Stop(Exception):
    """Raised by a stand-in for the library once the CLI has handed over what it built."""


def _defaults(command: str) -> dict[str, object]:
    click_command = typer.main.get_command(app).commands[command]
    return {param.name: param.default for param in click_command.params}


def _fields(model, **renamed) -> dict[str, object]:
    """{cli option: default} for the fields of `model` named in `renamed` (option name -> field name)."""
    return {option: model.model_fields[field].default for option, field in renamed.items()}


CLIP = {**_fields(ClipSpec, start="start", frames="frames", stride="stride"),
        "size": None}  # the model's own working size (models/geometry.py), ClipSpec's 512 for SD 1.x
JOB = {
    **CLIP, "model": DEFAULT_MODEL, "prompt": None,
    **_fields(InversionConfig, steps="steps", features="feature_mode", flow_preset="flow_preset",
              window_frames="window_frames"),
    "window": TemporalConfig.model_fields["window"].default,
    "no_swcfa": not TemporalConfig.model_fields["swcfa"].default,
    "no_tta": not TemporalConfig.model_fields["tta"].default,
}
COMPOSITE = _fields(CompositeConfig, composite="mode", composite_threshold="threshold")


@pytest.mark.parametrize("command, expected", [
    ("invert", JOB),
    ("edit", {**JOB, **COMPOSITE, **_fields(EditConfig, tau_motion="tau_motion", tau_cross="tau_cross",
                                           exact="exact"),
              "no_inject": not EditConfig.model_fields["inject"].default,
              "tau_app": None, "guidance": None, "subject": None}),  # None: the preset's, else the config's
    ("reconstruct", {**JOB, **COMPOSITE, "exact": EditConfig.model_fields["exact"].default}),
    ("probe", {**CLIP, "model": DEFAULT_MODEL}),
    ("train", {"model": DEFAULT_MODEL, **_fields(
        TrainConfig, prior="prior", prior_ratio="prior_ratio", captions="captions", prior_captions="prior_captions",
        steps="steps", batch_size="batch_size", grad_accum="grad_accum", lr="lr", warmup="lr_warmup_steps",
        resolution="resolution", center_crop="center_crop", max_zoom="max_zoom", max_rotation="max_rotation",
        mixed_precision="mixed_precision", gradient_checkpointing="gradient_checkpointing",
        adam_8bit="use_8bit_adam", ema="ema", checkpoint_every="checkpoint_every",
        keep_checkpoints="keep_checkpoints", resume="resume", validate_every="validate_every", seed="seed",
        workers="workers")}),
    ("eval", {**_fields(EvalConfig, start="start", frames="frames", stride="stride", original_start="original_start",
                        original_stride="original_stride", size="size", similarity="similarity"),
              "no_temporal": not EvalConfig.model_fields["temporal"].default}),
])
def test_option_defaults_are_the_config_defaults(command, expected):
    shown = _defaults(command)
    assert {option: shown[option] for option in expected} == expected


def test_the_defaults_are_the_documented_values():
    """The values themselves, once, where a change is a decision (README, DESIGN): 512, T=50, w=3, ..."""
    shown = _defaults("edit")
    assert (shown["size"], shown["steps"], shown["window"], shown["window_frames"]) == (None, 50, 3, 24)
    from diffferv_cli.models.geometry import model_geometry

    assert model_geometry(DEFAULT_MODEL) == (64, 512) == (64, ClipSpec().short_side)  # SD 1.5, not downloaded
    assert (shown["features"], shown["flow_preset"], shown["composite"], shown["composite_threshold"]) == \
        ("recompute", "medium", "residual", 0.1)
    assert (shown["tau_motion"], shown["tau_cross"]) == (1.0, 1.0)


@pytest.fixture
def captured(monkeypatch):
    """Stand-ins for the clip loader and the jobs: record the configs a command built, then stop."""
    import diffferv_cli.cli.edit as edit_cli
    import diffferv_cli.editing.job as job

    seen: dict[str, object] = {}

    def load(clip_path, spec, model, device, dtype, report, region="full", model_options=None):
        seen.update(spec=spec, model=model, region=region, model_options=model_options)
        return SimpleNamespace(), SimpleNamespace()

    def stop(name):
        def record(components, video, *args, **kwargs):
            seen.update(args=args, **kwargs)
            raise Stop(name)
        return record

    monkeypatch.setattr(edit_cli, "_load", load)
    for name in ("run_inversion", "run_edits", "run_reconstruction"):
        monkeypatch.setattr(job, name, stop(name))
    return seen


def _stopped(*args: str) -> None:
    result = CliRunner().invoke(app, list(args))
    assert isinstance(result.exception, Stop), result.output


def test_a_bare_invert_builds_the_default_configs(captured, tmp_path):
    _stopped("invert", str(tmp_path / "clip.mp4"))
    assert captured["args"] == (InversionConfig(),) and captured["spec"] == ClipSpec()
    assert captured["model"] == DEFAULT_MODEL and captured["region"] == "full"
    options = captured["model_options"]
    assert (options["prediction_type"], options["clip_skip"]) == (None, None)  # the model's own


def test_a_bare_edit_builds_the_default_configs(captured, tmp_path):
    _stopped("edit", str(tmp_path / "clip.mp4"), "--prompt-edit", "a photo of an old person")
    inversion, configs = captured["args"]
    assert inversion == InversionConfig() and captured["spec"] == ClipSpec()
    assert configs == [("edit", EditConfig(prompt_edit="a photo of an old person"))]
    assert captured["composite"] == CompositeConfig()


def test_a_bare_reconstruct_builds_the_default_configs(captured, tmp_path):
    _stopped("reconstruct", str(tmp_path / "clip.mp4"))
    inversion, config = captured["args"]
    assert inversion == InversionConfig() and config == EditConfig(prompt_edit=InversionConfig().prompt)
    assert captured["composite"] == CompositeConfig() and captured["spec"] == ClipSpec()


def test_a_preset_fills_its_own_subject_unless_subject_is_given(captured, tmp_path):
    pirate = tmp_path / "pirate.toml"
    pirate.write_text('description = "Arr."\nedit_prompt = "a photo of a {subject} as a pirate"\nsubject = "sailor"\n')
    _stopped("edit", str(tmp_path / "clip.mp4"), "--preset", str(pirate))
    inversion, configs = captured["args"]
    assert inversion.prompt == "a photo of a sailor"
    assert [config.prompt_edit for _, config in configs] == ["a photo of a sailor as a pirate"]
    _stopped("edit", str(tmp_path / "clip.mp4"), "--preset", str(pirate), "--subject", "cat")
    inversion, configs = captured["args"]
    assert inversion.prompt == "a photo of a cat"
    assert [config.prompt_edit for _, config in configs] == ["a photo of a cat as a pirate"]


def test_a_bare_train_builds_the_default_config(monkeypatch, tmp_path):
    import diffferv_cli.models.loading as components
    import diffferv_cli.training.loop as loop

    seen = {}

    def train(components, config, **kwargs):
        seen["config"] = config
        raise Stop("train")

    monkeypatch.setattr(components, "load_components", lambda *args, **kwargs: SimpleNamespace(is_random=False))
    monkeypatch.setattr(loop, "train", train)
    _stopped("train", "--faces", str(tmp_path / "faces"), "--out", str(tmp_path / "out"))
    assert seen["config"] == TrainConfig(faces=tmp_path / "faces", out=tmp_path / "out")


def test_a_bare_eval_builds_the_default_config(monkeypatch, tmp_path):
    import diffferv_cli.evaluation.report as report

    seen = {}

    def evaluate(original, edited, config, progress=None):
        seen["config"] = config
        raise Stop("eval")

    monkeypatch.setattr(report, "evaluate", evaluate)
    _stopped("eval", str(tmp_path / "a.mp4"), str(tmp_path / "b.mp4"))
    assert seen["config"] == EvalConfig()
