"""The temporal UNet keeps the pretrained prior: where nothing moves it is the stock UNet.

SWCFA over identical frames and TTA over a trajectory of identical tokens are identities, so on a clip
of identical frames, on a single frame, and for tokens alone on their trajectory the temporal
processors must give what diffusers' own attention gives. Checked on the tiny model and on the
full-size SD1.5 architecture (random weights, one call at a 64x64 latent)."""

from __future__ import annotations

import pytest
import torch
from reference_attention import random_partition, static_partition, trajectory_set

from diffferv_cli.temporal import AttentionContext, temporal_attention, trajectory_attention
from diffferv_cli.temporal.trajectories import TrajectorySet


def _static_clip(frames: int, latent: tuple[int, int], text_dim: int, seed: int = 0):
    """One random latent and one text embedding, repeated for every frame."""
    generator = torch.Generator().manual_seed(seed)
    latent_frame = torch.randn(1, 4, *latent, generator=generator)
    text = torch.randn(1, 7, text_dim, generator=generator)
    return latent_frame.repeat(frames, 1, 1, 1), text.repeat(frames, 1, 1)


@torch.no_grad()
def _stock_and_temporal(unet, latents, text, ctx):
    stock = unet(latents, 500, text).sample
    with temporal_attention(unet):
        temporal = unet(latents, 500, text, cross_attention_kwargs={"ctx": ctx}).sample
    return stock, temporal


def _relative_gap(temporal: torch.Tensor, stock: torch.Tensor) -> float:
    return float((temporal - stock).abs().max() / stock.abs().max())


def _levels(unet) -> int:
    """Number of self-attention token grids of the UNet (one per down block with attention)."""
    return sum("CrossAttn" in name for name in unet.config.down_block_types)


def _check_prior(unet, latent: tuple[int, int], text_dim: int, bound: float, window: int = 3):
    frames = 3
    latents, text = _static_clip(frames, latent, text_dim)
    levels = _levels(unet)
    # a static clip: every grid's trajectories are the positions themselves, through all frames
    static = AttentionContext(frames=frames, latent_size=latent, window=window,
                              trajectories=trajectory_set(latent, levels, frames, static_partition))
    stock, temporal = _stock_and_temporal(unet, latents, text, static)
    gap_static = _relative_gap(temporal, stock)
    # one frame: SWCFA sees only itself, every trajectory is a singleton
    single = AttentionContext(frames=1, latent_size=latent, window=window,
                              trajectories=trajectory_set(latent, levels, 1, static_partition))
    stock_one, temporal_one = _stock_and_temporal(unet, latents[:1], text[:1], single)
    gap_single = _relative_gap(temporal_one, stock_one)
    print(f"static clip: max |temporal - stock| / max |stock| = {gap_static:.2e}; one frame: {gap_single:.2e}")
    assert gap_static <= bound and gap_single <= bound


def test_static_clip_and_single_frame_give_the_stock_unet_tiny(tiny):
    _check_prior(tiny.unet, (8, 12), tiny.unet.config.cross_attention_dim, bound=1e-5)


def test_static_clip_holds_for_every_window(tiny):
    for window in (1, 2, 5):
        _check_prior(tiny.unet, (8, 12), tiny.unet.config.cross_attention_dim, bound=1e-5, window=window)


@pytest.fixture(scope="module")
def full_size_unet():
    from diffusers import UNet2DConditionModel

    from diffferv_cli.models.tiny import SD15_UNET_CONFIG

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    return unet.eval().requires_grad_(False)


def test_static_clip_and_single_frame_give_the_stock_unet_full_size(full_size_unet):
    """SD1.5's architecture at 512x512 (latent 64x64, grids 64², 32², 16², 8²)."""
    _check_prior(full_size_unet, (64, 64), 768, bound=1e-4)


def test_tokens_alone_on_their_trajectory_are_untouched():
    """A singleton trajectory's TTA output is its own value, bit for bit; the others are changed."""
    generator = torch.Generator().manual_seed(3)
    grid = random_partition(6, 7, 4, generator, link_probability=0.5)
    values = torch.randn(2, 4 * 42, 2, 8, generator=generator)  # (branches, frames*tokens, heads, head_dim)
    output = trajectory_attention(values, values, values, grid, 8 ** -0.5)
    alone = grid.index[grid.lengths == 1, 0]
    in_company = grid.index[grid.lengths > 1]
    in_company = in_company[in_company >= 0]
    assert alone.numel() > 0 and in_company.numel() > 0
    assert torch.equal(output[:, alone], values[:, alone])
    assert not torch.allclose(output[:, in_company], values[:, in_company], atol=1e-3)


def test_trajectories_of_singletons_leave_the_swcfa_output_unchanged(tiny):
    """At UNet level: TTA over all-singleton trajectories is exactly 'TTA off'."""
    frames, latent = 3, (8, 12)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(frames, 4, *latent, generator=generator)
    text = torch.randn(frames, 7, tiny.unet.config.cross_attention_dim, generator=generator)
    singletons = trajectory_set(latent, 2, frames, lambda h, w, f: random_partition(h, w, f, generator, 0.0))
    with_tta = AttentionContext(frames=frames, latent_size=latent, trajectories=singletons)
    without = AttentionContext(frames=frames, latent_size=latent, trajectories=TrajectorySet({}), tta=False)
    with torch.no_grad(), temporal_attention(tiny.unet):
        first = tiny.unet(latents, 500, text, cross_attention_kwargs={"ctx": with_tta}).sample
        second = tiny.unet(latents, 500, text, cross_attention_kwargs={"ctx": without}).sample
    torch.testing.assert_close(first, second, atol=1e-6, rtol=1e-6)
