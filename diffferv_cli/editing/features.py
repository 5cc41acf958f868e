"""Preservation features (paper 3.4): recording them during inversion, injecting them during editing.

Both classes implement `attention.context.FeatureControl`. They are owned by the loop that runs the UNet
and hold no reference to any module.

    appearance  F_app    = SWCFA Q,K        kind "app",    keys  "<layer>:app.q",    "<layer>:app.k"
    motion      F_motion = TTA Q,K          kind "motion", key   "<layer>:motion.q" (TTA's Q and K are both
                                                           the SWCFA output h, stored once)
    semantic    F_sem    = cross-attn maps                 key   "<layer>:cross"

Values are never recorded or replaced: the edit arrives through them.

No host sync happens inside a UNet call: when each kind is injected is a (steps, kinds) boolean table on
the device, and a step's row (a view, `FeatureInjector.at_step`) selects with `torch.where` between the
source features and the branch's own, so one compiled graph serves every step. The token maps of the
cross-attention replacement are gather indices and masks made once per edit on the device.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction

import torch

KINDS = ("app", "motion", "cross")


def feature_key(layer: str, name: str) -> str:
    return f"{layer}:{name}"


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
            if key is not query:  # TTA passes its one tensor h as both Q and K: stored once
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

    def tau(self, kind: str) -> float:
        return {"app": self.tau_app, "motion": self.tau_motion, "cross": self.tau_cross}[kind]

    def active(self, kind: str, step: int) -> bool:
        return step < injected_steps(self.tau(kind), self.steps)

    def ever(self, kind: str) -> bool:
        """Whether `kind` is injected in any step."""
        return injected_steps(self.tau(kind), self.steps) > 0

    def table(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(steps, 3) bool: row `step`, column `KINDS.index(kind)` = `active(kind, step)`."""
        counts = torch.tensor([injected_steps(self.tau(kind), self.steps) for kind in KINDS])
        return (torch.arange(self.steps)[:, None] < counts[None, :]).to(device)


class FeatureInjector:
    """Overrides the features of the target branches with the source features of the same step.

    Source features come either from the branch named `source_branch` of the same UNet call (recompute
    mode: that branch is fed exactly the inversion's latent, so its features are the inversion's) or from
    `stored` (disk mode: the cache's features of the current step, already on the device).

    Cross-attention maps are replaced only for tokens a target's prompt shares with the source prompt
    (`token_maps[branch]`: source token position per target token, -1 for new words).

    When each kind is injected is the target's own `schedule`: one for every target, or one per target
    (a mapping), so the edits sampled together in one call (editing/sampling.py, `edit_shared`) each keep
    their own tau_app / tau_motion / tau_cross; the table of flags is (steps, branches, kinds).

    Made once per edit loop for the UNet call's branch layout `branches`; the loop hands the processors
    `injector.at_step(step)`, which carries that step's on/off flags as a device tensor (and, in disk
    mode, the stored features). Explicit cross-attention maps are computed in every step when any step
    replaces them (`wants_cross_maps`), so every step runs the same graph."""

    def __init__(self, schedule: InjectionSchedule | Mapping[str, InjectionSchedule], branches: tuple[str, ...],
                 targets: tuple[str, ...], token_maps: dict[str, torch.Tensor], source_branch: str | None = "source",
                 device: torch.device | str | None = None):
        self.schedule = schedule if isinstance(schedule, InjectionSchedule) else None
        self.schedules = {name: self.schedule or schedule[name] for name in targets}  # each target's own
        counts = {each.steps for each in self.schedules.values()} or ({self.schedule.steps} if self.schedule else set())
        if len(counts) != 1:
            raise ValueError("the injection schedules of one UNet call must have one number of steps, and one at least")
        steps = counts.pop()
        self.branches = branches
        self.targets = targets
        self.source_branch = source_branch
        self.stored: dict[str, torch.Tensor] | None = None
        # (steps, branches, 3) bool, on the device: each target's own schedule, False for the other branches
        off = torch.zeros(steps, len(KINDS), dtype=torch.bool)
        tables = [self.schedules[name].table() if name in self.schedules else off for name in branches]
        self.flags = torch.stack(tables, dim=1).to(device)
        self.active = self.flags[0]  # (branches, 3) this step's flags
        self.ever = {kind: any(each.ever(kind) for each in self.schedules.values()) for kind in KINDS}
        # cross maps: per branch, the source position of each text token and whether it is replaced
        text_tokens = len(next(iter(token_maps.values()))) if token_maps else 0
        mapping = torch.full((len(branches), text_tokens), -1, dtype=torch.long)
        for name in targets:
            mapping[branches.index(name)] = token_maps[name]
        self.token_gather = mapping.clamp(min=0).reshape(-1).to(device)  # (branches*text_tokens,)
        self.token_keep = (mapping >= 0)[:, None, None, None, :].to(device)  # (branches, 1, 1, 1, text)

    def at_step(self, step: int, stored: dict[str, torch.Tensor] | None = None) -> FeatureInjector:
        """This injector for sampling step `step`: the same precomputed tensors, that step's flags (a view
        of the device table) and, in disk mode, that step's stored features."""
        step_injector = copy.copy(self)
        step_injector.active = self.flags[step]
        step_injector.stored = stored
        return step_injector

    def _source(self, ctx, layer: str, name: str, live: torch.Tensor) -> torch.Tensor:
        if self.source_branch is not None:
            return live[ctx.branch_index(self.source_branch)]
        if self.stored is None:
            raise RuntimeError("disk feature mode needs the step's stored features (at_step(step, stored))")
        stored_name = feature_key(layer, name)
        if stored_name not in self.stored and name.endswith(".k"):  # K stored once when it is Q
            stored_name = feature_key(layer, name[:-2] + ".q")
        return self.stored[stored_name].to(device=live.device, dtype=live.dtype)

    def _override(self, kind: str, live: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """live (branches, frames, heads, tokens, d) with the target branches replaced by `source`
        (frames, heads, tokens, d) when `kind` is on in this step."""
        use = self.active[:, KINDS.index(kind)].view(-1, 1, 1, 1, 1)  # (branches, 1, 1, 1, 1): targets on now
        return torch.where(use, source, live)

    def self_attention(self, ctx, layer, kind, query, key):
        if not self.ever[kind]:
            return query, key
        new_query = self._override(kind, query, self._source(ctx, layer, f"{kind}.q", query))
        if key is query and (self.stored is None or feature_key(layer, f"{kind}.k") not in self.stored):
            return new_query, new_query  # TTA's Q = K = h
        return new_query, self._override(kind, key, self._source(ctx, layer, f"{kind}.k", key))

    def wants_cross_maps(self, ctx, layer) -> bool:
        return self.ever["cross"]

    def cross_attention(self, ctx, layer, probs):
        source = self._source(ctx, layer, "cross", probs)  # (frames, heads, tokens, text_tokens)
        text_tokens = source.shape[-1]
        replaced = source.index_select(-1, self.token_gather)  # (frames, heads, tokens, branches*text)
        replaced = replaced.view(*source.shape[:-1], len(self.branches), text_tokens).movedim(-2, 0)
        use = self.token_keep & self.active[:, KINDS.index("cross")].view(-1, 1, 1, 1, 1)  # (branches, 1, 1, 1, text)
        return torch.where(use, replaced, probs)
