"""Preservation features (paper 3.4): recording them during inversion, injecting them during editing.

Both classes implement `attention.context.FeatureControl`. They are owned by the loop that runs the UNet
and hold no reference to any module.

    appearance  F_app    = SWCFA Q,K        kind "app",    keys  "<layer>:app.q",    "<layer>:app.k"
    motion      F_motion = TTA Q,K          kind "motion", key   "<layer>:motion.q" (TTA's Q and K are both
                                                           the SWCFA output h, stored once)
    semantic    F_sem    = cross-attn maps                 key   "<layer>:cross"

Values are never recorded or replaced: the edit arrives through them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch


def feature_key(layer: str, name: str) -> str:
    return f"{layer}:{name}"


def _same_tensor(first: torch.Tensor, second: torch.Tensor) -> bool:
    """The same memory seen the same way (TTA passes its one tensor h as both Q and K)."""
    return (first.data_ptr() == second.data_ptr() and first.shape == second.shape
            and first.stride() == second.stride() and first.dtype == second.dtype)


class FeatureRecorder:
    """Records the features of branch 0 (inversion runs one branch) for one step; `reset()` between steps.

    With `keep=False` it records nothing but still asks for explicit cross-attention maps, so that the
    UNet computes exactly what it computes while recording (inversion runs both modes this way)."""

    def __init__(self, dtype: torch.dtype = torch.float16, keep: bool = True):
        self.dtype = dtype
        self.keep = keep
        self.features: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        self.features = {}

    def self_attention(self, ctx, layer, kind, query, key):
        # (branches, frames, heads, tokens, head_dim) -> stored (frames, heads, tokens, head_dim)
        if self.keep:
            self.features[feature_key(layer, f"{kind}.q")] = query[0].to(self.dtype).clone()
            if not _same_tensor(query, key):
                self.features[feature_key(layer, f"{kind}.k")] = key[0].to(self.dtype).clone()
        return query, key

    def wants_cross_maps(self, ctx, layer) -> bool:
        return True

    def cross_attention(self, ctx, layer, probs):
        if self.keep:
            self.features[feature_key(layer, "cross")] = probs[0].to(self.dtype).clone()
        return probs


def injected_steps(tau: float, steps: int) -> int:
    """How many sampling steps, counted from the noisiest, inject a feature kind with threshold `tau`:
    round(tau * T), computed on the decimal value of tau (0.9 * 50 is 45, not 46 as float arithmetic on
    t > (1 - tau) * T gives), halves rounded up."""
    exact = Fraction(repr(float(tau))) * steps
    return min(steps, max(0, math.floor(exact + Fraction(1, 2))))


@dataclass(frozen=True)
class InjectionSchedule:
    """When each feature kind is injected. Sampling step `step` (0 = first, noisiest) has paper time
    t = T - step; a kind with threshold tau is injected while t > (1 - tau) * T, i.e. in the first
    round(tau * T) steps (`injected_steps`)."""

    steps: int
    tau_app: float = 0.9
    tau_motion: float = 1.0
    tau_cross: float = 1.0

    def active(self, kind: str, step: int) -> bool:
        tau = {"app": self.tau_app, "motion": self.tau_motion, "cross": self.tau_cross}[kind]
        return step < injected_steps(tau, self.steps)


class FeatureInjector:
    """Overrides the features of the target branches with the source features of the same step.

    Source features come either from the branch named `source_branch` of the same UNet call (recompute
    mode: that branch is fed exactly the inversion's latent, so its features are the inversion's) or from
    `stored` (disk mode: loaded from the cache for the current step, see `set_stored`).

    Cross-attention maps are replaced only for tokens a target's prompt shares with the source prompt
    (`token_maps[branch]`: source token position per target token, -1 for new words)."""

    def __init__(self, schedule: InjectionSchedule, targets: tuple[str, ...], token_maps: dict[str, torch.Tensor],
                 source_branch: str | None = "source"):
        self.schedule = schedule
        self.targets = targets
        self.token_maps = token_maps
        self.source_branch = source_branch
        self.stored: dict[str, torch.Tensor] | None = None

    def set_stored(self, features: dict[str, torch.Tensor] | None) -> None:
        self.stored = features

    def _source(self, ctx, layer: str, name: str, live: torch.Tensor) -> torch.Tensor:
        if self.source_branch is not None:
            return live[ctx.branch_index(self.source_branch)]
        if self.stored is None:
            raise RuntimeError("disk feature mode needs set_stored() before the UNet call")
        stored_name = feature_key(layer, name)
        if stored_name not in self.stored and name.endswith(".k"):  # K stored once when it is Q
            stored_name = feature_key(layer, name[:-2] + ".q")
        return self.stored[stored_name].to(device=live.device, dtype=live.dtype)

    def self_attention(self, ctx, layer, kind, query, key):
        if not self.schedule.active(kind, ctx.step):
            return query, key
        source_query = self._source(ctx, layer, f"{kind}.q", query)  # (frames, heads, tokens, head_dim)
        source_key = self._source(ctx, layer, f"{kind}.k", key)
        query, key = query.clone(), key.clone()
        for name in self.targets:
            branch = ctx.branch_index(name)
            query[branch] = source_query
            key[branch] = source_key
        return query, key

    def wants_cross_maps(self, ctx, layer) -> bool:
        return self.schedule.active("cross", ctx.step)

    def cross_attention(self, ctx, layer, probs):
        source = self._source(ctx, layer, "cross", probs)  # (frames, heads, tokens, text_tokens)
        probs = probs.clone()
        for name in self.targets:
            branch = ctx.branch_index(name)
            mapping = self.token_maps[name].to(probs.device)
            shared = (mapping >= 0).nonzero().squeeze(1)
            probs[branch][..., shared] = source[..., mapping[shared]]
        return probs
