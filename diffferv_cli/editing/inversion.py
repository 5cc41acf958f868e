"""DDIM inversion of a clip through the temporal UNet, cached on disk (paper 3.4, "Inversion with
Preservation Feature Caching").

    1. flow -> trajectory links on every token grid, pair by pair (cached)
    2. z_0 = VAE latent mean of every frame                 (cached, float32)
    3. for i = 0 .. T-1 (timesteps ascending):
           for each temporal window W (temporal/windows.py):
               eps_W = UNet(z_i[W], t_i, source prompt)     guidance 1, SWCFA + TTA inside W
           eps     = blend of the eps_W                     weights summing to one per frame
           z_{i+1} = DDIMInverse(eps, t_i, z_i)             (cached after each step: resumable; flushed
                                                            to the disk in group commits, `StepCommits`)
       disk feature mode also writes the step's preservation features, one file per window.

The latent fed to the UNet at step i is exactly z_i, which is what lets editing recompute the features
later instead of storing them (see sampling.py): editing runs the same windows (recorded in the cache
request), so the source branch of window W sees exactly what the inversion's pass over W saw.

One latent path for both feature modes: the UNet of every inversion step runs with a `FeatureRecorder`
(explicit cross-attention maps), keeping the features only in disk mode. The latents, and so the cache
entry shared by both modes, are therefore bit-identical whichever mode made them; disk mode adds files.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from diffusers import DDIMInverseScheduler

from diffferv_cli.config import InversionConfig
from diffferv_cli.editing.cache import (
    CacheEntry,
    cache_root,
    entry_lock,
    frames_sha256,
    link_name,
    open_entry,
)
from diffferv_cli.editing.features import FeatureRecorder
from diffferv_cli.editing.prefetch import HostTensor, WindowRows, WriteBehind, to_host
from diffferv_cli.editing.prompts import encode_conditioning, repeat_rows
from diffferv_cli.editing.vae import encode_frames, latent_channels
from diffferv_cli.errors import Interrupted, UserError
from diffferv_cli.temporal.context import AttentionContext
from diffferv_cli.temporal.install import temporal_attention
from diffferv_cli.temporal.ranks import SINGLE, Ranks
from diffferv_cli.temporal.windows import (
    NoiseBlend,
    RollingBlend,
    Window,
    blend_weights,
    schedule_from_json,
    schedule_to_json,
    window_schedule,
)

Progress = Callable[[str, int, int], None] | None

# The VAE encode runs in chunks of this many frames, each written to the cache entry when done, so an
# interrupted encode resumes at its first missing chunk. A multiple of the encode's batch: every frame is
# then encoded in the same batch of frames as in one uninterrupted pass, and z_0 is the same bits.
ENCODE_BATCH = 4
ENCODE_CHUNK_FRAMES = 32

# Group commits of the step files (`StepCommits`): at most one per this many seconds, and one at the end.
DURABLE_EVERY_S = 10.0


@dataclass
class InversionOutcome:
    entry: CacheEntry
    steps_run: int  # UNet passes this call ran (0 when the cache already held everything)


def cache_request(clip, components, config: InversionConfig, *, compile_unet: bool = False) -> dict:
    """Everything that determines the inversion's result, and nothing else: the decoded selected frames
    (hashed), the model, the settings. Feature mode is not in it: the latents are the same in both modes
    (see the module notes); disk mode only adds feature files."""
    request = {
        "frames_sha256": frames_sha256(clip.frames),
        "selection": {"start": clip.spec.start, "frames": clip.spec.frames, "stride": clip.spec.stride,
                      "indices": list(clip.frame_indices)},
        "working_size": list(clip.geometry.working_size),
        **components.identity,  # the weights, and their schedule and text layer when not the defaults
        "unet_dtype": str(components.dtype).removeprefix("torch."),
        "prompt": config.prompt,
        "steps": config.steps,
        "temporal": config.temporal.model_dump(),
        "flow": config.flow_preset,
        "windows": schedule_to_json(clip_windows(len(clip.frames), config)),
    }
    if clip.spec.region is not None:  # only when set, so that whole-frame keys stay as they were
        request["region"] = list(clip.spec.region)
    if compile_unet:  # a compiled UNet rounds differently (~1e-6): its latents are another entry's, never mixed
        request["compile"] = True
    return request


def clip_windows(frames: int, config: InversionConfig) -> list[Window]:
    return window_schedule(frames, config.window_frames, config.overlap)


def latent_size(clip, components) -> tuple[int, int]:
    width, height = clip.geometry.working_size
    return height // components.vae_scale_factor, width // components.vae_scale_factor


def attention_levels(unet) -> int:
    return len(unet.config.block_out_channels)


def attention_grids(unet, size: tuple[int, int]) -> list[tuple[int, int]]:
    """The token grids on which the UNet has self-attention, so the only ones that need trajectories: the
    levels whose down block attends (SD 1.x/2.x: all but the last; SDXL: all but the first), and the
    last level's when the mid block attends."""
    from diffferv_cli.temporal.trajectories import token_grids

    grids = token_grids(size, attention_levels(unet))
    attends = ["CrossAttn" in kind for kind in unet.config.down_block_types]
    attends[-1] = attends[-1] or "CrossAttn" in (unet.config.get("mid_block_type") or "UNetMidBlock2DCrossAttn")
    return [grid for grid, attention in zip(grids, attends, strict=True) if attention]


@dataclass
class WindowPlan:
    """The temporal windows of every UNet pass over a cached clip, built once per run: per window its
    frames and blending weights, and `make_context(k)`, window k's attention context (the clip's
    trajectories cut to it, read from the cache's links). Contexts are made for each pass, ahead of it
    in the reader thread (`prefetch.WindowRows`), and dropped after it: keeping them would hold memory
    in proportion to the clip (a few MB a window, in allocations the heap does not give back), and making
    one costs little next to the window's UNet call."""

    frames: int
    windows: list[Window]
    weights: list[torch.Tensor]
    make_context: Callable[[int], AttentionContext]

    def blend(self, shape_of_frame: tuple[int, ...]) -> NoiseBlend:
        return NoiseBlend(self.windows, self.weights, (self.frames, *shape_of_frame))

    def rolling(self, *, whole: bool = False) -> RollingBlend:
        return RollingBlend(self.windows, self.weights, self.frames, whole=whole)

    def passes(self, steps: int) -> str:
        count = len(self.windows)
        return f"{steps} steps × {count} window{'s' if count != 1 else ''}"

    @property
    def frames_per_pass(self) -> int:
        return sum(window.frames for window in self.windows)


def window_plan(entry: CacheEntry, components, branches: tuple[str, ...]) -> WindowPlan:
    request, frames = entry.manifest["request"], int(entry.manifest["frames"])
    temporal = request["temporal"]
    windows = schedule_from_json(request["windows"])
    links = entry.trajectory_rows() if temporal["tta"] else None

    def make_context(index: int) -> AttentionContext:
        window = windows[index]
        trajectories = links.window(window.start, window.stop).to(components.device) if links else None
        return AttentionContext(frames=window.frames, branches=branches,
                                latent_size=tuple(entry.manifest["latent_size"]), trajectories=trajectories,
                                window=temporal["window"], swcfa=temporal["swcfa"], tta=temporal["tta"])

    weights = [weight.to(components.device) for weight in blend_weights(windows, frames)]
    return WindowPlan(frames, windows, weights, make_context)


def unet_for_loop(unet, compile_unet: bool = False):
    """The UNet as the step loops call it: itself, or `torch.compile(unet)` (one graph for every step of a
    run: nothing a step changes is read as a Python value inside the call)."""
    return torch.compile(unet, dynamic=False) if compile_unet else unet


def inverse_scheduler(components, steps: int) -> DDIMInverseScheduler:
    scheduler = DDIMInverseScheduler.from_config(components.scheduler_config)
    scheduler.set_timesteps(steps)
    return scheduler


def invert(components, clip, config: InversionConfig, *, cache_dir=None, force: bool = False,
           progress: Progress = None, compile_unet: bool = False, ranks: Ranks = SINGLE) -> InversionOutcome:
    """Invert `clip` (or resume / reuse its cached inversion) and return the cache entry. Holds the
    entry's lock meanwhile: a concurrent run on the same entry waits, then reuses the result.

    The step loop keeps the latents on the device; cache reads run ahead of it and writes behind it in
    background threads (editing/prefetch.py). `compile_unet`: run the UNet through `torch.compile`.
    `ranks`: the processes of a torch.distributed job sharing this clip (temporal/ranks.py): rank 0 takes
    the lock, computes the flow and the encode and writes the cache; every rank runs its windows of each
    UNet pass."""
    report = progress or (lambda stage, done, total: None)
    request = cache_request(clip, components, config, compile_unet=compile_unet)
    root = cache_root(cache_dir)
    if ranks.world > 1 and config.feature_mode == "disk":
        raise UserError("--features disk runs in one process; drop it (or the launcher's extra ranks).")
    if not ranks.main:
        ranks.barrier()  # rank 0 has prepared the entry (or found it finished)
        entry = open_entry(root, request)
        ran = _run(components, clip, config, entry, report, compile_unet, ranks) if ranks.share(None) else 0
        ranks.barrier()  # rank 0 has committed every step
        return InversionOutcome(open_entry(root, request), ran)  # the manifest as rank 0 left it
    with entry_lock(root, request):
        entry = open_entry(root, request, force=force)
        try:
            ran = _run(components, clip, config, entry, report, compile_unet, ranks)
        except KeyboardInterrupt:
            raise Interrupted(kept_work(entry)) from None
        ranks.barrier()  # the followers are done with the entry before its lock goes
    return InversionOutcome(entry, ran)


def kept_work(entry: CacheEntry) -> str | None:
    """What an interrupted inversion left in `entry` for the next run, as a clause ("the flow and 120 of
    472 encoded frames are kept"); None when nothing."""
    manifest = entry.manifest
    kept = ["the flow"] if "trajectories.safetensors" in manifest.get("files", {}) else []
    if manifest.get("encoded"):
        kept.append("the encoded frames")
        if entry.finished_steps > 0:
            kept.append(f"{entry.finished_steps} of {entry.steps} inversion steps")
    elif manifest.get("encoded_frames"):
        kept.append(f"{manifest['encoded_frames']} of {manifest.get('frames', '?')} encoded frames")
    if not kept:
        return None
    return kept_clause(kept, plural=len(kept) > 1 or kept[0] != "the flow")


def kept_clause(items: list[str], plural: bool) -> str:
    """"a, b and c are kept" (or "a is kept")."""
    listed = ", ".join(items[:-1]) + " and " + items[-1] if len(items) > 1 else items[0]
    return f"{listed} {'are' if plural else 'is'} kept"


def _run(components, clip, config: InversionConfig, entry: CacheEntry, report, compile_unet: bool,
         ranks: Ranks = SINGLE) -> int:
    """The inversion steps `entry` lacks (all, some after an interruption, or none); UNet passes run.
    Rank 0 prepares (flow, encode, roll-back) and writes; the other ranks, which call this after rank 0's
    preparation, only run their windows."""
    manifest = entry.manifest
    want_features = config.feature_mode == "disk"
    if ranks.main:
        needed = not (entry.complete and (entry.has_features or not want_features))
        if needed:
            _prepare(components, clip, config, entry, report)
        if ranks.world > 1:
            ranks.barrier()
            ranks.share(needed)
        if not needed:
            return 0
    size = tuple(manifest["latent_size"])
    start = entry.finished_steps
    if want_features:  # features must cover every step from 0: recompute the missing ones
        start = min(start, int(manifest.get("feature_steps", 0)))
    return _steps(components, config, entry, report, compile_unet, ranks, size, start)


def _prepare(components, clip, config: InversionConfig, entry: CacheEntry, report) -> None:
    """Flow and trajectories, then the VAE encode (in chunks a resume keeps), then the roll-back of the
    steps a power cut may have lost: what the steps need, each done once, each one pass over the frames
    that holds a few of them (a pair for the flow, a chunk for the encode) and writes as it goes."""
    from diffferv_cli.temporal.flow import DISFlow, flow_pairs
    from diffferv_cli.temporal.trajectories import link_pairs

    manifest = entry.manifest
    manifest.setdefault("source", {"path": str(clip.info.path)})
    frames = len(clip.frames)
    size = latent_size(clip, components)
    if "trajectories.safetensors" not in manifest["files"]:
        grids = attention_grids(components.unet, size)
        with entry.trajectory_writer(grids, frames) as writer:
            pairs = 0
            for pair, rows in enumerate(link_pairs(flow_pairs(clip.frames, DISFlow(config.flow_preset)), grids)):
                for grid, row in rows.items():
                    writer.write(link_name(grid), pair, row[None])
                pairs = pair + 1
                report("flow", pairs, frames - 1)
            if pairs != frames - 1:
                raise UserError(f"Only {pairs + 1} of the {frames} frames of {clip.info.path} could be decoded "
                                "again; the file may have changed.")
            writer.finish(durable=True)
        manifest.update(latent_size=list(size), frames=frames, geometry=_geometry_dict(clip))
        entry.save_manifest()

    if not manifest.get("encoded"):
        starts = list(range(0, frames, ENCODE_CHUNK_FRAMES))
        with entry.latent_writer(0, (frames, latent_channels(components.vae), *size)) as writer:
            for start, latents in _encoded_chunks(components.vae, clip.frames, entry, report):
                writer.write("latent", start, latents)
            writer.finish(durable=True)
        manifest.update(encoded=True, finished_steps=0, feature_steps=0, features_stored=False)
        manifest.pop("encoded_frames", None)
        entry.drop([entry.encoded_name(start) for start in starts])  # saves the manifest

    roll_back_unverified(entry)  # a resume after a power cut: keep only the steps whose files hold


def _steps(components, config: InversionConfig, entry: CacheEntry, report, compile_unet: bool, ranks: Ranks,
           size: tuple[int, int], start: int) -> int:
    """Steps `start` .. T-1 of the inversion; rank 0 writes each step's latent (and features).

    A step sweeps the windows in order: each window's z_i is read from the cache, its noise predicted
    and added to a `RollingBlend`, and the frames no later window sees are stepped at once and written
    to z_{i+1}'s file; memory holds the open windows, never the clip (a torch.distributed job blends the
    whole clip before stepping: its ranks' windows are summed in one all-reduce)."""
    manifest = entry.manifest
    want_features = config.feature_mode == "disk"
    steps = config.steps
    scheduler = inverse_scheduler(components, steps)
    timesteps = [int(t) for t in scheduler.timesteps]
    manifest["timesteps"] = timesteps
    timestep_inputs = scheduler.timesteps.to(components.device)  # the UNet's timestep, read as a view per step
    pixels = tuple(side * components.vae_scale_factor for side in size)  # (height, width) of the working frames
    prompt, added = encode_conditioning(components, [config.prompt], pixels)  # (1, 77, hidden); SDXL's extras
    # the same control in both modes, so that both compute the same latents (module notes)
    recorder = FeatureRecorder(dtype=components.dtype, keep=want_features)
    plan = window_plan(entry, components, ("source",))
    texts = {window.frames: prompt.repeat(window.frames, 1, 1) for window in plan.windows}  # (L, 77, hidden)
    extras = {window.frames: repeat_rows(added, window.frames) for window in plan.windows}
    # features added to a finished inversion follow the cached path (the latents recompute mode feeds)
    finished = entry.finished_steps  # the writer thread owns the manifest during the loop
    unet = unet_for_loop(components.unet, compile_unet)
    stage = f"invert: {plan.passes(steps - start)}" + (f" (from step {start})" if start else "")
    total = (steps - start) * plan.frames_per_pass
    report(stage, 0, total)
    device = components.device
    ran = done = 0
    with temporal_attention(components.unet), torch.inference_mode(), WriteBehind() as writer:
        commits = StepCommits(entry)
        kept = None  # a torch.distributed job's z_step, whole on every rank (the file is rank 0's to write)
        digest = None  # the hash of z_step when this run wrote it (the writer thread names it in the manifest)
        for step in range(start, steps):
            # z_step, read a window at a time
            source = kept if kept is not None else entry.latent_rows(step, digest)
            stepping = step + 1 > finished
            target = entry.latent_writer(step + 1, tuple(source.shape)) if stepping and ranks.main else None
            blended = plan.rolling(whole=ranks.world > 1)
            owned = [index for index in range(len(plan.windows)) if ranks.owns(index)]
            try:
                with WindowRows({"z": source}, plan.windows, owned, device, plan.make_context) as rows:
                    for index, window in enumerate(plan.windows):
                        if ranks.owns(index):
                            recorder.reset()
                            got, context = rows.take(index)
                            ctx = context.at_step(step, timesteps[step], control=recorder)
                            latent = got["z"]
                            noise = unet(latent.to(components.dtype), timestep_inputs[step],
                                         encoder_hidden_states=texts[window.frames],
                                         added_cond_kwargs=extras[window.frames], cross_attention_kwargs={"ctx": ctx}).sample
                            blended.add(index, noise)
                            if want_features and ranks.main:
                                writer.submit(partial(commits.write_features, step, index, to_host(recorder.features)))
                            done += window.frames
                            report(stage, done, total)
                        if not stepping:
                            continue
                        for lo, hi, eps in blended.ready(index, source.shape[1:]):
                            eps = ranks.reduce(eps)  # a whole clip of every rank's windows (a no-op in one process)
                            # the frames finished after window k lie inside it (`RollingBlend`); a
                            # torch.distributed job steps the whole clip at once
                            base = (latent[lo - window.start:hi - window.start] if ranks.world == 1
                                    else source[lo:hi].to(device))
                            latent_next = scheduler.step(eps, timesteps[step], base).prev_sample  # z_{step+1}
                            if target is not None:
                                writer.submit(partial(_write_rows, target, lo, HostTensor(latent_next)))
                            if ranks.world > 1:
                                kept = latent_next.cpu()
                writer.wait()  # every range of z_{step+1} is in its file
                digest = target.finish(record=False) if target is not None else None
            except BaseException:
                if target is not None:
                    writer.wait_quietly()
                    target.abort()
                raise
            if ranks.main:
                writer.submit(partial(commits.finish_step, step, digest, want_features))
            ran += 1
    if ranks.main:
        commits.commit()  # the last group commit: every file of the run, then the manifest, durably
    return ran


def _write_rows(target, start: int, rows: HostTensor) -> None:
    target.write("latent", start, rows.get())


def _encoded_chunks(vae, frames, entry: CacheEntry, report):
    """z_0 a chunk of ENCODE_CHUNK_FRAMES frames at a time, (first frame, latents): the chunks an earlier
    run left in `entry` read back, then the rest encoded in one pass over the frames from the first one
    missing, each written to `entry` (`encoded_frames` in the manifest: the frames encoded so far)."""
    from diffferv_cli.video.io import frame_chunks

    count = len(frames)
    resume = 0
    for start in range(0, count, ENCODE_CHUNK_FRAMES):
        stop = min(start + ENCODE_CHUNK_FRAMES, count)
        if not entry.holds(entry.encoded_name(start)):
            break
        kept = entry.read_encoded(start)
        if len(kept) != stop - start:  # written with another chunk size: encoded again from here
            break
        report("encode", stop, count)
        yield start, kept
        resume = stop
    for start, chunk in frame_chunks(frames, ENCODE_CHUNK_FRAMES, resume):
        latents = encode_frames(vae, chunk, batch=ENCODE_BATCH,
                                progress=lambda done, _, start=start: report("encode", start + done, count))
        entry.write_encoded(start, latents, durable=False)  # durable with z_0 (a lost chunk is encoded again)
        entry.manifest["encoded_frames"] = start + len(chunk)
        entry.save_manifest(durable=False)
        yield start, latents


class StepCommits:
    """Writer thread: each step's files without fsync, then group commits (`CacheEntry.make_durable`) at
    most every `DURABLE_EVERY_S` seconds and at the end (`commit()`). Killing the process loses nothing
    (the page cache holds every renamed file); a power cut loses at most the steps after `durable_steps`,
    which a resume checks (`roll_back_unverified`)."""

    def __init__(self, entry: CacheEntry):
        self.entry = entry
        self.pending: list[str] = []
        self.last = time.monotonic()

    def write_features(self, step: int, window: int, features: dict) -> None:
        """Step `step`'s features of window `window`, written as soon as the window ran."""
        self.entry.write_features(step, {name: tensor.get() for name, tensor in features.items()}, window=window,
                                  durable=False)
        self.pending.append(self.entry.feature_name(step, window))

    def finish_step(self, step: int, latent_sha256: str | None, features_written: bool) -> None:
        """Step `step` done: its output latent z_{step+1} (renamed into place by the loop, with this hash)
        and features are on disk; the manifest that names them is saved (atomic rename; durable with the
        next group commit). The writer thread alone changes the manifest while the loop runs."""
        entry, manifest = self.entry, self.entry.manifest
        if latent_sha256 is not None:
            manifest["files"][entry.latent_name(step + 1)] = latent_sha256
            self.pending.append(entry.latent_name(step + 1))
        if features_written:
            manifest["feature_steps"] = step + 1
        manifest["finished_steps"] = max(entry.finished_steps, step + 1)
        manifest["features_stored"] = int(manifest.get("feature_steps", 0)) >= entry.steps
        if time.monotonic() - self.last >= DURABLE_EVERY_S:
            self.commit()
        else:
            entry.save_manifest(durable=False)

    def commit(self) -> None:
        """Flush the files written since the last commit, then the manifest (with `durable_steps`)."""
        manifest = self.entry.manifest
        manifest["durable_steps"] = self.entry.finished_steps
        manifest["durable_feature_steps"] = int(manifest.get("feature_steps", 0))
        self.entry.make_durable(self.pending)
        self.pending, self.last = [], time.monotonic()


def roll_back_unverified(entry: CacheEntry) -> None:
    """Before resuming: the steps after the last group commit are kept only up to the first whose file is
    missing or fails its hash (what a power cut can leave); the manifest then says so."""
    manifest = entry.manifest
    durable = int(manifest.get("durable_steps", 0))
    finished = entry.finished_steps
    step = max(min(durable, finished), 0)  # never past what the manifest claims
    while step < finished and entry.holds(entry.latent_name(step + 1)):
        step += 1
    features = int(manifest.get("feature_steps", 0))
    feature_step = min(int(manifest.get("durable_feature_steps", 0)), features)
    windows = len(schedule_from_json(manifest["request"]["windows"])) if features else 0
    while feature_step < features and all(entry.holds(entry.feature_name(feature_step, window))
                                          for window in range(windows)):
        feature_step += 1
    if (step, feature_step) != (finished, features):
        manifest.update(finished_steps=step, feature_steps=feature_step,
                        features_stored=feature_step >= entry.steps)
        entry.save_manifest()


def _geometry_dict(clip) -> dict:
    geometry = clip.geometry
    return {"source_size": list(geometry.source_size), "working_size": list(geometry.working_size),
            "scaled_size": list(geometry.scaled_size), "crop": list(geometry.crop),
            "region": None if clip.spec.region is None else list(clip.spec.region)}
