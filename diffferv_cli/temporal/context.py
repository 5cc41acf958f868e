"""Per-call facts for the temporal attention processors, and the hook interface for preservation features.

A UNet call on a clip puts frames in the batch dimension, branch by branch:

    batch row  = branch_index * frames + frame_index          # (branches*frames, tokens, channels)

e.g. editing in recompute mode runs the branches ("source", "negative", "positive") in one call. Attention
never mixes branches. The context travels with the call as `cross_attention_kwargs={"ctx": ctx}`; nothing
is ever set on a module.

Preservation features (paper 3.4) pass through a `FeatureControl`, which each processor calls with the
tensors of its layer. Every tensor handed to a control has the branch and frame axes split out:

    query, key : (branches, frames, heads, tokens, head_dim)
    probs      : (branches, frames, heads, tokens, text_tokens)

The control returns tensors of the same shape (the same ones, or edited copies), so it can record them
(inversion, disk mode) or override some branches with features of another branch or from disk (editing).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal, Protocol

import torch

from diffferv_cli.temporal.plan import TrajectoryPlan

if TYPE_CHECKING:
    from diffferv_cli.temporal.trajectories import TrajectorySet

FeatureKind = Literal["app", "motion"]


class FeatureControl(Protocol):
    """Records or overrides the preservation features of one UNet call."""

    def self_attention(
        self, ctx: AttentionContext, layer: str, kind: FeatureKind, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`kind="app"`: SWCFA Q,K (appearance); `kind="motion"`: TTA Q,K (motion)."""
        ...

    def wants_cross_maps(self, ctx: AttentionContext, layer: str) -> bool:
        """Whether this layer must compute explicit cross-attention maps for this call."""
        ...

    def cross_attention(self, ctx: AttentionContext, layer: str, probs: torch.Tensor) -> torch.Tensor:
        """Cross-attention maps (semantic features), after softmax, before multiplying the values."""
        ...


@dataclass
class AttentionContext:
    """What the processors need to know about the current UNet call.

    `trajectories` are the clip's (or the temporal window's) trajectories; `plan` is what TTA reads, their
    `TrajectoryPlan` on the device, built once from `trajectories` when the context is made (which also
    checks them) and carried along by `at_step`. Only `plan` is read inside a UNet call, and nothing that
    changes from step to step (`step`, `timestep`) is read there by the processors, so one compiled graph
    serves every step. A `FeatureControl` that switches per step reads device tensors it is handed
    before the call (see editing/features.py)."""

    frames: int
    branches: tuple[str, ...] = ("main",)
    latent_size: tuple[int, int] | None = None  # (height, width) of the latents fed to the UNet
    trajectories: TrajectorySet | None = None
    window: int = 3
    swcfa: bool = True
    tta: bool = True
    step: int = 0
    timestep: int = 0
    control: FeatureControl | None = None
    plan: TrajectoryPlan | None = None

    def __post_init__(self) -> None:
        if self.trajectories is None:
            self.plan = None
        elif self.plan is None or self.plan.source is not self.trajectories:
            self.plan = TrajectoryPlan.build(self.trajectories)

    @property
    def batch(self) -> int:
        return self.frames * len(self.branches)

    def branch_index(self, name: str) -> int:
        return self.branches.index(name)

    def at_step(self, step: int, timestep: int, **changes) -> AttentionContext:
        return replace(self, step=step, timestep=int(timestep), **changes)

    def grid_for(self, tokens: int) -> tuple[int, int]:
        """(height, width) of the token grid with `tokens` tokens, derived from the latent size.

        The UNet halves each side (rounding up) at every down block, so the grids are latent_size,
        ceil(latent_size/2), ... Non-square grids are fine; `h = w = sqrt(tokens)` is never assumed."""
        if self.latent_size is None:
            raise ValueError("AttentionContext.latent_size is needed to place tokens on a grid")
        height, width = self.latent_size
        while height * width > tokens:
            height, width = -(-height // 2), -(-width // 2)
        if height * width != tokens:
            raise ValueError(f"{tokens} tokens do not form a grid of latents {self.latent_size}")
        return height, width
