"""Several edits of one clip sampled together (editing/sampling.py, `edit_shared`): one UNet call per
window per step holds the source branch once plus each edit's own branches, and every edit equals its
own separate run -- exactly under the FakeNoise hook of test_sampling.py (the arithmetic), to float
tolerance with the real tiny UNet (injection on each edit's own schedule and token alignment)."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from test_sampling import (
    SOURCE,
    SPEC,
    STEPS,
    TIMESTEPS,
    FakeNoise,
    _alphas,
    _ddim,
    _inverted,
    _level,
    clip,
    hooked,
)

from diffferv_cli.config import EditConfig, InversionConfig
from diffferv_cli.editing.inversion import invert
from diffferv_cli.editing.sampling import edit, edit_groups, edit_many, edit_shared, shared_layout

__all__ = ["clip"]  # the module fixture, shared with test_sampling

OLD, BLOND = "a photo of an old person", "a photo of a blond person"
# three presets with their own taus: a plain edit, an exact edit, and a "reconstruction" (the source prompt)
PRESETS = [EditConfig(prompt_edit=OLD, tau_app=0.25, tau_motion=0.5, tau_cross=0.75, guidance=5.0),
           EditConfig(prompt_edit=BLOND, tau_app=1.0, tau_motion=0.0, tau_cross=0.25, guidance=3.0, exact=True),
           EditConfig(prompt_edit=SOURCE, tau_app=0.5, tau_motion=1.0, tau_cross=1.0, exact=True)]
FRAMES = SPEC.frames


class RowCounter:
    """Forward hook: the batch rows of every UNet call."""

    def __init__(self, unet):
        self.unet, self.rows = unet, []

    def __enter__(self):
        self.handle = self.unet.register_forward_hook(lambda module, args, output: self.rows.append(args[0].shape[0]))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _expected(tiny, entry, fake, config: EditConfig) -> torch.Tensor:
    """DDIM by hand: eps = neg + g (pos - neg) from the prompts' fixed patterns; with `exact`, the anchor
    (source prompt, fed z_{T-k}) corrects the step."""
    alphas = _alphas(tiny)
    negative = fake.pattern(SOURCE, entry.read_latent(0).shape[1:])
    guided = negative + config.guidance * (fake.pattern(config.prompt_edit, negative.shape) - negative)
    x = entry.read_latent(STEPS)
    for k, timestep in enumerate(TIMESTEPS):
        alpha_from, alpha_to = alphas[timestep], _level(alphas, timestep - 1000 // STEPS)
        x_next = _ddim(guided, x, alpha_from, alpha_to)
        if config.exact:
            on_path = _ddim(negative, entry.read_latent(STEPS - k), alpha_from, alpha_to)
            x_next = entry.read_latent(STEPS - 1 - k) + (x_next - on_path)
        x = x_next
    return x


def test_shared_edits_are_each_edits_own_arithmetic_exactly(tiny, clip, tmp_path):
    """Under the FakeNoise hook every latent is exact arithmetic: the shared run equals the three separate
    runs bit for bit, and the hand-written DDIM (a bug such as every edit taking the first edit's guidance,
    its anchor, or its latent would show here). One call per step of 1 + 2 + 3 + 1 = 7 branches."""
    entry, _ = _inverted(tiny, clip, tmp_path)
    fake = FakeNoise(tiny, [SOURCE, OLD, BLOND])
    with hooked(tiny.unet, fake):
        shared = edit_shared(tiny, entry, PRESETS, decode=False)
    assert [branches for _, _, branches in fake.calls] == [(
        "source", "negative.1", "positive.1", "anchor.2", "negative.2", "positive.2", "negative.3")] * STEPS
    with hooked(tiny.unet, fake):
        separate = [edit(tiny, entry, config, decode=False) for config in PRESETS]
    for config, together, alone in zip(PRESETS, shared, separate, strict=True):
        assert together.branches == alone.branches  # each edit's own layout, as it runs alone
        assert torch.equal(together.latents, alone.latents), config.prompt_edit
        expected = _expected(tiny, entry, fake, config)
        assert torch.allclose(together.latents, expected, rtol=1e-4, atol=1e-4), config.prompt_edit
    assert torch.equal(shared[2].latents, entry.read_latent(0))  # the reconstruction lands on z_0


def test_each_branch_is_fed_its_own_edits_latent(tiny, clip, tmp_path):
    """The source branch gets the inversion's z_s, each anchor z_{s+1}, each edit's negative and positive
    branches that edit's own x (after the first step the edits' paths part)."""
    entry, inversion = _inverted(tiny, clip, tmp_path)
    fed = {timestep: latents for timestep, latents, _ in inversion.calls}
    fake = FakeNoise(tiny, [SOURCE, OLD, BLOND])
    with hooked(tiny.unet, fake):
        edit_shared(tiny, entry, PRESETS, decode=False)
    for k, (timestep, latents, branches) in enumerate(fake.calls):
        rows = {name: latents[i * FRAMES:(i + 1) * FRAMES] for i, name in enumerate(branches)}
        assert torch.equal(rows["source"], fed[timestep])
        assert torch.equal(rows["anchor.2"], entry.read_latent(STEPS - k))
        for number in (1, 2):
            assert torch.equal(rows[f"negative.{number}"], rows[f"positive.{number}"])
        if k > 0:
            assert not torch.equal(rows["negative.1"], rows["negative.2"])
            assert torch.equal(rows["negative.3"], entry.read_latent(STEPS - k))  # the reconstruction's path


def test_shared_edits_equal_separate_runs_with_the_real_unet(tiny, clip, tmp_path):
    """The tiny UNet itself, injection on: each edit's branches take the source features on its own taus
    and word alignment. Tolerance: the rows of a 7-branch batch may round differently from a 3- or
    4-branch one, and edit 1's tau_cross makes every branch compute explicit cross-attention maps (in a
    separate run too, here). Measured on a 2-core x86_64 CPU: 0 here, 4e-5 for 8 frames x 10 steps
    (bench/bench_shared_source.py)."""
    entry = invert(tiny, clip, InversionConfig(steps=STEPS, flow_preset="ultrafast"), cache_dir=tmp_path).entry
    shared = edit_shared(tiny, entry, PRESETS, decode=False)
    separate = [edit(tiny, entry, config, decode=False) for config in PRESETS]
    for config, together, alone in zip(PRESETS, shared, separate, strict=True):
        torch.testing.assert_close(together.latents, alone.latents, rtol=1e-4, atol=1e-5, msg=config.prompt_edit)
    # the taus matter at this size: the same edit with another edit's schedule is far off
    swapped = edit(tiny, entry, PRESETS[0].model_copy(update=dict(tau_app=1.0, tau_motion=0.0, tau_cross=0.25)),
                   decode=False)
    assert not torch.allclose(swapped.latents, separate[0].latents, rtol=1e-4, atol=1e-3)
    assert torch.equal(shared[2].latents, entry.read_latent(0))  # --exact reconstruction: z_0 bit for bit


def test_a_reconstruction_in_a_shared_call_lands_on_z0_when_batch_rows_round_differently(tiny, clip, tmp_path):
    """The rule of sampling.py survives sharing: a reconstruction's negative branch is its own anchor, so
    a UNet whose rows are off by an amount that depends on their place in the batch still gives z_0."""
    entry, _ = _inverted(tiny, clip, tmp_path)

    def row_dependent(module, args, kwargs, output):
        offset = torch.arange(output.sample.shape[0], dtype=output.sample.dtype).view(-1, 1, 1, 1) * 1e-4
        return UNet2DConditionOutput(sample=output.sample + offset)

    handle = tiny.unet.register_forward_hook(row_dependent, with_kwargs=True)
    try:
        results = edit_shared(tiny, entry, PRESETS[::-1], decode=False)  # the reconstruction first this time
    finally:
        handle.remove()
    assert torch.equal(results[0].latents, entry.read_latent(0))


def test_rows_per_call_one_source_branch_for_every_edit_and_groups_under_a_small_bound(tiny, clip, tmp_path):
    """`-p old -p blond -p old-again`: 1 + 2 x 3 = 7 branches per call instead of 3 x 3; with at most 5
    branches of rows per call the edits split into (old, blond) and (old-again), each group with its own
    source branch, and the results stay each edit's own."""
    entry = invert(tiny, clip, InversionConfig(steps=STEPS, flow_preset="ultrafast"), cache_dir=tmp_path).entry
    plain = [EditConfig(prompt_edit=OLD), EditConfig(prompt_edit=BLOND), EditConfig(prompt_edit=OLD, guidance=2.0)]
    with RowCounter(tiny.unet) as together:
        shared = edit_many(tiny, entry, plain, decode=False)
    assert together.rows == [7 * FRAMES] * STEPS
    with RowCounter(tiny.unet) as apart:
        separate = [edit(tiny, entry, config, decode=False) for config in plain]
    assert apart.rows == [3 * FRAMES] * (3 * STEPS)
    with RowCounter(tiny.unet) as bounded:
        grouped = edit_many(tiny, entry, plain, decode=False, max_batch_rows=5 * FRAMES + 2)
    assert bounded.rows == [5 * FRAMES] * STEPS + [3 * FRAMES] * STEPS
    for one, two, alone in zip(shared, grouped, separate, strict=True):
        torch.testing.assert_close(one.latents, alone.latents, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(two.latents, alone.latents, rtol=1e-4, atol=1e-5)


def test_edit_groups_fill_in_order_within_the_bound():
    exact, plain, same = EditConfig(prompt_edit=OLD, exact=True), EditConfig(prompt_edit=OLD), EditConfig(prompt_edit=SOURCE)
    assert len(shared_layout([plain, exact, same], SOURCE, "recompute").branches) == 1 + 2 + 3 + 1
    assert len(shared_layout([plain, exact, same], SOURCE, "disk").branches) == 2 + 3 + 1  # no source branch
    groups = edit_groups([plain] * 4, SOURCE, "recompute", window_frames=8, max_batch_rows=7 * 8)
    assert groups == [[0, 1, 2], [3]]
    assert edit_groups([plain] * 4, SOURCE, "recompute", window_frames=8, max_batch_rows=7 * 8 - 1) == [[0, 1], [2, 3]]
    assert edit_groups([plain] * 4, SOURCE, "disk", window_frames=8, max_batch_rows=6 * 8) == [[0, 1, 2], [3]]
    # an edit bigger than the bound still runs, alone; a small one joins the next group
    assert edit_groups([exact, plain, same], SOURCE, "recompute", window_frames=8, max_batch_rows=3 * 8) == \
        [[0], [1], [2]]
    assert edit_groups([exact, same, plain], SOURCE, "recompute", window_frames=8, max_batch_rows=5 * 8) == \
        [[0, 1], [2]]


def test_disk_mode_feeds_every_edit_the_stored_features(tiny, clip, tmp_path):
    """`--features disk`: no source branch (2 + 3 + 1 branches per call); each edit equals its separate
    disk-mode run, and its recompute-mode run, to float tolerance."""
    entry = invert(tiny, clip, InversionConfig(steps=STEPS, flow_preset="ultrafast", feature_mode="disk"),
                   cache_dir=tmp_path).entry
    with RowCounter(tiny.unet) as counter:
        shared = edit_shared(tiny, entry, PRESETS, feature_mode="disk", decode=False)
    assert counter.rows == [6 * FRAMES] * STEPS
    for config, together in zip(PRESETS, shared, strict=True):
        alone = edit(tiny, entry, config, feature_mode="disk", decode=False)
        recomputed = edit(tiny, entry, config, feature_mode="recompute", decode=False)
        torch.testing.assert_close(together.latents, alone.latents, rtol=1e-4, atol=1e-5, msg=config.prompt_edit)
        torch.testing.assert_close(together.latents, recomputed.latents, rtol=1e-3, atol=1e-3, msg=config.prompt_edit)


@pytest.mark.parametrize("decode", [True, False])
def test_edit_many_returns_results_in_order_and_decodes_when_asked(tiny, clip, tmp_path, decode):
    entry, _ = _inverted(tiny, clip, tmp_path)
    fake = FakeNoise(tiny, [SOURCE, OLD, BLOND])
    with hooked(tiny.unet, fake):
        results = edit_many(tiny, entry, PRESETS, decode=decode, max_batch_rows=4 * FRAMES)  # 3 | 4 | 2 branches
    assert [len(branches) for _, _, branches in fake.calls] == [3] * STEPS + [4] * STEPS + [2] * STEPS
    assert [result.branches for result in results] == [("source", "negative", "positive"),
                                                        ("source", "anchor", "negative", "positive"),
                                                        ("source", "negative")]
    assert all((result.frames is not None) == decode for result in results)
