"""Temporal attention processors: equality with slow references, stock behaviour, isolation, controls."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from reference_attention import (
    ReferenceCrossAttention,
    ReferenceSelfAttention,
    grid_from_trajectories,
    naive_full_cross_frame,
    naive_swcfa,
    naive_tta,
    random_partition,
    static_partition,
    trajectory_set,
    translating_partition,
)

from diffferv_cli.temporal import (
    AttentionContext,
    CrossAttention,
    TemporalSelfAttention,
    attention_layers,
    sliding_window_attention,
    temporal_attention,
    trajectory_attention,
    window_bounds,
)
from diffferv_cli.temporal.trajectories import TrajectoryGrid, TrajectorySet

LATENT = (8, 12)  # non-square: token grids (8, 12) and (4, 6) in the tiny UNet
TOL = dict(atol=1e-5, rtol=1e-5)


def _token_major(x):
    """(branches, frames, heads, tokens, d) -> (branches, frames, tokens, heads, d), the processors' layout."""
    return x.transpose(2, 3)


def _random_qkv(branches=2, frames=4, heads=2, tokens=12, head_dim=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(branches, frames, heads, tokens, head_dim, generator=generator) for _ in range(3)]


def _inputs(frames: int, branches: int = 2, seed: int = 0, latent=LATENT):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(branches * frames, 4, *latent, generator=generator)
    text = torch.randn(branches * frames, 7, 32, generator=generator)
    return latents, text


def _context(frames: int, branches: int = 2, seed: int = 0, **changes) -> AttentionContext:
    generator = torch.Generator().manual_seed(seed)
    trajectories = trajectory_set(LATENT, 2, frames, lambda h, w, f: random_partition(h, w, f, generator))
    names = ("source", "negative", "positive")[:branches]
    return AttentionContext(frames=frames, branches=names, latent_size=LATENT, trajectories=trajectories, **changes)


@torch.no_grad()
def _unet(unet, latents, text, ctx=None, **kwargs):
    kwargs = {"cross_attention_kwargs": {"ctx": ctx}} if ctx is not None else {}
    return unet(latents, 10, text, **kwargs).sample


@torch.no_grad()
def _temporal_unet(unet, latents, text, ctx):
    with temporal_attention(unet):
        return _unet(unet, latents, text, ctx)


@torch.no_grad()
def _reference_unet(unet, latents, text, ctx):
    originals = dict(unet.attn_processors)
    reference = {
        path: (ReferenceSelfAttention if kind == "self" else ReferenceCrossAttention)(path.removesuffix(".processor"))
        for path, kind in attention_layers(unet).items()
    }
    unet.set_attn_processor(reference)
    try:
        return _unet(unet, latents, text, ctx)
    finally:
        unet.set_attn_processor(originals)


# --------------------------------------------------------------------------------------------------
# kernels against the naive references
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "frames, window", [(1, 3), (2, 3), (4, 1), (4, 2), (5, 3), (5, 4), (6, 5), (3, 7), (8, 3), (4, 5), (5, 7), (9, 7)]
)
@pytest.mark.parametrize("branches", [1, 3])
def test_sliding_window_equals_naive(frames, window, branches):
    """Every branch count and window/clip shape: interior runs straddling two branches must be overwritten
    by the edge frames' own windows, and short clips (every frame clamped) grouped correctly."""
    query, key, value = _random_qkv(branches=branches, frames=frames)
    scale = 0.3  # not SDPA's default head_dim ** -0.5 (0.5 here): the scale must be passed on
    fast = sliding_window_attention(*map(_token_major, (query, key, value)), window, scale)
    torch.testing.assert_close(_token_major(fast), naive_swcfa(query, key, value, window, scale), **TOL)


def test_edge_groups_cover_exactly_the_clamped_frames_with_their_windows():
    """Every clip length and window: the groups' slices list exactly the frames whose window is clamped,
    each once, with that frame's own window, and all frames of a group have one window length."""
    from diffferv_cli.temporal.processors import _edge_groups

    for frames in range(2, 30):
        for window in range(2, 12):
            span = 2 * (window // 2) + 1
            clamped = [f for f in range(frames) if window_bounds(f, frames, window)[1] - window_bounds(f, frames, window)[0] + 1 < span]
            seen = []
            for frames_slice, windows in _edge_groups(frames, window):
                members = list(range(frames))[frames_slice]
                assert len(members) == len(windows) and len({high - low for low, high in windows}) == 1
                for frame, (low, high) in zip(members, windows, strict=True):
                    assert (low, high - 1) == window_bounds(frame, frames, window)
                seen += members
            assert sorted(seen) == clamped == sorted(set(seen)), (frames, window)


@pytest.mark.parametrize("frames", [1, 3, 5])
def test_wide_window_is_full_cross_frame_attention(frames):
    query, key, value = _random_qkv(frames=frames)
    fast = sliding_window_attention(*map(_token_major, (query, key, value)), 2 * frames, 0.3)
    torch.testing.assert_close(_token_major(fast), naive_full_cross_frame(query, key, value, 0.3), **TOL)


@pytest.mark.parametrize("grid_shape", [(8, 12), (4, 6), (3, 5)])
@pytest.mark.parametrize("frames, link_probability", [(1, 0.7), (4, 0.0), (4, 0.6), (6, 1.0)])
def test_trajectory_attention_equals_naive(grid_shape, frames, link_probability):
    height, width = grid_shape
    grid = random_partition(height, width, frames, torch.Generator().manual_seed(frames), link_probability)
    query, key, value = _random_qkv(frames=frames, tokens=height * width)
    clip = lambda x: _token_major(x).reshape(2, frames * height * width, 2, 4)  # noqa: E731
    fast = trajectory_attention(clip(query), clip(key), clip(value), grid, 0.3)  # not SDPA's default 0.5
    expected = naive_tta(query, key, value, grid, 0.3)
    torch.testing.assert_close(fast, clip(expected), **TOL)


def test_trajectory_attention_with_padded_buckets_three_branches_and_three_heads():
    """Buckets holding trajectories of several lengths (padded, masked) with the mask repeated per branch,
    an odd head count, and the shared Q = K = V gathered once per bucket (same result as three tensors)."""
    from torch.overrides import TorchFunctionMode

    from diffferv_cli.temporal.plan import GridPlan

    frames, height, width, branches, heads = 9, 4, 6, 3, 3
    grid = random_partition(height, width, frames, torch.Generator().manual_seed(1), 0.7)
    plan = GridPlan.build(grid)
    assert any(bucket.mask is not None for bucket in plan.buckets)
    query, key, value = _random_qkv(branches=branches, frames=frames, heads=heads, tokens=height * width)
    clip = lambda x: _token_major(x).reshape(branches, frames * height * width, heads, 4)  # noqa: E731
    torch.testing.assert_close(trajectory_attention(clip(query), clip(key), clip(value), plan, 0.3),
                               clip(naive_tta(query, key, value, grid, 0.3)), **TOL)

    class Gathers(TorchFunctionMode):
        count = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Gathers.count += func is torch.Tensor.index_select
            return func(*args, **(kwargs or {}))

    h = clip(value)
    with Gathers():
        shared = trajectory_attention(h, h, h, plan, 0.3)
    assert Gathers.count == len(plan.buckets) + 2  # one per bucket, the singletons, the inverse order
    torch.testing.assert_close(shared, clip(naive_tta(value, value, value, grid, 0.3)), **TOL)
    separate = trajectory_attention(h, h.clone(), h.clone(), plan, 0.3)
    torch.testing.assert_close(shared, separate, **TOL)


def test_a_trajectory_grid_is_planned_on_the_device_of_the_query(monkeypatch):
    from diffferv_cli.temporal.plan import GridPlan

    devices = []
    build = GridPlan.build

    def recording(grid, device):
        devices.append(device)
        return build(grid, device)

    monkeypatch.setattr(GridPlan, "build", staticmethod(recording))
    grid = random_partition(4, 6, 3, torch.Generator().manual_seed(0), 0.6)
    query, key, value = (x.reshape(2, 3 * 24, 2, 4) for x in _random_qkv(frames=3, tokens=24))
    trajectory_attention(query, key, value, grid, 0.3)
    assert devices == [query.device]


def test_trajectory_partitions_are_varied():
    """The random partitions used above really hold singletons, short and full-length rows."""
    lengths = random_partition(8, 12, 6, torch.Generator().manual_seed(6), 0.6).lengths
    assert lengths.max() == 6 and (lengths == 1).any() and ((lengths > 1) & (lengths < 6)).any()


def test_trajectory_attention_on_static_and_translating_partitions():
    for grid in (static_partition(4, 6, 5), translating_partition(4, 6, 5, (0.5, -0.75))):
        query, key, value = _random_qkv(frames=5, tokens=24)
        clip = lambda x: _token_major(x).reshape(2, 5 * 24, 2, 4)  # noqa: E731
        fast = trajectory_attention(clip(query), clip(key), clip(value), grid, 0.5)
        torch.testing.assert_close(fast, clip(naive_tta(query, key, value, grid, 0.5)), **TOL)


# --------------------------------------------------------------------------------------------------
# whole tiny UNet
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "frames, changes",
    [(3, dict(window=3)), (4, dict(window=2)), (4, dict(window=3, swcfa=False)), (3, dict(window=5, tta=False)),
     (1, dict(window=3))],
)
def test_unet_equals_reference(tiny, frames, changes):
    latents, text = _inputs(frames)
    ctx = _context(frames, **changes)
    torch.testing.assert_close(
        _temporal_unet(tiny.unet, latents, text, ctx), _reference_unet(tiny.unet, latents, text, ctx), **TOL
    )


def test_window_one_without_tta_is_the_stock_unet(tiny):
    latents, text = _inputs(3)
    stock = _unet(tiny.unet, latents, text)
    per_frame = _temporal_unet(tiny.unet, latents, text, _context(3, window=1, tta=False))
    torch.testing.assert_close(per_frame, stock, **TOL)
    with temporal_attention(tiny.unet):
        no_context = _unet(tiny.unet, latents, text)
    torch.testing.assert_close(no_context, stock, **TOL)


def test_temporal_attention_changes_the_output(tiny):
    latents, text = _inputs(3)
    stock = _unet(tiny.unet, latents, text)
    swcfa = _temporal_unet(tiny.unet, latents, text, _context(3, tta=False))
    both = _temporal_unet(tiny.unet, latents, text, _context(3))
    assert not torch.allclose(swcfa, stock, atol=1e-4) and not torch.allclose(both, swcfa, atol=1e-4)


def test_single_frame_and_single_branch(tiny):
    latents, text = _inputs(1, branches=1)
    output = _temporal_unet(tiny.unet, latents, text, _context(1, branches=1))
    assert output.shape == latents.shape and torch.isfinite(output).all()


def test_grid_without_trajectories_skips_tta(tiny):
    latents, text = _inputs(3)
    ctx = _context(3)
    only_fine = TrajectorySet({LATENT: ctx.trajectories.for_grid(*LATENT)})
    partial = _temporal_unet(tiny.unet, latents, text, ctx.at_step(0, 0, trajectories=only_fine))
    torch.testing.assert_close(partial, _reference_unet(tiny.unet, latents, text, ctx.at_step(0, 0, trajectories=only_fine)), **TOL)


def test_branches_never_mix(tiny):
    ctx = _context(3, control=_MapsControl(override=False))
    latents, text = _inputs(3)
    other_latents, other_text = latents.clone(), text.clone()
    other_latents[3:] = torch.randn_like(other_latents[3:])  # branch 1 = rows 3..5
    other_text[3:] = torch.randn_like(other_text[3:])
    first = _temporal_unet(tiny.unet, latents, text, ctx)
    second = _temporal_unet(tiny.unet, other_latents, other_text, ctx)
    assert torch.equal(first[:3], second[:3])
    assert not torch.allclose(first[3:], second[3:])


# --------------------------------------------------------------------------------------------------
# feature controls
# --------------------------------------------------------------------------------------------------

class _Recorder:
    def __init__(self):
        self.calls = []
        self.shared = []  # (kind, whether Q and K came as one tensor) per self-attention call
        self.contexts = []

    def self_attention(self, ctx, layer, kind, query, key):
        self.calls.append((layer, kind, tuple(query.shape), tuple(key.shape)))
        self.shared.append((kind, key is query))
        self.contexts.append(ctx)
        return query, key

    def wants_cross_maps(self, ctx, layer):
        return True

    def cross_attention(self, ctx, layer, probs):
        self.calls.append((layer, "cross", tuple(probs.shape), None))
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
        return probs


class _BranchZeroQueryKey:
    """Every branch gets branch 0's Q,K of the given kind (values untouched)."""

    def __init__(self, kind):
        self.kind = kind

    def self_attention(self, ctx, layer, kind, query, key):
        if kind != self.kind:
            return query, key
        return query[:1].expand_as(query).clone(), key[:1].expand_as(key).clone()

    def wants_cross_maps(self, ctx, layer):
        return False

    def cross_attention(self, ctx, layer, probs):
        raise AssertionError("not asked for")


class _MapsControl:
    """Explicit cross-attention maps; with `override`, branch 0's maps replace branch 1's."""

    def __init__(self, override):
        self.override = override

    def self_attention(self, ctx, layer, kind, query, key):
        return query, key

    def wants_cross_maps(self, ctx, layer):
        return True

    def cross_attention(self, ctx, layer, probs):
        return probs[:1].expand_as(probs).clone() if self.override else probs


def test_recording_control_sees_documented_shapes(tiny, caplog):
    frames, recorder = 3, _Recorder()
    latents, text = _inputs(frames)
    ctx = _context(frames, control=recorder)
    with caplog.at_level(logging.WARNING):
        _temporal_unet(tiny.unet, latents, text, ctx)
    assert all(seen is ctx for seen in recorder.contexts)
    # the motion features are one tensor (Q_TTA = K_TTA = h), handed over as one: recorders store it once
    assert sorted(set(recorder.shared)) == [("app", False), ("motion", True)]
    assert "not expected" not in caplog.text  # diffusers passed ctx to every processor
    expected = []
    for path, kind in attention_layers(tiny.unet).items():
        layer = path.removesuffix(".processor")
        attn = tiny.unet.get_submodule(layer)
        tokens = 96 if layer.startswith(("down_blocks.0", "up_blocks.1")) else 24
        head_dim = attn.to_q.out_features // attn.heads
        qk = (2, frames, attn.heads, tokens, head_dim)
        if kind == "self":
            expected += [(layer, "app", qk, qk), (layer, "motion", qk, qk)]
        else:
            expected += [(layer, "cross", (2, frames, attn.heads, tokens, 7), None)]
    assert sorted(recorder.calls) == sorted(expected)


@pytest.mark.parametrize("kind", ["app", "motion"])
def test_overriding_query_key_changes_only_other_branches(tiny, kind):
    latents, text = _inputs(3)
    plain = _temporal_unet(tiny.unet, latents, text, _context(3))
    overridden = _temporal_unet(tiny.unet, latents, text, _context(3, control=_BranchZeroQueryKey(kind)))
    assert torch.equal(overridden[:3], plain[:3])
    assert (overridden[3:] - plain[3:]).abs().max() > 1e-6  # TTA's share of the output is small
    reference = _reference_unet(tiny.unet, latents, text, _context(3, control=_BranchZeroQueryKey(kind)))
    torch.testing.assert_close(overridden, reference, **TOL)


class _OwnKeys:
    """Q stays, K is replaced by the previous frame's K (of the same branch): Q and K differ afterwards."""

    def __init__(self, kind):
        self.kind = kind

    def self_attention(self, ctx, layer, kind, query, key):
        return (query, key.roll(1, dims=1).clone()) if kind == self.kind else (query, key)

    def wants_cross_maps(self, ctx, layer):
        return False


@pytest.mark.parametrize("kind", ["app", "motion"])
def test_a_key_replaced_on_its_own_is_used_as_the_key(tiny, kind):
    """For TTA, Q = K = h: a control that replaces K only must not have its K replaced by Q again."""
    latents, text = _inputs(3)
    ctx = _context(3, control=_OwnKeys(kind))
    replaced = _temporal_unet(tiny.unet, latents, text, ctx)
    assert (replaced - _temporal_unet(tiny.unet, latents, text, _context(3))).abs().max() > 1e-6
    torch.testing.assert_close(replaced, _reference_unet(tiny.unet, latents, text, ctx), **TOL)


def test_every_attention_uses_the_layers_own_scale(tiny):
    """A self-attention layer whose scale is not SDPA's default head_dim ** -0.5 (diffusers'
    `scale_qk=False`) keeps it in SWCFA, its edge frames, per-frame attention and TTA."""
    import copy

    unet = copy.deepcopy(tiny.unet)
    for path, kind in attention_layers(unet).items():
        if kind == "self":  # (diffusers' stock cross-attention leaves the scale to SDPA's default)
            attn = unet.get_submodule(path.removesuffix(".processor"))
            attn.scale = 0.7 * attn.scale
    latents, text = _inputs(3)
    for changes in (dict(window=3), dict(window=1)):
        ctx = _context(3, **changes)
        torch.testing.assert_close(_temporal_unet(unet, latents, text, ctx), _reference_unet(unet, latents, text, ctx), **TOL)
    assert (_temporal_unet(unet, latents, text, ctx) - _temporal_unet(tiny.unet, latents, text, ctx)).abs().max() > 1e-6


def test_pass_through_controls_change_nothing(tiny):
    latents, text = _inputs(3)
    plain = _temporal_unet(tiny.unet, latents, text, _context(3))
    recorded = _temporal_unet(tiny.unet, latents, text, _context(3, control=_BranchZeroQueryKey("none")))
    assert torch.equal(recorded, plain)
    explicit_maps = _temporal_unet(tiny.unet, latents, text, _context(3, control=_MapsControl(override=False)))
    torch.testing.assert_close(explicit_maps, plain, **TOL)


def test_overriding_cross_maps_changes_only_other_branches(tiny):
    latents, text = _inputs(3)
    text[3:] = torch.randn_like(text[3:])
    plain = _temporal_unet(tiny.unet, latents, text, _context(3))
    ctx = _context(3, control=_MapsControl(override=True))
    overridden = _temporal_unet(tiny.unet, latents, text, ctx)
    torch.testing.assert_close(overridden[:3], plain[:3], **TOL)
    assert not torch.allclose(overridden[3:], plain[3:], atol=1e-4)
    torch.testing.assert_close(overridden, _reference_unet(tiny.unet, latents, text, ctx), **TOL)


def test_explicit_cross_maps_respect_the_text_mask(tiny):
    latents, text = _inputs(2)
    mask = torch.ones(4, 7)
    mask[:, 5:] = 0
    kwargs = dict(encoder_attention_mask=mask)
    with torch.no_grad(), temporal_attention(tiny.unet):
        ctx = _context(2, tta=False, window=1)
        stock = tiny.unet(latents, 10, text, **kwargs).sample
        explicit = tiny.unet(latents, 10, text, cross_attention_kwargs={"ctx": ctx.at_step(0, 0, control=_MapsControl(False))}, **kwargs).sample
    torch.testing.assert_close(explicit, stock, **TOL)


@torch.no_grad()
@pytest.mark.parametrize("mask_kind", [None, "bool", "float", "per-query"])
def test_explicit_cross_maps_equal_the_stock_attention_over_several_chunks(monkeypatch, mask_kind):
    """Pass-through maps give the stock result: with a boolean, an additive or a per-query text mask, with the encoder
    states normalised (`norm_cross`), and with the scores computed a few rows at a time (chunks of 2 rows
    over 6, and an uneven last chunk over 5 of them)."""
    import diffferv_cli.temporal.processors as processors

    torch.manual_seed(0)
    attn = Attention(32, cross_attention_dim=24, heads=2, dim_head=16, cross_attention_norm="layer_norm").eval()
    with torch.no_grad():
        attn.norm_cross.weight.uniform_(0.5, 1.5)  # not the identity it starts as
        attn.norm_cross.bias.uniform_(-0.5, 0.5)
    frames, branches, tokens, text_tokens = 3, 2, 10, 7
    hidden = torch.randn(branches * frames, tokens, 32)
    context = torch.randn(branches * frames, text_tokens, 24)
    mask = None
    if mask_kind is not None:
        keep = torch.rand(branches * frames, tokens if mask_kind == "per-query" else 1, text_tokens) > 0.3
        keep[..., 0] = True  # every query keeps a token
        mask = torch.where(keep, 0.0, -1e4) + torch.randn(keep.shape) * 0.5 if mask_kind == "float" else keep
    stock = AttnProcessor2_0()(attn, hidden, context, attention_mask=mask)
    ctx = AttentionContext(frames=frames, branches=("source", "positive"), window=1, tta=False,
                           control=_MapsControl(override=False))
    per_row = attn.heads * tokens * text_tokens
    for rows in (2, 4, 100):  # 3 chunks, 2 chunks (last uneven), 1 chunk
        monkeypatch.setattr(processors, "CROSS_SCORES_CHUNK", rows * per_row)
        explicit = CrossAttention("x")(attn, hidden, context, attention_mask=mask, ctx=ctx)
        torch.testing.assert_close(explicit, stock, **TOL)
    if mask is not None:  # the mask matters
        assert not torch.allclose(stock, AttnProcessor2_0()(attn, hidden, context), atol=1e-4)
    else:  # one row: one frame of one branch
        one = AttentionContext(frames=1, branches=("source",), window=1, tta=False, control=_MapsControl(override=False))
        torch.testing.assert_close(CrossAttention("x")(attn, hidden[:1], context[:1], ctx=one), stock[:1], **TOL)


# --------------------------------------------------------------------------------------------------
# stock structure, installation, contract checks
# --------------------------------------------------------------------------------------------------

def _attention_with_everything(seed=0):
    """An Attention using group norm, residual connection, output rescale and spatial norm."""
    torch.manual_seed(seed)
    return Attention(32, heads=2, dim_head=16, norm_num_groups=4, residual_connection=True,
                     rescale_output_factor=2.0, spatial_norm_dim=3, bias=True).eval()


@torch.no_grad()
def test_stock_structure_for_four_dimensional_input():
    attn = _attention_with_everything()
    frames, height, width = 3, 4, 6
    hidden = torch.randn(2 * frames, 32, height, width)
    temb = torch.randn(2 * frames, 3, height, width)
    stock = AttnProcessor2_0()(attn, hidden, temb=temb)
    for processor in (TemporalSelfAttention("x"), CrossAttention("x")):
        torch.testing.assert_close(processor(attn, hidden, temb=temb), stock, **TOL)
    ctx = AttentionContext(frames=frames, branches=("a", "b"), window=1, tta=False)
    torch.testing.assert_close(TemporalSelfAttention("x")(attn, hidden, temb=temb, ctx=ctx), stock, **TOL)
    # TTA on 4-D input takes its grid from the input, not from the latent size
    grid = static_partition(height, width, frames)
    ctx = AttentionContext(frames=frames, branches=("a", "b"), trajectories=TrajectorySet({(height, width): grid}))
    out = TemporalSelfAttention("x")(attn, hidden, temb=temb, ctx=ctx)
    assert out.shape == hidden.shape and not torch.allclose(out, stock, atol=1e-4)


@torch.no_grad()
def test_query_and_key_norms_are_applied_as_the_stock_processor_does():
    """An Attention with qk_norm (per-head layer norms of Q and K, weights not the identity): the temporal
    path without SWCFA or TTA equals the stock processor."""
    torch.manual_seed(0)
    attn = Attention(32, heads=2, dim_head=16, qk_norm="layer_norm", bias=True).eval()
    for norm in (attn.norm_q, attn.norm_k):
        torch.nn.init.normal_(norm.weight, 1.0, 0.5)
        torch.nn.init.normal_(norm.bias, 0.0, 0.5)
    hidden = torch.randn(6, 24, 32)
    stock = AttnProcessor2_0()(attn, hidden)
    ctx = AttentionContext(frames=3, branches=("a", "b"), window=1, tta=False)
    torch.testing.assert_close(TemporalSelfAttention("x")(attn, hidden, ctx=ctx), stock, **TOL)
    for norm in ("norm_q", "norm_k"):  # each norm changes the result
        saved = getattr(attn, norm)
        setattr(attn, norm, None)
        assert not torch.allclose(AttnProcessor2_0()(attn, hidden), stock, atol=1e-4)
        setattr(attn, norm, saved)


@torch.no_grad()
@pytest.mark.parametrize("text", [True, False])
def test_explicit_cross_maps_keep_the_stock_structure(text):
    """The explicit-maps path of CrossAttention on an Attention with group norm, spatial norm, residual
    connection and output rescale, 4-D input, with text states or (self-attention use) without: pass-through
    maps give the stock result."""
    attn = _attention_with_everything()
    frames, height, width = 3, 4, 6
    hidden = torch.randn(2 * frames, 32, height, width)
    temb = torch.randn(2 * frames, 3, height, width)
    context = torch.randn(2 * frames, 5, 32) if text else None
    stock = AttnProcessor2_0()(attn, hidden, context, temb=temb)
    ctx = AttentionContext(frames=frames, branches=("a", "b"), window=1, tta=False, control=_MapsControl(False))
    torch.testing.assert_close(CrossAttention("x")(attn, hidden, context, temb=temb, ctx=ctx), stock, **TOL)


class _OneLayerMaps(_MapsControl):
    """Explicit maps for one layer only; checks it is asked with the call's context."""

    def __init__(self, layer, frames):
        super().__init__(override=False)
        self.layer, self.frames, self.seen = layer, frames, []

    def wants_cross_maps(self, ctx, layer):
        assert ctx.frames == self.frames
        return layer == self.layer

    def cross_attention(self, ctx, layer, probs):
        assert ctx.frames == self.frames
        self.seen.append(layer)
        return probs


def test_a_control_is_asked_per_layer_and_sees_only_the_maps_it_wants(tiny):
    layers = [path.removesuffix(".processor") for path, kind in attention_layers(tiny.unet).items() if kind == "cross"]
    control = _OneLayerMaps(layers[-1], frames=2)
    latents, text = _inputs(2)
    _temporal_unet(tiny.unet, latents, text, _context(2, control=control))
    assert control.seen == [layers[-1]]


def test_a_wrong_batch_in_explicit_cross_maps_names_the_layer():
    attn = _attention_with_everything()
    ctx = AttentionContext(frames=4, branches=("a",), window=1, tta=False, control=_MapsControl(False))
    with pytest.raises(ValueError, match=r"^up\.x: the UNet batch has 6 rows but the context says 1 branch\(es\) x 4"):
        CrossAttention("up.x")(attn, torch.randn(6, 32, 4, 6), temb=torch.randn(6, 3, 4, 6), ctx=ctx)


@torch.no_grad()
def test_temporal_self_attention_without_a_context_is_stock_with_text_and_mask():
    """No context: the stock processor, handed the text states and the mask it was given."""
    attn = _attention_with_everything()
    hidden, temb = torch.randn(4, 32, 4, 6), torch.randn(4, 3, 4, 6)
    context = torch.randn(4, 5, 32)
    mask = torch.zeros(4, 5)
    mask[:, 3:] = -1e4  # the last two text tokens hidden
    stock = AttnProcessor2_0()(attn, hidden, context, mask, temb=temb)
    torch.testing.assert_close(TemporalSelfAttention("x")(attn, hidden, context, mask, temb=temb), stock, **TOL)
    assert not torch.allclose(AttnProcessor2_0()(attn, hidden, context, temb=temb), stock, atol=1e-4)  # the mask acts


@pytest.mark.parametrize("given", ["text", "mask"])
def test_temporal_self_attention_with_a_context_refuses_text_or_a_mask(given):
    attn = _attention_with_everything()
    ctx = AttentionContext(frames=2, branches=("a",), window=1, tta=False)
    extra = {"encoder_hidden_states": torch.randn(2, 5, 32)} if given == "text" else {"attention_mask": torch.zeros(2, 24)}
    with pytest.raises(ValueError, match=r"^up\.x: temporal self-attention takes no encoder states and no mask$"):
        TemporalSelfAttention("up.x")(attn, torch.randn(2, 32, 4, 6), temb=torch.randn(2, 3, 4, 6), ctx=ctx, **extra)


class _MotionScaled:
    """Replaces the motion Q = K by one new tensor (twice the old), handed back for both."""

    def self_attention(self, ctx, layer, kind, query, key):
        if kind != "motion":
            return query, key
        shared = query * 2
        return shared, shared


class _MotionQueryScaled:
    """Replaces the motion Q alone (K stays h)."""

    def self_attention(self, ctx, layer, kind, query, key):
        return (query * 2, key) if kind == "motion" else (query, key)


@torch.no_grad()
@pytest.mark.parametrize("control, expected", [(None, (True, True, True)), (_Recorder(), (True, True, True)),
                                               (_MotionScaled(), (True, False, False)),
                                               (_MotionQueryScaled(), (False, False, True))],
                         ids=["none", "unchanged", "shared", "query-only"])
def test_tta_gets_one_tensor_for_what_is_one(monkeypatch, control, expected):
    """TTA gathers a tensor passed as two of Q, K, V once: Q = K = V = h unless a control replaces the
    motion features; then Q = K stays one tensor when the control hands back one, and K = V = h when it
    replaces Q alone."""
    import diffferv_cli.temporal.processors as processors

    seen = []

    def watched(query, key, value, grid, scale):
        seen.append((key is query, value is query, value is key))
        return trajectory_attention(query, key, value, grid, scale)

    monkeypatch.setattr(processors, "trajectory_attention", watched)
    attn = _attention_with_everything()
    frames, height, width = 3, 4, 6
    ctx = AttentionContext(frames=frames, branches=("a",), control=control,
                           trajectories=TrajectorySet({(height, width): static_partition(height, width, frames)}))
    TemporalSelfAttention("x")(attn, torch.randn(frames, 32, height, width), temb=torch.randn(frames, 3, height, width),
                               ctx=ctx)
    assert seen == [expected]


def test_a_wrong_batch_in_temporal_self_attention_names_the_layer():
    attn = _attention_with_everything()
    ctx = AttentionContext(frames=4, branches=("a",), window=1, tta=False)
    with pytest.raises(ValueError, match=r"^down\.y: the UNet batch has 6 rows but the context says 1 branch\(es\) x 4"):
        TemporalSelfAttention("down.y")(attn, torch.randn(6, 32, 4, 6), temb=torch.randn(6, 3, 4, 6), ctx=ctx)


def test_install_names_and_restore(tiny):
    unet = tiny.unet
    before = dict(unet.attn_processors)
    layers = attention_layers(unet)
    assert len(layers) == 14 and sorted(set(layers.values())) == ["cross", "self"]
    with temporal_attention(unet):
        for path, processor in unet.attn_processors.items():
            expected = TemporalSelfAttention if layers[path] == "self" else CrossAttention
            assert isinstance(processor, expected) and processor.layer == path.removesuffix(".processor")
            assert processor.layer.endswith("attn1" if layers[path] == "self" else "attn2")
    assert unet.attn_processors == before
    with pytest.raises(RuntimeError, match="inside"), temporal_attention(unet):
        raise RuntimeError("inside")
    assert unet.attn_processors == before


def test_processors_keep_no_state(tiny):
    latents, text = _inputs(2)
    modules_before = {name: set(vars(module)) for name, module in tiny.unet.named_modules()}
    with temporal_attention(tiny.unet):
        processors = list(tiny.unet.attn_processors.values())
        first = _unet(tiny.unet, latents, text, _context(2, control=_Recorder()))
        second = _unet(tiny.unet, latents, text, _context(2, control=_Recorder()))
        assert all(set(vars(processor)) == {"layer"} for processor in processors)
    assert torch.equal(first, second)
    assert {name: set(vars(module)) for name, module in tiny.unet.named_modules()} == modules_before


def test_contract_violations_are_reported(tiny):
    latents, text = _inputs(2)
    with pytest.raises(ValueError, match="batch has 4 rows"):
        _temporal_unet(tiny.unet, latents, text, _context(3, branches=1))
    ctx = _context(2)
    fine = ctx.trajectories.for_grid(*LATENT)
    rows = [[int(t) for t in row if t >= 0] for row in fine.index]
    rows[0] = rows[0] + [rows[1][0]]  # a token in two trajectories
    broken = grid_from_trajectories(rows, *LATENT, 2)
    with pytest.raises(ValueError, match="exactly once"):
        _temporal_unet(tiny.unet, latents, text, ctx.at_step(0, 0, trajectories=TrajectorySet({LATENT: broken})))
    unsorted = TrajectoryGrid(*LATENT, 2, fine.index.flip(0), fine.lengths.flip(0))
    with pytest.raises(ValueError, match="longest first"):
        _temporal_unet(tiny.unet, latents, text, ctx.at_step(0, 0, trajectories=TrajectorySet({LATENT: unsorted})))
    with pytest.raises(ValueError, match="3 frames"):
        _temporal_unet(tiny.unet, latents, text, _context(3, branches=1).at_step(0, 0, frames=4, branches=("a",)))


class _WrongShape:
    """A control that hands back one frame too few, for the kind of features and the tensor named."""

    def __init__(self, kind, which="query"):
        self.kind, self.which = kind, which

    def self_attention(self, ctx, layer, kind, query, key):
        if kind != self.kind:
            return query, key
        return (query[:, 1:], key) if self.which == "query" else (query, key[:, 1:])

    def wants_cross_maps(self, ctx, layer):
        return self.kind == "cross"

    def cross_attention(self, ctx, layer, probs):
        return probs[:, 1:]


@pytest.mark.parametrize("kind, what", [("app", "app query"), ("motion", "motion query"), ("app", "app key"),
                                        ("motion", "motion key"), ("cross", "cross-attention maps")])
def test_a_control_returning_the_wrong_shape_is_named_with_both_shapes(tiny, kind, what):
    latents, text = _inputs(2)
    with pytest.raises(ValueError) as error:
        _temporal_unet(tiny.unet, latents, text, _context(2, control=_WrongShape(kind, what.split()[-1])))
    message = str(error.value)
    assert message.startswith(f"FeatureControl returned {what} of shape (2, 1, ")
    assert ", expected (2, 2, " in message
