"""Edit sampling with preservation-feature injection (paper 3.4, "Sampling with Preservation Feature
Injection"), one batched UNet call per step.

Branches of the batch (each `frames` rows, see attention/context.py):

    source    recompute mode only: fed z_{T-1-k}, the latent the inversion fed to the UNet at this very
              timestep, with the source prompt; its SWCFA/TTA Q,K and cross-attention maps are therefore
              the inversion's preservation features, regenerated instead of read from disk
    anchor    --exact only: fed the inversion latent z_{T-k} with the source prompt, features injected;
              left out when the edit prompt is the source prompt (a reconstruction): the negative branch is
              then the anchor itself (same prompt, same latent at every step, see below)
    negative  the edit latent x with the source prompt (the paper's negative-prompt scheme), injected
    positive  the edit latent x with the edit prompt, injected (left out when both prompts are equal)

    step k (timestep t, T - k in the paper's units):
        eps    = eps_neg + g * (eps_pos - eps_neg)
        x     <- DDIM(eps, t, x)
        exact:  x <- z_{T-1-k} + (DDIM(eps, t, x) - DDIM(eps_anchor, t, z_{T-k}))

Several edits of one clip (`edit -p age -p blond -p glasses`) are sampled together (`edit_shared`): one
call holds the source branch once and then each edit's own anchor / negative / positive branches
(1 + 2k branches instead of 3k), each edit's branches injected from that one source branch on the edit's
own schedule and word alignment; guidance, the DDIM step and the exact correction are per edit, from its
own predictions only, so each edit equals its separate run (to float tolerance: a bigger batch may round
its rows differently). `edit_groups` keeps a call within `max_batch_rows` frame rows, recomputing the
source branch per group; `edit` is the case of one edit.

Every UNet pass runs over the temporal windows the inversion used (recorded in the cache request; see
temporal/windows.py): each window's batch holds the branches x the window's frames, and the windows'
noise predictions are blended per branch before the guidance and the DDIM step. In disk mode the source
branch is absent and its features come from the cache's feature files of the same step and window. The
exact correction adds, per step, the error the source prompt's injected prediction makes along the cached
inversion path; with the edit prompt equal to the source prompt the edit path then lands on z_0 exactly.
That holds by construction, not by luck of the kernels: x starts at z_T, and as long as x equals the
anchor's latent the negative branch computes what the anchor would, so the negative branch's own
prediction serves as the anchor's and the bracket is a value minus itself, zero, whatever the hardware.
(Two branches of one batch need not give the same bits for the same input: a GEMM may treat the rows of
a tile edge with another micro-kernel, as MKL does on AVX2 CPUs.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from diffusers import DDIMScheduler

from diffferv_cli.config import DEFAULT_WINDOW_FRAMES, EditConfig
from diffferv_cli.editing.cache import CacheEntry, LatentRows
from diffferv_cli.editing.features import FeatureInjector, InjectionSchedule
from diffferv_cli.editing.inversion import unet_for_loop, window_plan
from diffferv_cli.editing.prefetch import FeatureStream, HostTensor, WindowRows, WriteBehind
from diffferv_cli.editing.prompts import encode_conditioning, repeat_rows, token_alignment_all
from diffferv_cli.editing.stored import SCRATCH_FOLDER, Scratch
from diffferv_cli.editing.vae import decode_latents
from diffferv_cli.errors import UserError
from diffferv_cli.temporal.install import temporal_attention
from diffferv_cli.temporal.ranks import SINGLE, Ranks
from diffferv_cli.temporal.windows import schedule_from_json

Progress = Callable[[str, int, int], None] | None


@dataclass
class EditResult:
    stored: LatentRows | torch.Tensor  # (m, 4, h, w) float32, the final x_0: read a range of frames at a time
    frames: np.ndarray | None  # (m, H, W, 3) uint8 at working size; None when not decoded (decode=False)
    branches: tuple[str, ...]
    scratch: Scratch | None = None  # the folder holding `stored` (removed once no result needs it)

    @property
    def latents(self) -> torch.Tensor:
        """x_0 of the whole clip in memory (for short clips and tests; writers read `stored` a range at a time)."""
        return self.stored.read() if isinstance(self.stored, LatentRows) else self.stored


def branch_layout(config: EditConfig, source_prompt: str, feature_mode: str) -> tuple[str, ...]:
    branches: list[str] = []
    if config.inject and feature_mode == "recompute":
        branches.append("source")
    if config.exact and config.prompt_edit != source_prompt:  # else the negative branch is the anchor
        branches.append("anchor")
    branches.append("negative")
    if config.prompt_edit != source_prompt:
        branches.append("positive")
    return tuple(branches)


@dataclass(frozen=True)
class SharedLayout:
    """The branches of one UNet call that samples several edits together: the source branch once (when
    any edit injects in recompute mode), then each edit's own branches (its `branch_layout` less the
    source), edit after edit. `roles[j]` names edit j's branches in the call by role ("anchor",
    "negative", "positive"): the roles themselves for one edit, "negative.2" (edit number from 1) for
    several. `layouts[j]` is edit j's layout as it would run alone."""

    branches: tuple[str, ...]
    roles: tuple[dict[str, str], ...]
    layouts: tuple[tuple[str, ...], ...]


def shared_layout(configs: Sequence[EditConfig], source_prompt: str, feature_mode: str) -> SharedLayout:
    layouts = tuple(branch_layout(config, source_prompt, feature_mode) for config in configs)
    branches = ["source"] if any("source" in layout for layout in layouts) else []
    roles = []
    for number, layout in enumerate(layouts, 1):
        named = {role: role if len(layouts) == 1 else f"{role}.{number}" for role in layout if role != "source"}
        roles.append(named)
        branches += named.values()
    return SharedLayout(tuple(branches), tuple(roles), layouts)


# The most frame rows one UNet call of shared edits may hold (branches x the largest window's frames):
# 7 branches of the default 24-frame window, i.e. three edits with one source branch (1 + 2 x 3), about
# 2.3 times the rows of one edit alone (3 x 24). Memory grows with the rows of a call, not with the edits.
DEFAULT_MAX_BATCH_ROWS = 7 * DEFAULT_WINDOW_FRAMES


def edit_groups(configs: Sequence[EditConfig], source_prompt: str, feature_mode: str, *, window_frames: int,
                max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS) -> list[list[int]]:
    """The edits (indices, in order) split into the groups sampled together: each group's UNet call holds
    at most `max_batch_rows` frame rows (its branches x `window_frames`, the largest window), filled in
    order; a group always holds one edit at least (one edit alone runs as it always has). Each group
    recomputes the source branch."""
    groups: list[list[int]] = []
    for index in range(len(configs)):
        if groups:
            joined = shared_layout([configs[i] for i in [*groups[-1], index]], source_prompt, feature_mode)
            if len(joined.branches) * window_frames <= max_batch_rows:
                groups[-1].append(index)
                continue
        groups.append([index])
    return groups


def largest_window(entry: CacheEntry) -> int:
    """Frames of the largest temporal window of the inversion in `entry` (its UNet calls' frames)."""
    return max(window.frames for window in schedule_from_json(entry.manifest["request"]["windows"]))


def edit(components, entry: CacheEntry, config: EditConfig, *, feature_mode: str = "recompute",
         progress: Progress = None, decode: bool = True, compile_unet: bool = False) -> EditResult:
    """Sample the edit from the cached inversion in `entry` and, with `decode`, decode it to frames (a
    writer that streams them decodes `latents` with `vae.decoded_frames` instead): `edit_shared` of one
    edit."""
    return edit_shared(components, entry, [config], feature_mode=feature_mode, progress=progress, decode=decode,
                       compile_unet=compile_unet)[0]


def edit_many(components, entry: CacheEntry, configs: Sequence[EditConfig], *, feature_mode: str = "recompute",
              max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS, progress: Progress = None, decode: bool = True,
              compile_unet: bool = False) -> list[EditResult]:
    """Every edit of `configs` from the one cached inversion, in `edit_groups` sampled together
    (`edit_shared`); the results in the order of `configs`."""
    groups = edit_groups(configs, entry.manifest["request"]["prompt"], feature_mode,
                         window_frames=largest_window(entry), max_batch_rows=max_batch_rows)
    results: dict[int, EditResult] = {}
    for group in groups:
        shared = edit_shared(components, entry, [configs[index] for index in group], feature_mode=feature_mode,
                             progress=progress, decode=decode, compile_unet=compile_unet)
        results.update(zip(group, shared, strict=True))
    return [results[index] for index in range(len(configs))]


def edit_shared(components, entry: CacheEntry, configs: Sequence[EditConfig], *, feature_mode: str = "recompute",
                progress: Progress = None, decode: bool = True, compile_unet: bool = False,
                ranks: Ranks = SINGLE) -> list[EditResult]:
    """Sample every edit of `configs` from the cached inversion in `entry`, all in one UNet call per
    window per step (`shared_layout`: the source branch once, then each edit's branches); with `decode`,
    decode each to frames. Each edit equals its own `edit` run to float tolerance: its branches get
    the same inputs and prompts, the source features are injected into them on the edit's own schedule
    and token alignment, and its guidance, DDIM step and exact correction use only its own predictions.
    (The rows of a bigger batch may round differently, and when any edit replaces cross-attention maps
    every branch computes explicit maps.)

    The step loop keeps every latent on the device; the cached latents (and disk-mode features) are read
    ahead of it in a background thread, each file once (editing/prefetch.py). `compile_unet`: run the UNet
    through `torch.compile`. `ranks`: the processes of a torch.distributed job sharing this clip
    (temporal/ranks.py): each runs its windows of every pass, one all-reduce per branch sums them, every
    rank steps the same latents; only rank 0 decodes."""
    report = progress or (lambda stage, done, total: None)
    request = entry.manifest["request"]
    source_prompt, steps = request["prompt"], int(request["steps"])
    if ranks.world > 1 and feature_mode == "disk":
        raise UserError("--features disk runs in one process; drop it (or the launcher's extra ranks).")
    if not entry.complete:
        raise UserError(f"The inversion in {entry.folder} is unfinished; run `diffferv invert` again to resume it.")
    if feature_mode == "disk" and any(config.inject for config in configs) and not entry.has_features:
        raise UserError("This inversion was cached without features; run `diffferv invert --features disk` first.")
    layout = shared_layout(configs, source_prompt, feature_mode)
    branches = layout.branches
    prompts = {"source": source_prompt}
    for config, roles in zip(configs, layout.roles, strict=True):
        prompts.update({name: config.prompt_edit if role == "positive" else source_prompt for role, name in roles.items()})
    pixels = tuple(side * components.vae_scale_factor for side in entry.manifest["latent_size"])  # (height, width)
    embeddings, added = encode_conditioning(components, [prompts[name] for name in branches], pixels)  # (branches, 77, hidden)

    device = components.device
    injector = None
    schedules = {name: InjectionSchedule(steps, config.tau_app, config.tau_motion, config.tau_cross)
                 for config, roles in zip(configs, layout.roles, strict=True) if config.inject for name in roles.values()}
    if schedules:
        targets = tuple(name for name in branches if name in schedules)
        alignments = {prompt: token_alignment_all(components, source_prompt, prompt)
                      for prompt in dict.fromkeys(prompts[name] for name in targets)}
        token_maps = {name: alignments[prompts[name]] for name in targets}
        injector = FeatureInjector(schedules, branches, targets, token_maps,
                                   source_branch="source" if feature_mode == "recompute" else None, device=device)

    scheduler = DDIMScheduler.from_config(components.scheduler_config)
    scheduler.set_timesteps(steps)
    inversion_timesteps = entry.manifest["timesteps"]
    timesteps = [int(t) for t in scheduler.timesteps]
    if timesteps != inversion_timesteps[::-1]:
        raise UserError(f"The cache at {entry.folder} was inverted with other timesteps; rerun with --force.")
    timestep_inputs = scheduler.timesteps.to(device)  # the UNet's timestep, read as a view per step
    plan = window_plan(entry, components, branches)
    extras = {window.frames: repeat_rows(added, window.frames) for window in plan.windows}  # SDXL's, per row
    texts = {window.frames: embeddings.repeat_interleave(window.frames, dim=0)  # (branches*L, 77, hidden)
             for window in plan.windows}
    predicted = tuple(name for name in branches if name != "source")  # the source branch only gives features
    stage = f"edit: {plan.passes(steps)}"
    total, done = steps * plan.frames_per_pass, 0
    report(stage, 0, total)
    anchored = any("anchor" in roles for roles in layout.roles)
    on_path_reads = "source" in branches or any(config.exact for config in configs)
    disk_features = injector is not None and feature_mode == "disk"
    feature_order = [(steps - 1 - k, index) for k in range(steps) for index in range(len(plan.windows))]
    unet = unet_for_loop(components.unet, compile_unet)
    scratch = Scratch(entry.folder.parent / SCRATCH_FOLDER) if ranks.world == 1 else None
    with temporal_attention(components.unet), torch.inference_mode(), WriteBehind() as writer, \
            FeatureStream(entry, feature_order if disk_features else [], device) as stored:
        start = entry.latent_rows(steps)  # z_T
        shape = tuple(start.shape)
        paths = [start] * len(configs)  # each edit's own latent x: a file read a window at a time
        for k, timestep in enumerate(timesteps):
            inversion_step = steps - 1 - k  # the inversion step that ran at this timestep
            anchor_in = entry.latent_rows(inversion_step + 1) if anchored else None  # z_{s+1}: every anchor's input
            on_path = entry.latent_rows(inversion_step) if on_path_reads else None  # z_s: the source's input, the correction's base
            latents_in = {"source": on_path}
            for x, roles in zip(paths, layout.roles, strict=True):
                latents_in.update({name: anchor_in if role == "anchor" else x for role, name in roles.items()})
            blends = {name: plan.rolling(whole=ranks.world > 1) for name in predicted}
            targets = [scratch.latent(f"x{number}-{k}", shape) for number in range(len(configs))] if scratch else None
            stepped: list = [None] * len(configs)
            readers = {id(reader): reader for reader in (on_path, anchor_in, *paths) if reader is not None}
            owned = [index for index in range(len(plan.windows)) if ranks.owns(index)]
            with WindowRows(readers, plan.windows, owned, device, plan.make_context) as rows:
                for index, window in enumerate(plan.windows):
                    got: dict[int, torch.Tensor] = {}
                    if ranks.owns(index):
                        control = None
                        if injector is not None:
                            control = injector.at_step(k, stored(inversion_step, index) if disk_features else None)
                        got, context = rows.take(index)  # each latent's rows of this window, read once
                        batch = torch.cat([got[id(latents_in[name])] for name in branches])  # (branches*L, 4, h, w)
                        ctx = context.at_step(k, timestep, control=control)
                        noise = unet(batch.to(components.dtype), timestep_inputs[k],
                                     encoder_hidden_states=texts[window.frames], added_cond_kwargs=extras[window.frames],
                                     cross_attention_kwargs={"ctx": ctx}).sample
                        for name, window_noise in zip(branches, noise.chunk(len(branches)), strict=True):
                            if name in blends:
                                blends[name].add(index, window_noise)
                        done += window.frames
                        report(stage, done, total)
                    ready = {name: blended.ready(index, shape[1:]) for name, blended in blends.items()}
                    for part, (lo, hi, _) in enumerate(ready[predicted[0]]):
                        eps = {name: ranks.reduce(ready[name][part][2]) for name in predicted}  # every rank's windows

                        def rows_of(reader, lo=lo, hi=hi, window=window, got=got):
                            """Frames lo .. hi of a latent: inside the window just run (`RollingBlend`), or,
                            in a torch.distributed job, the whole clip."""
                            if ranks.world == 1:
                                return got[id(reader)][lo - window.start:hi - window.start]
                            return reader[lo:hi].to(device)

                        base = rows_of(on_path) if on_path is not None else None
                        for number, (config, roles) in enumerate(zip(configs, layout.roles, strict=True)):
                            x, guided = rows_of(paths[number]), eps[roles["negative"]]
                            if "positive" in roles:
                                guided = guided + config.guidance * (eps[roles["positive"]] - guided)  # CFG
                            x_next = scheduler.step(guided, timestep, x).prev_sample
                            if config.exact:
                                anchor = roles.get("anchor", roles["negative"])  # module notes: a reconstruction
                                anchor_step = scheduler.step(eps[anchor], timestep, rows_of(latents_in[anchor])).prev_sample
                                # z + (edit step - anchor step): when the edit path is on the inversion path the
                                # bracket is exactly zero, so reconstruction lands on the cached latents bit for bit
                                x_next = base + (x_next - anchor_step)
                            if targets is not None:
                                writer.submit(partial(scratch.write, targets[number], lo, HostTensor(x_next)))
                            else:  # a torch.distributed job: the whole clip at once, kept on every rank
                                stepped[number] = x_next.cpu()
            writer.wait()  # every range of each x_{k+1} is in its file
            if targets is not None:
                stepped = [scratch.finish(target) for target in targets]
                for old in paths:
                    if old is not start:
                        scratch.remove(old)
            paths = stepped
    results = []
    for x, own_layout in zip(paths, layout.layouts, strict=True):
        frames_out = (decode_latents(components.vae, x, progress=lambda d, t: report("decode", d, t))
                      if decode and ranks.main else None)
        results.append(EditResult(stored=x, frames=frames_out, branches=own_layout, scratch=scratch))
    return results
