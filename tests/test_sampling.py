"""Inversion and edit sampling arithmetic, checked against DDIM written out by hand.

The tiny UNet runs as usual (processors, features, batching), but a forward hook replaces its noise
prediction by a fixed pattern per prompt, so every latent the loops produce has an exact expected value:
DDIM inversion with the source prompt's prediction; sampling with eps = neg + g * (pos - neg), where the
negative branch has the source prompt and the positive branch the edit prompt (paper 3.4)."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from diffferv_cli.config import DEFAULT_SOURCE_PROMPT, ClipSpec, EditConfig, InversionConfig, TemporalConfig
from diffferv_cli.editing.cache import CacheEntry, links_from_tensors
from diffferv_cli.editing.inversion import invert
from diffferv_cli.editing.prompts import encode_prompts
from diffferv_cli.editing.sampling import edit

STEPS = 4
TIMESTEPS = [751, 501, 251, 1]  # SD1.5's DDIM schedule for 4 steps (steps_offset 1), noisiest first
SPEC = ClipSpec(short_side=64, multiple=16, frames=3)
SOURCE = DEFAULT_SOURCE_PROMPT
EDIT = "a photo of an old person"


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from media import make_test_clip

    from diffferv_cli.video.io import read_clip

    path = make_test_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", width=96, height=64, frames=3, fps=24)
    return read_clip(path, SPEC)


class FakeNoise:
    """Forward hook: each row's prediction becomes the pattern of the prompt it was conditioned on (an
    unknown prompt fails the test). Records (timestep, latents, branches) of every call."""

    def __init__(self, components, prompts: list[str]):
        self.embeddings = dict(zip(prompts, encode_prompts(components, prompts), strict=True))
        self.prompts = prompts
        self.patterns: dict[str, torch.Tensor] = {}
        self.calls: list[tuple[int, torch.Tensor, tuple[str, ...]]] = []
        self.contexts: list = []  # the AttentionContext of every call

    def pattern(self, prompt: str, shape) -> torch.Tensor:
        if prompt not in self.patterns:
            generator = torch.Generator().manual_seed(self.prompts.index(prompt))
            self.patterns[prompt] = torch.randn(shape, generator=generator)  # (4, h, w)
        return self.patterns[prompt]

    def __call__(self, module, args, kwargs, output):
        latents = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        ctx = (kwargs.get("cross_attention_kwargs") or {}).get("ctx")
        self.calls.append((int(timestep), latents.detach().float().cpu().clone(), ctx.branches if ctx else ()))
        self.contexts.append(ctx)
        rows = []
        for row in kwargs["encoder_hidden_states"]:
            prompt = [p for p, e in self.embeddings.items() if torch.equal(row, e)]
            assert len(prompt) == 1, "the UNet was conditioned on a prompt that is neither source nor edit"
            rows.append(self.pattern(prompt[0], latents.shape[1:]))
        return UNet2DConditionOutput(sample=torch.stack(rows).to(output.sample.dtype))


class hooked:  # noqa: N801 - used as a context manager
    def __init__(self, unet, fake: FakeNoise):
        self.unet, self.fake = unet, fake

    def __enter__(self):
        self.handle = self.unet.register_forward_hook(self.fake, with_kwargs=True)
        return self.fake

    def __exit__(self, *exc):
        self.handle.remove()


def _alphas(components) -> torch.Tensor:
    config = components.scheduler_config
    betas = torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, config["num_train_timesteps"],
                           dtype=torch.float32) ** 2  # "scaled_linear"
    return torch.cumprod(1 - betas, dim=0)


def _ddim(eps, x, alpha_from, alpha_to):
    """One deterministic DDIM move (eta 0) from noise level alpha_from to alpha_to."""
    x0 = (x - (1 - alpha_from).sqrt() * eps) / alpha_from.sqrt()
    return alpha_to.sqrt() * x0 + (1 - alpha_to).sqrt() * eps


def _level(alphas, timestep):  # alpha-bar at a timestep; below 0 SD1.5 uses alpha-bar_0 (set_alpha_to_one False)
    return alphas[timestep] if timestep >= 0 else alphas[0]


def _inverted(tiny, clip, tmp_path, **config):
    fake = FakeNoise(tiny, [SOURCE, EDIT])
    with hooked(tiny.unet, fake):
        entry = invert(tiny, clip, InversionConfig(steps=STEPS, flow_preset="ultrafast", **config),
                       cache_dir=tmp_path).entry
    return entry, fake


def test_inversion_is_ddim_inversion_with_the_source_prompt(tiny, clip, tmp_path):
    entry, fake = _inverted(tiny, clip, tmp_path)
    alphas = _alphas(tiny)
    eps = fake.patterns[SOURCE]
    assert [t for t, _, _ in fake.calls] == TIMESTEPS[::-1]  # least noisy first
    z = entry.read_latent(0)
    for step, timestep in enumerate(TIMESTEPS[::-1]):
        assert torch.equal(fake.calls[step][1], z)  # the UNet saw z_step at this step
        z = _ddim(eps, z, _level(alphas, timestep - 1000 // STEPS), alphas[timestep])
        assert torch.allclose(entry.read_latent(step + 1), z, rtol=1e-5, atol=1e-5), step


def test_inversion_uses_the_prompt_it_is_given(tiny, clip, tmp_path):
    entry, fake = _inverted(tiny, clip, tmp_path, prompt=EDIT)
    assert set(fake.patterns) == {EDIT}
    alphas = _alphas(tiny)
    z1 = _ddim(fake.patterns[EDIT], entry.read_latent(0), alphas[0], alphas[1])
    assert torch.allclose(entry.read_latent(1), z1, rtol=1e-5, atol=1e-5)


def _expected_edit(tiny, entry, fake, guidance, *, positive=True, exact=False):
    alphas = _alphas(tiny)
    negative = fake.pattern(SOURCE, entry.read_latent(0).shape[1:])
    guided = negative
    if positive:
        guided = negative + guidance * (fake.pattern(EDIT, negative.shape) - negative)
    x = entry.read_latent(STEPS)
    for k, timestep in enumerate(TIMESTEPS):
        alpha_from, alpha_to = alphas[timestep], _level(alphas, timestep - 1000 // STEPS)
        x_next = _ddim(guided, x, alpha_from, alpha_to)
        if exact:  # the anchor branch: source prompt, fed the cached z_{T-k}
            on_path = _ddim(negative, entry.read_latent(STEPS - k), alpha_from, alpha_to)
            x_next = entry.read_latent(STEPS - 1 - k) + (x_next - on_path)
        x = x_next
    return x


@pytest.mark.parametrize("guidance", [0.0, 1.0, 5.0])
def test_edit_is_ddim_with_classifier_free_guidance(tiny, clip, tmp_path, guidance):
    """g = 0 follows the source prompt, g = 1 the edit prompt, g = 5 extrapolates away from the source."""
    entry, _ = _inverted(tiny, clip, tmp_path)
    fake = FakeNoise(tiny, [SOURCE, EDIT])
    with hooked(tiny.unet, fake):
        result = edit(tiny, entry, EditConfig(prompt_edit=EDIT, guidance=guidance))
    assert [t for t, _, _ in fake.calls] == TIMESTEPS
    expected = _expected_edit(tiny, entry, fake, guidance)
    assert torch.allclose(result.latents, expected, rtol=1e-4, atol=1e-4), (result.latents - expected).abs().max()


def test_edit_with_the_source_prompt_runs_the_negative_branch_alone(tiny, clip, tmp_path):
    entry, _ = _inverted(tiny, clip, tmp_path)
    fake = FakeNoise(tiny, [SOURCE, EDIT])
    with hooked(tiny.unet, fake):
        result = edit(tiny, entry, EditConfig(prompt_edit=SOURCE, guidance=5.0, inject=False))
    assert result.branches == ("negative",)
    assert all(latents.shape[0] == SPEC.frames for _, latents, _ in fake.calls)  # one branch of 3 frames
    expected = _expected_edit(tiny, entry, fake, 5.0, positive=False)
    assert torch.allclose(result.latents, expected, rtol=1e-4, atol=1e-4)


def test_exact_edit_follows_the_inversion_path_correction(tiny, clip, tmp_path, monkeypatch):
    entry, _ = _inverted(tiny, clip, tmp_path)
    entry = CacheEntry(entry.folder, entry.manifest)  # as a later run opens it: no file hash-checked yet
    fake = FakeNoise(tiny, [SOURCE, EDIT])
    reads = _recorded_reads(monkeypatch)
    with hooked(tiny.unet, fake):
        result = edit(tiny, entry, EditConfig(prompt_edit=EDIT, guidance=5.0, exact=True))
    # z_T, then per step the anchor's z_{s+1} (read already) and the correction's z_s: each read once
    assert reads == list(range(STEPS, -1, -1))
    expected = _expected_edit(tiny, entry, fake, 5.0, exact=True)
    assert torch.allclose(result.latents, expected, rtol=1e-4, atol=1e-4)


def test_exact_reconstruction_lands_on_z0_bit_for_bit_when_batch_rows_round_differently(tiny, clip, tmp_path):
    """Kernels need not give two rows of one batch the same bits for the same input (MKL's AVX2 GEMM does
    not): a UNet whose every row is off by a tiny amount that depends on its place in the batch must still
    reconstruct z_0 exactly with --exact and the source prompt, because no second branch is compared with
    the negative one. A reconstruction runs one branch fewer than an exact edit."""
    entry, _ = _inverted(tiny, clip, tmp_path)
    batches: list[int] = []

    def row_dependent(module, args, kwargs, output):
        rows = output.sample.shape[0]
        batches.append(rows)
        offset = torch.arange(rows, dtype=output.sample.dtype).view(-1, 1, 1, 1) * 1e-4
        return UNet2DConditionOutput(sample=output.sample + offset)

    handle = tiny.unet.register_forward_hook(row_dependent, with_kwargs=True)
    try:
        result = edit(tiny, entry, EditConfig(prompt_edit=SOURCE, exact=True), decode=False)
    finally:
        handle.remove()
    assert result.branches == ("source", "negative")
    assert set(batches) == {2 * SPEC.frames}
    assert torch.equal(result.latents, entry.read_latent(0))

def test_edit_injects_on_the_configured_schedule_into_every_branch_but_the_source(tiny, clip, tmp_path, monkeypatch):
    """Each tau reaches its own feature kind, and the source branch (which gives the features in recompute
    mode) is no injection target."""
    import diffferv_cli.editing.sampling as sampling
    from diffferv_cli.editing.features import InjectionSchedule

    entry, _ = _inverted(tiny, clip, tmp_path)
    made = []
    real = sampling.FeatureInjector

    def recording(schedule, branches, targets, token_maps, **options):
        made.append((schedule, branches, targets, tuple(token_maps), options["source_branch"]))
        return real(schedule, branches, targets, token_maps, **options)

    monkeypatch.setattr(sampling, "FeatureInjector", recording)
    result = edit(tiny, entry, EditConfig(prompt_edit=EDIT, tau_app=0.25, tau_motion=0.5, tau_cross=0.75))
    targets = tuple(name for name in result.branches if name != "source")
    assert "source" in result.branches and len(targets) == len(result.branches) - 1
    schedule = InjectionSchedule(STEPS, 0.25, 0.5, 0.75)
    assert made == [({name: schedule for name in targets}, result.branches, targets, targets, "source")]


def test_source_branch_sees_what_the_inversion_fed_the_unet_at_each_timestep(tiny, clip, tmp_path):
    """Recompute mode regenerates the inversion's features only if the source branch gets exactly the
    inversion's input at the same timestep; the other branches get the edit latent."""
    entry, inversion = _inverted(tiny, clip, tmp_path)
    fed = {timestep: latents for timestep, latents, _ in inversion.calls}
    fake = FakeNoise(tiny, [SOURCE, EDIT])
    with hooked(tiny.unet, fake):
        edit(tiny, entry, EditConfig(prompt_edit=EDIT, tau_app=0.5))
    frames = SPEC.frames
    x = entry.read_latent(STEPS)
    for timestep, latents, branches in fake.calls:
        assert branches == ("source", "negative", "positive")
        rows = {name: latents[i * frames:(i + 1) * frames] for i, name in enumerate(branches)}
        assert torch.equal(rows["source"], fed[timestep]), timestep
        assert torch.equal(rows["negative"], rows["positive"])
        if timestep == TIMESTEPS[0]:
            assert torch.equal(rows["negative"], x)  # sampling starts from z_T


# Bookkeeping: the request, the manifest, progress, refusals ---------------------------------------------


def _recorded_progress():
    calls: list[tuple[str, int, int]] = []
    return calls, lambda stage, done, total: calls.append((stage, done, total))


@pytest.mark.parametrize("tta, swcfa", [(True, True), (False, False)])
def test_every_pass_attends_along_the_clip_trajectories_cut_to_its_window(tiny, clip, tmp_path, tta, swcfa):
    """Inversion and edit hand each window's UNet pass the clip's trajectories cut to that window (TTA),
    and none when TTA is off; the SWCFA settings are the request's."""
    entry, fake = _inverted(tiny, clip, tmp_path, window_frames=2, window_overlap=1,
                            temporal=TemporalConfig(window=1, swcfa=swcfa, tta=tta))  # SWCFA window 1: 2-frame windows
    with hooked(tiny.unet, fake):
        edit(tiny, entry, EditConfig(prompt_edit=EDIT))
    links = links_from_tensors(entry.read_trajectories(), len(clip.frames))
    windows = [links.window(0, 2), links.window(1, 3)]  # the two windows of 3 frames, in the order they run
    assert len(fake.contexts) == 2 * 2 * STEPS  # inversion and edit, two windows per step
    for number, ctx in enumerate(fake.contexts):
        assert (ctx.frames, ctx.window, ctx.swcfa, ctx.tta) == (2, 1, swcfa, tta)
        if not tta:
            assert ctx.trajectories is None
            continue
        expected = windows[number % 2]
        assert ctx.trajectories.grids.keys() == expected.grids.keys()
        for key, grid in expected.grids.items():
            assert torch.equal(ctx.trajectories.grids[key].index, grid.index)


@pytest.mark.parametrize("compile_unet", [True, False])
def test_compile_unet_runs_both_loops_through_torch_compile(tiny, clip, tmp_path, monkeypatch, compile_unet):
    compiled = []

    def recording_compile(model, **options):
        compiled.append((model, options))
        return model

    monkeypatch.setattr(torch, "compile", recording_compile)
    entry = invert(tiny, clip, InversionConfig(steps=1, flow_preset="ultrafast"), cache_dir=tmp_path,
                   compile_unet=compile_unet).entry
    edit(tiny, entry, EditConfig(prompt_edit=EDIT), decode=False, compile_unet=compile_unet)
    assert compiled == ([(tiny.unet, {"dynamic": False})] * 2 if compile_unet else [])


def test_inversion_computes_the_flow_with_the_configured_preset(tiny, clip, tmp_path, monkeypatch):
    import diffferv_cli.temporal.flow as flow

    presets = []

    class RecordingFlow(flow.DISFlow):
        def __init__(self, preset="medium"):
            presets.append(preset)
            super().__init__(preset)

    monkeypatch.setattr(flow, "DISFlow", RecordingFlow)
    invert(tiny, clip, InversionConfig(steps=1, flow_preset="fast"), cache_dir=tmp_path)
    assert presets == ["fast"]


def test_inversion_records_its_request_manifest_and_progress(tiny, clip, tmp_path):
    from diffferv_cli.editing.cache import frames_sha256
    from diffferv_cli.editing.inversion import latent_size

    calls, progress = _recorded_progress()
    config = InversionConfig(steps=STEPS, flow_preset="ultrafast")
    outcome = invert(tiny, clip, config, cache_dir=tmp_path, progress=progress)
    manifest = outcome.entry.manifest
    assert outcome.steps_run == STEPS
    assert manifest["request"] == {
        "frames_sha256": frames_sha256(clip.frames),
        "selection": {"start": 0, "frames": 3, "stride": 1, "indices": [0, 1, 2]},
        "working_size": [96, 64], "model": tiny.fingerprint, "unet_dtype": "float32", "prompt": SOURCE,
        "steps": STEPS, "temporal": {"window": 3, "swcfa": True, "tta": True}, "flow": "ultrafast",
        "windows": [[0, 3]]}
    assert latent_size(clip, tiny) == (64 // tiny.vae_scale_factor, 96 // tiny.vae_scale_factor)
    assert (manifest["frames"], manifest["latent_size"]) == (3, list(latent_size(clip, tiny)))
    assert manifest["geometry"] == {"source_size": [96, 64], "working_size": [96, 64], "scaled_size": [96, 64],
                                    "crop": [0, 0, 0, 0], "region": None}
    assert manifest["source"] == {"path": str(clip.info.path)}
    assert (manifest["encoded"], manifest["finished_steps"], manifest["feature_steps"], manifest["features_stored"]) \
        == (True, STEPS, 0, False)
    assert manifest["timesteps"] == TIMESTEPS[::-1]
    assert [call for call in calls if call[0] == "flow"] == [("flow", 1, 2), ("flow", 2, 2)]
    assert [call for call in calls if call[0] == "encode"] == [("encode", 3, 3)]
    stage = f"invert: {STEPS} steps × 1 window"
    assert [call for call in calls if call[0].startswith("invert")] == [(stage, 3 * k, 3 * STEPS) for k in range(STEPS + 1)]
    again_calls, again = _recorded_progress()
    assert invert(tiny, clip, config, cache_dir=tmp_path, progress=again).steps_run == 0 and again_calls == []


def _recorded_reads(monkeypatch) -> list[int]:
    """The cached latents (by index) whose file is read and hash-checked from now on, in order: each once
    per run, however many windows then read a range of it."""
    import diffferv_cli.editing.cache as cache

    reads, digest = [], cache.file_sha256

    def recording(path):
        if path.parent.name == "latents" and path.name.startswith("step-"):
            reads.append(int(path.stem.removeprefix("step-")))
        return digest(path)

    monkeypatch.setattr(cache, "file_sha256", recording)
    return reads


def test_disk_mode_adds_features_to_a_finished_entry_without_changing_its_latents(tiny, clip, tmp_path, monkeypatch):
    config = InversionConfig(steps=STEPS, flow_preset="ultrafast")
    entry = invert(tiny, clip, config, cache_dir=tmp_path).entry
    latents = [entry.read_latent(index) for index in range(STEPS + 1)]
    calls, progress = _recorded_progress()
    disk = InversionConfig(steps=STEPS, flow_preset="ultrafast", feature_mode="disk")
    reads = _recorded_reads(monkeypatch)
    outcome = invert(tiny, clip, disk, cache_dir=tmp_path, progress=progress)
    assert reads == list(range(STEPS))  # the cached path, each latent read once (z_T is not needed)
    entry = outcome.entry
    assert outcome.steps_run == STEPS and entry.folder == invert(tiny, clip, config, cache_dir=tmp_path).entry.folder
    assert (entry.manifest["feature_steps"], entry.manifest["features_stored"], entry.has_features) == (STEPS, True, True)
    assert all(torch.equal(entry.read_latent(index), latents[index]) for index in range(STEPS + 1))
    features = [entry.read_features(step) for step in range(STEPS)]
    assert all(set(step) == set(features[0]) and step for step in features)
    assert all(name.endswith((":app.q", ":app.k", ":motion.q", ":cross")) for name in features[0])
    assert {call[0] for call in calls} == {f"invert: {STEPS} steps × 1 window"}  # no flow, no encoding again
    assert invert(tiny, clip, disk, cache_dir=tmp_path).steps_run == 0


@pytest.mark.parametrize("feature_mode", ["recompute", "disk"])
def test_an_interrupted_inversion_resumes_from_its_last_step(tiny, clip, tmp_path, monkeypatch, feature_mode):
    config = InversionConfig(steps=STEPS, flow_preset="ultrafast", feature_mode=feature_mode)
    entry = invert(tiny, clip, config, cache_dir=tmp_path).entry
    latents = [entry.read_latent(index) for index in range(STEPS + 1)]
    entry.manifest["finished_steps"] = 2  # as if killed after step 2
    if feature_mode == "disk":
        entry.manifest.update(feature_steps=2, features_stored=False)
    entry.save_manifest()
    calls, progress = _recorded_progress()
    reads = _recorded_reads(monkeypatch)
    outcome = invert(tiny, clip, config, cache_dir=tmp_path, progress=progress)
    assert reads == [2]  # z_2, where the run goes on from
    assert outcome.steps_run == 2 and outcome.entry.finished_steps == STEPS
    assert all(torch.equal(outcome.entry.read_latent(index), latents[index]) for index in range(STEPS + 1))
    stage = "invert: 2 steps × 1 window (from step 2)"
    assert [call for call in calls if call[0].startswith("invert")] == [(stage, 0, 6), (stage, 3, 6), (stage, 6, 6)]


def test_a_region_enters_the_request_only_when_set(tiny, clip):
    from dataclasses import replace

    from diffferv_cli.editing.inversion import cache_request

    config = InversionConfig(steps=STEPS)
    assert "region" not in cache_request(clip, tiny, config)
    framed = replace(clip, spec=clip.spec.model_copy(update={"region": (8, 4, 32, 24)}))
    assert cache_request(framed, tiny, config)["region"] == [8, 4, 32, 24]


@pytest.mark.parametrize("changes, mode, branches", [
    ({}, "recompute", ("source", "negative", "positive")),
    ({"exact": True}, "recompute", ("source", "anchor", "negative", "positive")),
    ({"exact": True, "prompt_edit": SOURCE}, "recompute", ("source", "negative")),
    ({"exact": True, "prompt_edit": SOURCE, "inject": False}, "disk", ("negative",)),
    ({}, "disk", ("negative", "positive")),
    ({"inject": False}, "recompute", ("negative", "positive")),
    ({"inject": False, "exact": True}, "disk", ("anchor", "negative", "positive")),
    ({"prompt_edit": SOURCE}, "recompute", ("source", "negative")),
])
def test_branch_layout(changes, mode, branches):
    from diffferv_cli.editing.sampling import branch_layout

    assert branch_layout(EditConfig(**{"prompt_edit": EDIT, **changes}), SOURCE, mode) == branches


def test_edit_refuses_unfinished_featureless_and_retimed_entries(tiny, clip, tmp_path):
    from diffferv_cli.errors import UserError

    entry, _ = _inverted(tiny, clip, tmp_path)
    config = EditConfig(prompt_edit=EDIT)
    entry.manifest["finished_steps"] = STEPS - 1
    with pytest.raises(UserError) as error:
        edit(tiny, entry, config)
    assert str(error.value) == f"The inversion in {entry.folder} is unfinished; run `diffferv invert` again to resume it."
    entry.manifest["finished_steps"] = STEPS
    with pytest.raises(UserError) as error:
        edit(tiny, entry, config, feature_mode="disk")
    assert str(error.value) == "This inversion was cached without features; run `diffferv invert --features disk` first."
    entry.manifest["timesteps"] = [t + 1 for t in entry.manifest["timesteps"]]
    with pytest.raises(UserError) as error:
        edit(tiny, entry, config)
    assert str(error.value) == f"The cache at {entry.folder} was inverted with other timesteps; rerun with --force."


def test_edit_reports_progress_and_decodes_only_when_asked(tiny, clip, tmp_path):
    entry, _ = _inverted(tiny, clip, tmp_path)
    calls, progress = _recorded_progress()
    config = EditConfig(prompt_edit=EDIT)
    result = edit(tiny, entry, config, progress=progress, decode=False)
    assert result.frames is None and result.branches == ("source", "negative", "positive")
    stage = f"edit: {STEPS} steps × 1 window"
    assert calls == [(stage, 3 * k, 3 * STEPS) for k in range(STEPS + 1)]
    decoded_calls, decoded_progress = _recorded_progress()
    decoded = edit(tiny, entry, config, progress=decoded_progress)
    assert torch.equal(decoded.latents, result.latents) and decoded.frames.shape == (3, 64, 96, 3)
    assert decoded_calls == calls + [("decode", 3, 3)]
