"""The temporal attention processors (paper 3.3) and the hooks for preservation features (paper 3.4).

Installed on a stock diffusers `UNet2DConditionModel` by `install.temporal_attention`; frames travel in
the batch dimension (`row = branch * frames + frame`) and the per-call facts in an `AttentionContext`
passed as `cross_attention_kwargs={"ctx": ctx}`.

* `TemporalSelfAttention` (every `attn1`): SWCFA (eq. 6) followed by TTA (eq. 8), both training-free.
* `CrossAttention` (every `attn2`): stock attention, or explicit maps when a `FeatureControl` asks for them.

Without a context both behave exactly like diffusers' `AttnProcessor2_0` (each batch row on its own).
Attention never mixes branches, and the processors keep no state between calls: the only attribute is
the layer name they were installed under.

Layouts. Inside this module Q, K, V are kept "token major", the layout `to_q` produces:

    (branches, frames, tokens, heads, head_dim)

so that consecutive frames are consecutive memory and a window of frames is a view, not a copy. The
`FeatureControl` sees the contract layout `(branches, frames, heads, tokens, head_dim)` (a transposed
view of the same memory).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

from diffferv_cli.temporal.context import AttentionContext, FeatureKind
from diffferv_cli.temporal.plan import GridPlan, check_partition

if TYPE_CHECKING:
    from diffferv_cli.temporal.trajectories import TrajectoryGrid

__all__ = ["CrossAttention", "TemporalSelfAttention", "check_partition", "sliding_window_attention",
           "trajectory_attention", "window_bounds"]

# The stock processor: layers with nothing temporal to do (no context, or cross-attention without explicit
# maps) run exactly what the pretrained UNet runs.
_STOCK = AttnProcessor2_0()

# Explicit cross-attention maps are computed this many score elements at a time (256 MB in float32).
CROSS_SCORES_CHUNK = 1 << 26


# --------------------------------------------------------------------------------------------------
# attention kernels on token-major tensors
# --------------------------------------------------------------------------------------------------

def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax attention on token-major tensors `(..., tokens, heads, head_dim)`; same layout out."""
    output = F.scaled_dot_product_attention(
        query.transpose(-3, -2), key.transpose(-3, -2), value.transpose(-3, -2), scale=scale
    )  # (..., heads, tokens, head_dim)
    return output.transpose(-3, -2)


def window_bounds(frame: int, frames: int, window: int) -> tuple[int, int]:
    """First and last frame (inclusive) that frame `frame` attends to in SWCFA (eq. 6).

    Frames max(i - w//2, 0) .. min(i + w//2, m - 1): `window // 2` frames on each side, so an even
    `window` reads eq. 6 literally and spans `window + 1` frames (w=2 behaves like w=3); `window=1` is
    per-frame self-attention (eq. 5). At the ends of the clip the window is clamped: those frames attend
    to FEWER frames, never to a repeated one."""
    radius = window // 2
    return max(frame - radius, 0), min(frame + radius, frames - 1)


def sliding_window_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, window: int, scale: float
) -> torch.Tensor:
    """SWCFA (eq. 6): each frame's queries attend to the keys/values of the frames in its window.

    query, key, value: (branches, frames, tokens, heads, head_dim); returns the same shape.

    One attention call for the frames with a full window, of every branch at once: the branches' frames
    are laid end to end and every run of `2 * (window // 2) + 1` consecutive frames is a view of the
    key/value memory (no copy). Runs that straddle two branches are computed and overwritten: they are
    centred on edge frames, whose clamped windows are shorter and get one call per window length (left
    and right edges of all branches together). Memory stays O(frames * window * tokens)."""
    branches, frames, tokens, heads, head_dim = query.shape
    radius = window // 2
    if radius == 0 or frames == 1:  # eq. 5: per-frame self-attention
        flat = (branches * frames, tokens, heads, head_dim)
        return attend(query.reshape(flat), key.reshape(flat), value.reshape(flat), scale).reshape(query.shape)

    span, rows = 2 * radius + 1, branches * frames
    output = query.new_empty((branches, frames, tokens, heads, head_dim))
    if frames >= span:  # frames radius .. frames-radius-1 of each branch have a full window
        flat, runs = (rows * tokens, heads, head_dim), (0, span * tokens, tokens)
        # unfold: every run of `span` frames, one frame apart -> (rows-span+1, heads, span*tokens, head_dim)
        keys = key.reshape(flat).unfold(*runs).permute(0, 1, 3, 2)
        values = value.reshape(flat).unfold(*runs).permute(0, 1, 3, 2)
        centred = query.reshape(rows, tokens, heads, head_dim)[radius : rows - radius].transpose(1, 2)
        attended = F.scaled_dot_product_attention(centred, keys, values, scale=scale)  # (.., heads, tokens, d)
        output.view(rows, tokens, heads, head_dim)[radius : rows - radius] = attended.transpose(1, 2)
    for frames_slice, group_windows in _edge_groups(frames, window):
        count, length = len(group_windows), group_windows[0][1] - group_windows[0][0]

        def windows(tensor, group_windows=group_windows, count=count, length=length):
            stacked = torch.stack([tensor[:, low:high] for low, high in group_windows])  # (count, branches, length, ..)
            return stacked.reshape(count * branches, length * tokens, heads, head_dim).transpose(1, 2)

        queries = query[:, frames_slice].transpose(0, 1).reshape(count * branches, tokens, heads, head_dim)
        attended = F.scaled_dot_product_attention(queries.transpose(1, 2), windows(key), windows(value), scale=scale)
        output[:, frames_slice] = attended.transpose(1, 2).view(count, branches, tokens, heads, head_dim).transpose(0, 1)
    return output


def _edge_groups(frames: int, window: int) -> tuple[tuple[slice, tuple[tuple[int, int], ...]], ...]:
    """The frames whose SWCFA window is clamped (shorter than `2 * (window // 2) + 1` frames), grouped by
    window length, one attention call per group: (frames as a slice, ((first, last + 1) per frame)).

    A group is a pair of frames f, frames-1-f (the clamp is symmetric) or, when the clip is shorter than
    a window, a run of middle frames; either way an arithmetic progression, hence a slice. It always has
    two frames or more (the middle frame of an odd clip is clamped only when its neighbours are, to the
    same length: the whole clip). Plain ints (no tensors): torch.compile traces it to constants."""
    span = 2 * (window // 2) + 1
    groups: dict[int, list[int]] = {}
    for frame in range(frames):
        low, high = window_bounds(frame, frames, window)
        if high - low + 1 < span:
            groups.setdefault(high - low + 1, []).append(frame)
    return tuple((slice(members[0], members[-1] + 1, members[1] - members[0]),
                   tuple(_bounds(frame, frames, window) for frame in members)) for members in groups.values())


def _bounds(frame: int, frames: int, window: int) -> tuple[int, int]:
    low, high = window_bounds(frame, frames, window)
    return low, high + 1


def trajectory_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, grid: GridPlan | TrajectoryGrid, scale: float
) -> torch.Tensor:
    """TTA (eq. 8): every token attends to all tokens of its trajectory (same branch).

    query, key, value: (branches, frames*tokens, heads, head_dim), tokens numbered frame*tokens + p as
    in `TrajectoryGrid.index`; returns the same shape. `grid` is the grid's precomputed `GridPlan` (a
    `TrajectoryGrid` is checked and planned on the spot: for tests and one-off calls).

    Trajectories are gathered in the plan's length buckets (padded keys masked); singleton trajectories
    attend only to themselves, so their output is their own value. No host sync: every index is in the
    plan. The same tensor passed as query, key and value is gathered once."""
    plan = grid if isinstance(grid, GridPlan) else GridPlan.build(grid, query.device)
    branches, _, heads, head_dim = value.shape
    pieces = []
    for bucket in plan.buckets:
        sequences = branches * bucket.rows

        def rows(tensor, bucket=bucket, sequences=sequences):  # (branches*rows, heads, length, head_dim)
            return tensor.index_select(1, bucket.slots).view(sequences, bucket.length, heads, head_dim).transpose(1, 2)

        query_rows = rows(query)
        key_rows = query_rows if key is query else rows(key)
        value_rows = query_rows if value is query else key_rows if value is key else rows(value)
        mask = bucket.mask if bucket.mask is None or branches == 1 else bucket.mask.repeat(branches, 1, 1, 1)
        attended = F.scaled_dot_product_attention(query_rows, key_rows, value_rows, attn_mask=mask, scale=scale)
        pieces.append(attended.transpose(1, 2).reshape(branches, bucket.rows * bucket.length, heads, head_dim))
    pieces.append(value.index_select(1, plan.singletons))
    return torch.cat(pieces, dim=1).index_select(1, plan.inverse)  # (branches, frames*tokens, heads, head_dim)


# --------------------------------------------------------------------------------------------------
# the stock AttnProcessor2_0 structure, for the temporal paths
# --------------------------------------------------------------------------------------------------

def _enter(attn, hidden_states: torch.Tensor, temb: torch.Tensor | None):
    """Spatial norm, (batch, channels, height, width) -> (batch, tokens, channels), group norm.
    Returns the tokens and the spatial shape to restore (None for 3-D input)."""
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    spatial_shape = None
    if hidden_states.ndim == 4:
        batch, channels, height, width = hidden_states.shape
        spatial_shape = (channels, height, width)
        hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)  # (batch, tokens, C)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return hidden_states, spatial_shape


def _leave(attn, hidden_states: torch.Tensor, residual: torch.Tensor, spatial_shape) -> torch.Tensor:
    """Output projection and dropout, back to 4-D if needed, residual, rescale."""
    hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)
    if spatial_shape is not None:
        hidden_states = hidden_states.transpose(-1, -2).reshape(hidden_states.shape[0], *spatial_shape)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


def _prepare_mask(attn, attention_mask, key_tokens: int, batch: int) -> torch.Tensor | None:
    """diffusers' mask preparation; result (batch, heads, 1 or query tokens, key tokens)."""
    if attention_mask is None:
        return None
    attention_mask = attn.prepare_attention_mask(attention_mask, key_tokens, batch)
    return attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])


def _context_tokens(attn, hidden_states, encoder_hidden_states):
    if encoder_hidden_states is None:
        return hidden_states
    if attn.norm_cross:
        return attn.norm_encoder_hidden_states(encoder_hidden_states)
    return encoder_hidden_states


def _projected_heads(linear, hidden_states: torch.Tensor, leading: tuple[int, ...], tokens: int,
                     heads: int) -> torch.Tensor:
    """linear(hidden_states) as (*leading, tokens, heads, head_dim), sizes known up front (no shape reads)."""
    return linear(hidden_states).view(*leading, tokens, heads, linear.out_features // heads)


def _norm_query_key(attn, query: torch.Tensor, key: torch.Tensor):
    """attn.norm_q / norm_k act on head_dim, so the token-major layout is fine."""
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key


def _check_batch(ctx: AttentionContext, batch: int, layer: str) -> None:
    if batch != ctx.batch:
        raise ValueError(
            f"{layer}: the UNet batch has {batch} rows but the context says {len(ctx.branches)} branch(es) x "
            f"{ctx.frames} frame(s) = {ctx.batch}"
        )


def _checked(returned: torch.Tensor, expected: torch.Tensor, what: str) -> torch.Tensor:
    if returned.shape != expected.shape:
        raise ValueError(f"FeatureControl returned {what} of shape {tuple(returned.shape)}, "
                         f"expected {tuple(expected.shape)}")
    return returned


# --------------------------------------------------------------------------------------------------
# processors
# --------------------------------------------------------------------------------------------------

class TemporalSelfAttention:
    """`attn1` processor: SWCFA (eq. 6), then TTA (eq. 8) replacing the SWCFA output before `to_out`.

    Per call, with B branches x m frames in the batch and N tokens on a grid (h, w):

    1. query, key, value = to_q(x), to_k(x), to_v(x). A `FeatureControl` sees / replaces query and key
       as the appearance features (`kind="app"`, the SWCFA Q,K of paper 3.4).
    2. SWCFA (eq. 6, `ctx.swcfa`): frame i's queries attend to the keys/values of frames
       max(i - w//2, 0) .. min(i + w//2, m - 1) of the same branch (see `window_bounds` for the ends and
       even w). With `ctx.swcfa` False: per-frame self-attention (eq. 5). Result h: (B*m, N, heads*d).
    3. TTA (eq. 8, `ctx.tta` and trajectories for this grid), on every self-attention grid. Eq. 8 is
       read with v = h, the SWCFA output token, and W_Q = W_K = W_V = identity (FLATTEN's training-free
       form, Cong et al. 2024, whose trajectory rule eq. 8 cites):
           Q_TTA = h_{i,p_i},  K_TTA = V_TTA = [h_{1,p_1} ... h_{m,p_m}],  split into the layer's heads,
           scaled by head_dim^-1/2 (the layer's own scale).
       Each token attends to every token of its trajectory (same branch) and the result REPLACES h.
       The block's projections are not applied to h: W_Q, W_K, W_V were trained on the normalised block
       input, not on attention outputs, and re-projecting would move the features off the pretrained
       distribution. Consequence, and the reason for this form: where the tokens of a trajectory agree
       (a static clip, one frame, a token alone on its trajectory) TTA returns h unchanged, so the
       temporal UNet equals the stock UNet there. A control sees / replaces Q_TTA, K_TTA (= h, per
       head) as the motion features (`kind="motion"`); the values stay the branch's own h.
    4. to_out(h), then the stock residual / rescale.

    Values are never handed to a control. Without a context: exactly diffusers' AttnProcessor2_0.
    """

    def __init__(self, layer: str):
        self.layer = layer

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        ctx: AttentionContext | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if ctx is None:
            return _STOCK(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(f"{self.layer}: temporal self-attention takes no encoder states and no mask")
        residual = hidden_states
        hidden_states, spatial_shape = _enter(attn, hidden_states, temb)

        batch, tokens, _ = hidden_states.shape
        _check_batch(ctx, batch, self.layer)
        leading = (len(ctx.branches), ctx.frames)

        # 1. projections (eq. 6): (branches, frames, tokens, heads, head_dim)
        query = _projected_heads(attn.to_q, hidden_states, leading, tokens, attn.heads)
        key = _projected_heads(attn.to_k, hidden_states, leading, tokens, attn.heads)
        value = _projected_heads(attn.to_v, hidden_states, leading, tokens, attn.heads)
        query, key = _norm_query_key(attn, query, key)
        query, key = self._control(ctx, "app", query, key)

        # 2. SWCFA (eq. 6), or per-frame self-attention (eq. 5)
        window = ctx.window if ctx.swcfa else 1
        attended = sliding_window_attention(query, key, value, window, attn.scale)
        hidden_states = attended.reshape(batch, tokens, -1)  # (batch, tokens, heads*head_dim)

        # 3. TTA (eq. 8) along the trajectories of this grid, replacing the SWCFA output
        grid = self._trajectory_grid(ctx, tokens, spatial_shape)
        if grid is not None:
            hidden_states = self._trajectory_attention(attn, ctx, hidden_states, grid)

        # 4. output projection
        return _leave(attn, hidden_states, residual, spatial_shape)

    def _control(self, ctx: AttentionContext, kind: FeatureKind, query: torch.Tensor, key: torch.Tensor):
        """Hand Q,K to the control as (branches, frames, heads, tokens, head_dim); take them back."""
        if ctx.control is None:
            return query, key
        query_heads = query.transpose(2, 3)
        key_heads = query_heads if key is query else key.transpose(2, 3)
        new_query, new_key = ctx.control.self_attention(ctx, self.layer, kind, query_heads, key_heads)
        # the tensors handed back unchanged come back as themselves, a shared Q = K stays one tensor
        same_key = new_key is new_query
        new_query = query if new_query is query_heads else _checked(new_query, query_heads, f"{kind} query").transpose(2, 3)
        if same_key:
            new_key = new_query
        else:
            new_key = key if new_key is key_heads else _checked(new_key, key_heads, f"{kind} key").transpose(2, 3)
        return new_query, new_key

    def _trajectory_grid(self, ctx: AttentionContext, tokens: int, spatial_shape) -> GridPlan | None:
        """The precomputed TTA plan of this layer's grid, or None when TTA is off or the grid has none."""
        if not ctx.tta or ctx.plan is None:
            return None
        height, width = spatial_shape[1:] if spatial_shape is not None else ctx.grid_for(tokens)
        grid = ctx.plan.get(height, width)
        if grid is not None and (grid.frames != ctx.frames or grid.tokens != tokens):
            raise ValueError(
                f"{self.layer}: trajectories are for {grid.frames} frames of a {grid.height}x{grid.width} grid, "
                f"but the UNet call has {ctx.frames} frames of {tokens} tokens"
            )
        return grid

    def _trajectory_attention(self, attn, ctx: AttentionContext, hidden_states, grid: GridPlan) -> torch.Tensor:
        """TTA (eq. 8) with Q_TTA = K_TTA = V_TTA = h, h the SWCFA output split into heads.
        (batch, tokens, heads*head_dim) -> the same shape."""
        batch, tokens, _ = hidden_states.shape
        clip = (len(ctx.branches), ctx.frames * tokens, attn.heads, -1)  # (B, m*N, heads, head_dim)
        values = hidden_states.view(clip)
        query = key = values
        if ctx.control is not None:
            per_head = values.view(len(ctx.branches), ctx.frames, tokens, attn.heads, -1)  # (B, m, N, heads, d)
            new_query, new_key = self._control(ctx, "motion", per_head, per_head)
            if new_query is not per_head:
                query = new_query.reshape(clip)
            if new_key is not per_head:
                key = query if new_key is new_query else new_key.reshape(clip)
        attended = trajectory_attention(query, key, values, grid, attn.scale)
        return attended.reshape(batch, tokens, -1)


class CrossAttention:
    """`attn2` processor: stock attention, or explicit maps for a `FeatureControl` (semantic features).

    When `ctx.control.wants_cross_maps(ctx, layer)`: probs = softmax(Q K^T * scale) as
    (branches, frames, heads, tokens, text_tokens), handed to `ctx.control.cross_attention`, whose
    result multiplies the values. Values are never touched. The scores are computed a few frames at a
    time (`CROSS_SCORES_CHUNK` elements), so the peak memory is the maps themselves plus one chunk.
    Otherwise (no context, no control, or the control does not want this layer): AttnProcessor2_0."""

    def __init__(self, layer: str):
        self.layer = layer

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        ctx: AttentionContext | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if ctx is None or ctx.control is None or not ctx.control.wants_cross_maps(ctx, self.layer):
            return _STOCK(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        residual = hidden_states
        hidden_states, spatial_shape = _enter(attn, hidden_states, temb)

        batch, tokens, _ = hidden_states.shape
        _check_batch(ctx, batch, self.layer)
        context = _context_tokens(attn, hidden_states, encoder_hidden_states)
        text_tokens = context.shape[1]
        mask = _prepare_mask(attn, attention_mask, text_tokens, batch)
        # (batch, heads, tokens, head_dim) and (batch, heads, text_tokens, head_dim)
        query = _projected_heads(attn.to_q, hidden_states, (batch,), tokens, attn.heads).transpose(1, 2)
        key = _projected_heads(attn.to_k, context, (batch,), text_tokens, attn.heads).transpose(1, 2)
        value = _projected_heads(attn.to_v, context, (batch,), text_tokens, attn.heads).transpose(1, 2)
        query, key = _norm_query_key(attn, query, key)

        probs = self._maps(query, key, mask, attn.scale)  # (batch, heads, tokens, text_tokens), float32
        maps_shape = (len(ctx.branches), ctx.frames, attn.heads, tokens, text_tokens)
        maps = probs.view(maps_shape)
        maps = _checked(ctx.control.cross_attention(ctx, self.layer, maps), maps, "cross-attention maps")
        attended = torch.matmul(maps.reshape(batch, attn.heads, tokens, text_tokens).to(value.dtype), value)  # (batch, heads, tokens, d)
        hidden_states = attended.transpose(1, 2).reshape(batch, tokens, -1)
        return _leave(attn, hidden_states, residual, spatial_shape)

    @staticmethod
    def _maps(query, key, mask, scale: float) -> torch.Tensor:
        """softmax(Q K^T * scale (+ mask)), a few batch rows at a time; softmax accumulated in float32."""
        batch, heads, tokens, _ = query.shape
        probs = query.new_empty(batch, heads, tokens, key.shape[2])
        rows = max(1, CROSS_SCORES_CHUNK // probs[0].numel())
        for start in range(0, batch, rows):
            scores = torch.matmul(query[start : start + rows], key[start : start + rows].transpose(-1, -2)) * scale
            if mask is not None:
                chunk_mask = mask[start : start + rows]
                if chunk_mask.dtype == torch.bool:
                    scores = scores.masked_fill(~chunk_mask, float("-inf"))
                else:
                    scores = scores + chunk_mask
            probs[start : start + rows] = scores.softmax(dim=-1, dtype=torch.float32)
        return probs
