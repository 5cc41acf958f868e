"""Slow, obviously-correct references for the temporal attention processors, for tests only.

Python loops over branches, frames and trajectories; explicit softmax; every tensor in the contract
layout (branches, frames, heads, tokens, head_dim). Also small builders of valid trajectory partitions
(random, translating, static), so tests and benches need not wait for the optical-flow pipeline.
"""

from __future__ import annotations

import torch

from diffferv_cli.temporal.context import AttentionContext
from diffferv_cli.temporal.trajectories import TrajectoryGrid, TrajectorySet


def naive_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(Q K^T * scale) V for (heads, query_tokens, d), (heads, key_tokens, d)."""
    probs = torch.softmax(query @ key.transpose(-1, -2) * scale, dim=-1)
    return probs @ value


def naive_swcfa(query, key, value, window: int, scale: float) -> torch.Tensor:
    """Eq. 6: frame i of branch b attends to frames j of branch b with |i - j| <= window // 2."""
    branches, frames = query.shape[:2]
    output = torch.empty_like(query)
    for branch in range(branches):
        for frame in range(frames):
            neighbours = [other for other in range(frames) if abs(other - frame) <= window // 2]
            keys = torch.cat([key[branch, other] for other in neighbours], dim=1)  # (heads, n*tokens, d)
            values = torch.cat([value[branch, other] for other in neighbours], dim=1)
            output[branch, frame] = naive_attention(query[branch, frame], keys, values, scale)
    return output


def naive_full_cross_frame(query, key, value, scale: float) -> torch.Tensor:
    """Every frame attends to all frames of its branch (dense spatio-temporal attention)."""
    branches, frames, heads, tokens, head_dim = key.shape
    output = torch.empty_like(query)
    for branch in range(branches):
        keys = key[branch].transpose(0, 1).reshape(heads, frames * tokens, head_dim)
        values = value[branch].transpose(0, 1).reshape(heads, frames * tokens, head_dim)
        for frame in range(frames):
            output[branch, frame] = naive_attention(query[branch, frame], keys, values, scale)
    return output


def naive_tta(query, key, value, grid: TrajectoryGrid, scale: float) -> torch.Tensor:
    """Eq. 8: each token attends to all tokens of its trajectory, one trajectory at a time."""
    branches, frames, heads, tokens, head_dim = query.shape
    output = torch.full_like(query, float("nan"))
    for branch in range(branches):
        for row in grid.index.tolist():
            members = [(token // tokens, token % tokens) for token in row if token >= 0]
            queries = torch.stack([query[branch, f, :, p] for f, p in members], dim=1)  # (heads, L, d)
            keys = torch.stack([key[branch, f, :, p] for f, p in members], dim=1)
            values = torch.stack([value[branch, f, :, p] for f, p in members], dim=1)
            attended = naive_attention(queries, keys, values, scale)
            for slot, (f, p) in enumerate(members):
                output[branch, f, :, p] = attended[:, slot]
    return output


def _heads(projected: torch.Tensor, ctx: AttentionContext, heads: int) -> torch.Tensor:
    """(batch, tokens, heads*d) -> (branches, frames, heads, tokens, d)."""
    batch, tokens, inner = projected.shape
    return projected.view(len(ctx.branches), ctx.frames, tokens, heads, inner // heads).transpose(2, 3)


def _merge(per_head: torch.Tensor) -> torch.Tensor:
    """(branches, frames, heads, tokens, d) -> (batch, tokens, heads*d)."""
    branches, frames, heads, tokens, head_dim = per_head.shape
    return per_head.transpose(2, 3).reshape(branches * frames, tokens, heads * head_dim)


class ReferenceSelfAttention:
    """attn1 with the naive SWCFA + TTA above (3-D input, no norms: the SD1.5 transformer blocks).
    TTA attends along trajectories with Q = K = V = the SWCFA output and replaces it."""

    def __init__(self, layer: str):
        self.layer = layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 ctx: AttentionContext | None = None, **kwargs):
        heads = attn.heads
        query = _heads(attn.to_q(hidden_states), ctx, heads)
        key = _heads(attn.to_k(hidden_states), ctx, heads)
        value = _heads(attn.to_v(hidden_states), ctx, heads)
        if ctx.control is not None:
            query, key = ctx.control.self_attention(ctx, self.layer, "app", query, key)
        window = ctx.window if ctx.swcfa else 1
        swcfa = _merge(naive_swcfa(query, key, value, window, attn.scale))
        output = swcfa
        tokens = hidden_states.shape[1]
        if ctx.tta and ctx.trajectories is not None and ctx.grid_for(tokens) in ctx.trajectories.grids:
            grid = ctx.trajectories.for_grid(*ctx.grid_for(tokens))
            # eq. 8 with v = the SWCFA output h: Q = K = V = h per head, the result replaces h
            value = _heads(swcfa, ctx, heads)
            query, key = value, value
            if ctx.control is not None:
                query, key = ctx.control.self_attention(ctx, self.layer, "motion", query, key)
            output = _merge(naive_tta(query, key, value, grid, attn.scale))
        return attn.to_out[1](attn.to_out[0](output))


class ReferenceCrossAttention:
    """attn2 with explicit maps, always, passed through the control when it wants them."""

    def __init__(self, layer: str):
        self.layer = layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 ctx: AttentionContext | None = None, **kwargs):
        heads = attn.heads
        query = _heads(attn.to_q(hidden_states), ctx, heads)
        key = _heads(attn.to_k(encoder_hidden_states), ctx, heads)
        value = _heads(attn.to_v(encoder_hidden_states), ctx, heads)
        probs = torch.softmax(query @ key.transpose(-1, -2) * attn.scale, dim=-1)  # (B, m, heads, N, T)
        if ctx.control is not None and ctx.control.wants_cross_maps(ctx, self.layer):
            probs = ctx.control.cross_attention(ctx, self.layer, probs)
        return attn.to_out[1](attn.to_out[0](_merge(probs @ value)))


# --------------------------------------------------------------------------------------------------
# valid trajectory partitions without optical flow
# --------------------------------------------------------------------------------------------------

def grid_from_trajectories(trajectories: list[list[int]], height: int, width: int, frames: int) -> TrajectoryGrid:
    """Token lists -> TrajectoryGrid (sorted longest first, left-aligned, -1 padded)."""
    ordered = sorted(trajectories, key=len, reverse=True)  # stable: ties keep their order
    longest = len(ordered[0])
    index = torch.full((len(ordered), longest), -1, dtype=torch.int64)
    for row, members in enumerate(ordered):
        index[row, : len(members)] = torch.tensor(members, dtype=torch.int64)
    lengths = torch.tensor([len(members) for members in ordered], dtype=torch.int64)
    return TrajectoryGrid(height, width, frames, index, lengths)


def chain_partition(height: int, width: int, frames: int, links: list[dict[int, int]]) -> TrajectoryGrid:
    """Follow `links[i]` (position in frame i -> position in frame i+1, injective) into trajectories."""
    tokens = height * width
    targeted = [set(links[frame].values()) for frame in range(frames - 1)]
    trajectories = []
    for frame in range(frames):
        for position in range(tokens):
            if frame > 0 and position in targeted[frame - 1]:
                continue  # continues a trajectory started earlier
            members, f, p = [], frame, position
            while True:
                members.append(f * tokens + p)
                if f == frames - 1 or p not in links[f]:
                    break
                f, p = f + 1, links[f][p]
            trajectories.append(members)
    return grid_from_trajectories(trajectories, height, width, frames)


def random_partition(height: int, width: int, frames: int, generator: torch.Generator,
                     link_probability: float = 0.7) -> TrajectoryGrid:
    """Random injective links between consecutive frames, each kept with `link_probability`:
    long rows, short rows and singletons."""
    tokens = height * width
    links = []
    for _ in range(frames - 1):
        targets = torch.randperm(tokens, generator=generator).tolist()
        keep = (torch.rand(tokens, generator=generator) < link_probability).tolist()
        links.append({p: targets[p] for p in range(tokens) if keep[p]})
    return chain_partition(height, width, frames, links)


def translating_partition(height: int, width: int, frames: int, velocity: tuple[float, float]) -> TrajectoryGrid:
    """Smooth motion: the whole frame translates by `velocity` (rows, columns) tokens per frame. Tokens
    leaving the grid end their trajectory, tokens entering it start one."""
    links = []
    for frame in range(frames - 1):
        dy = int(velocity[0] * (frame + 1)) - int(velocity[0] * frame)
        dx = int(velocity[1] * (frame + 1)) - int(velocity[1] * frame)
        step = {}
        for y in range(height):
            for x in range(width):
                if 0 <= y + dy < height and 0 <= x + dx < width:
                    step[y * width + x] = (y + dy) * width + (x + dx)
        links.append(step)
    return chain_partition(height, width, frames, links)


def static_partition(height: int, width: int, frames: int) -> TrajectoryGrid:
    """No motion: one trajectory per position, through all frames."""
    tokens = height * width
    index = torch.arange(frames)[None, :] * tokens + torch.arange(tokens)[:, None]  # (tokens, frames)
    return TrajectoryGrid(height, width, frames, index, torch.full((tokens,), frames, dtype=torch.int64))


def unet_grids(latent_size: tuple[int, int], levels: int) -> list[tuple[int, int]]:
    """The token grids of a UNet with `levels` attention resolutions (each side halved, rounded up)."""
    height, width = latent_size
    grids = []
    for _ in range(levels):
        grids.append((height, width))
        height, width = -(-height // 2), -(-width // 2)
    return grids


def trajectory_set(latent_size: tuple[int, int], levels: int, frames: int, build) -> TrajectorySet:
    """`build(height, width, frames)` on every grid of the UNet."""
    return TrajectorySet({grid: build(*grid, frames) for grid in unet_grids(latent_size, levels)})
