"""Many edit jobs on Ray (`diffferv batch`): warm workers, one inversion per clip, retries, progress.

* **Where.** With no address, an embedded local Ray instance sized to this machine (its CPUs, every
  GPU; no dashboard); with one (`--address`, `RAY_ADDRESS`, `auto`), an existing cluster
  (`ray start --head` / `ray start --address HEAD:6379`). Every node needs diffferv installed and the
  clips, the outputs and the cache folder at the same paths (shared storage).
* **Workers.** One long-lived actor per GPU (`num_gpus=1` each), or on CPU `workers` actors splitting
  the CPUs between them (default 1). A worker loads each model once (by model and model options) and
  keeps it warm across jobs; it also keeps the clip it decoded last.
* **Order.** Jobs sharing an inversion form a group (`jobs.plan`) that one worker runs in turn: the first
  job inverts the clip into the content-addressed cache, the others edit from the cached inversion.
  Groups start longest first (estimated UNet work: frames x steps x branches, `job.job_plan`).
* **Failures.** A job whose input turns out bad (a `UserError`: an unreadable clip, a missing model)
  fails alone with its sentence; a bug fails alone with its traceback. A worker that dies (killed, its
  node lost) is replaced by a new actor and its job runs again, up to `retries` times: the cache's per-
  entry file lock keeps two workers off one entry and its resumability restarts the inversion from the
  last finished step, so the output equals an uninterrupted run.
* **Progress** comes as `BatchEvent`s to a callback; the CLI renders them (rich lives there only).

Outputs were checked by `jobs.check_outputs` before any work, so a worker writes them with overwrite on:
a job run again after its worker died may find the file its first run wrote.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from diffferv_cli.errors import UserError
from diffferv_cli.scale.jobs import Group, Job

DEFAULT_RETRIES = 2
MODELS_KEPT = 2  # warm models per worker (one model per job set is the common case)


@dataclass(frozen=True)
class Task:
    """One job as a worker runs it. `inverts`: the group's first job (the only one that honours `force`)."""

    number: int
    request: Any  # cli.edit.EditRequest: the options and the configs built from them
    cache_root: Path
    inverts: bool = True


@dataclass
class JobResult:
    """What became of one job (also a row of the report)."""

    number: int
    where: str = ""
    clip: str = ""
    edits: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    error: str | None = None
    bug: bool = False  # the error is a traceback, not a sentence
    seconds: float = 0.0  # the job's run on its worker (last attempt)
    inversion_steps: int = 0  # UNet passes of the inversion this job ran (0: the cache had it)
    cache_entry: str | None = None
    worker: str | None = None  # host:pid of the worker that ran it
    attempts: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


@dataclass(frozen=True)
class BatchEvent:
    """`kind`: "start" (a worker took job `number`), "finish" (`result` is final), "retry" (its worker
    died; `message` says why, the job runs again)."""

    kind: str
    number: int
    result: JobResult | None = None
    message: str = ""
    worker: str | None = None


Events = Callable[[BatchEvent], None] | None


# -- planning ---------------------------------------------------------------------------------------
def inversion_key(job: Job) -> tuple:
    """Jobs with equal keys share one cache entry (the same frames, model and inversion settings)."""
    request, options = job.request, job.options
    return (str(job.clip.resolve()), request.spec, request.inversion, options["model"], options["prediction_type"],
            options["clip_skip"], tuple(request.loras), options["device"], options["dtype"], options["region"],
            str(options["cache_dir"]))


def frame_count(job: Job) -> int:
    """How many frames the job works on, from a probe of its clip (no frame decoded); UserError when the
    clip is not a readable video or its selection is empty."""
    from diffferv_cli.video.geometry import frame_selection
    from diffferv_cli.video.probe import probe

    info = probe(job.clip)
    return len(frame_selection(info.frame_count, job.request.spec, name=job.clip.name))


def job_weight(job: Job, frames: int, inverts: bool) -> int:
    """The job's UNet work (frame rows through the UNet), its inversion counted only when it inverts."""
    from diffferv_cli.editing.job import job_plan

    planned = job_plan(frames, (0, 0), job.request.inversion, job.request.edits)
    return planned.units - (0 if inverts else planned.runs[0].units)


def plan_jobs(jobs: Sequence[Job]) -> tuple[list[Group], list[JobResult], dict[int, int]]:
    """Groups in the order they run, the jobs that failed already (their clip did not probe), and each
    runnable job's weight by number."""
    from diffferv_cli.scale.jobs import plan

    frames, failed = {}, []
    for job in jobs:
        try:
            frames[job.number] = frame_count(job)
        except UserError as err:
            failed.append(JobResult(job.number, job.where, str(job.clip), labels(job), error=err.message))
    runnable = [job for job in jobs if job.number in frames]
    weights: dict[int, int] = {}

    def weight(job: Job, inverts: bool) -> int:
        weights[job.number] = job_weight(job, frames[job.number], inverts)
        return weights[job.number]

    return plan(runnable, inversion_key, weight), failed, weights


def labels(job: Job) -> list[str]:
    return [label for label, _ in job.request.edits]


# -- the worker ---------------------------------------------------------------------------------------
class BatchWorker:
    """A long-lived worker (a Ray actor): runs jobs one at a time, models kept loaded between them."""

    def __init__(self, threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.models: dict[tuple, Any] = {}
        self.clip: tuple[tuple, Any] | None = None  # (key, decoded clip) of the last job

    def name(self) -> str:
        import socket

        return f"{socket.gethostname()}:{os.getpid()}"

    def run(self, task: Task) -> JobResult:
        request = task.request
        result = JobResult(task.number, clip=str(request.options["clip"]), edits=[label for label, _ in request.edits],
                           worker=self.name())
        started = time.monotonic()
        try:
            self._run(task, result)
        except UserError as err:
            result.error = err.message
        except Exception:  # a bug: this job fails with its traceback, the batch goes on
            result.error, result.bug = traceback.format_exc(), True
        result.seconds = time.monotonic() - started
        return result

    def _run(self, task: Task, result: JobResult) -> None:
        from diffferv_cli.editing.job import run_edits

        request, options = task.request, task.request.options
        clip = self._clip(request, result)
        components = self._model(request)
        outcome, written = run_edits(
            components, clip, request.inversion, request.edits, cache_dir=task.cache_root,
            force=options["force"] and task.inverts, out=options["out"], overwrite=True,
            side_by_side=options["side_by_side"], composite=request.composite, lossless=options["lossless"],
            compile_unet=options["compile_unet"])
        result.outputs = [str(path) for path in written]
        result.inversion_steps = outcome.steps_run
        result.cache_entry = str(outcome.entry.folder)

    def _clip(self, request, result: JobResult):
        from diffferv_cli.editing.region import parse_region, resolve_region
        from diffferv_cli.video.io import read_clip

        options = request.options
        key = (str(Path(options["clip"]).resolve()), request.spec, options["region"])
        if self.clip is None or self.clip[0] != key:
            self.clip = None  # the previous clip's frames go before the next are decoded
            spec, note = resolve_region(options["clip"], request.spec, parse_region(options["region"]))
            if note:
                result.notes.append(note)
            self.clip = (key, read_clip(options["clip"], spec))
        return self.clip[1]

    def _model(self, request):
        from diffferv_cli.models.loading import check_model, load_components

        options = request.options
        key = (options["model"], options["device"], options["dtype"], options["prediction_type"],
               options["clip_skip"], tuple(request.loras))
        if key not in self.models:
            check_model(options["model"])
            while len(self.models) >= MODELS_KEPT:
                self.models.pop(next(iter(self.models)))
            self.models[key] = load_components(options["model"], device=options["device"], dtype=options["dtype"],
                                               prediction_type=options["prediction_type"],
                                               clip_skip=options["clip_skip"], loras=request.loras)
        return self.models[key]


# -- the driver -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cluster:
    """The Ray instance a batch runs on and its workers' shape."""

    address: str | None  # None: the embedded local instance
    workers: int
    gpus_per_worker: float
    cpus_per_worker: float
    threads: int | None  # torch threads of a CPU worker


def machine_size() -> tuple[int, int]:
    """(CPUs this process may use, CUDA GPUs)."""
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cpus, torch.cuda.device_count() if torch.cuda.is_available() else 0


def start_ray(address: str | None) -> bool:
    """Join the cluster at `address`, or start the embedded local instance; whether this call started Ray
    (and so must shut it down)."""
    try:
        import ray
    except ModuleNotFoundError:
        raise UserError("diffferv batch needs Ray: pip install 'ray>=2.9' (make install installs it).") from None
    if ray.is_initialized():
        return False
    quiet = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    if address:
        try:
            ray.init(address=address, **{key: value for key, value in quiet.items() if key != "include_dashboard"})
        except (ConnectionError, ValueError, RuntimeError) as err:
            raise UserError(f"Cannot join the Ray cluster at {address} ({err}); start one with `ray start --head`, "
                            "set RAY_AUTH_MODE=token when it uses token authentication (Ray's default), or leave "
                            "out --address for a local instance.") from None
        return True
    cpus, gpus = machine_size()
    os.environ.pop("RAY_ADDRESS", None)  # an empty RAY_ADDRESS would make ray.init look for a cluster
    # its note that the local instance uses token authentication (the default) is not for our users
    ray_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = ray_log.level
    ray_log.setLevel(logging.ERROR)
    try:
        ray.init(num_cpus=cpus, num_gpus=gpus, **quiet)
    finally:
        ray_log.setLevel(level)
    return True


def cluster_shape(address: str | None, workers: int | None, jobs: int) -> Cluster:
    """One worker per GPU of the instance, else `workers` CPU workers (default 1), never more than `jobs`."""
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), max(int(resources.get("CPU", 1)), 1)
    if gpus:
        count = max(min(workers or gpus, gpus, jobs), 1)
        return Cluster(address, count, 1, 1, None)
    count = max(min(workers or 1, jobs), 1)
    share = max(cpus // count, 1)
    return Cluster(address, count, 0, share, share)


def run_batch(groups: Sequence[Group], cluster: Cluster, *, retries: int = DEFAULT_RETRIES,
              events: Events = None) -> list[JobResult]:
    """Run every group on the started Ray instance (`start_ray`); the results in job order."""
    import ray
    from ray.exceptions import RayActorError

    from diffferv_cli.editing.cache import cache_root

    say = events or (lambda event: None)
    remote_worker = ray.remote(BatchWorker)

    def new_worker():
        return remote_worker.options(num_cpus=cluster.cpus_per_worker, num_gpus=cluster.gpus_per_worker,
                                     max_restarts=0).remote(cluster.threads)

    queue = [list(group.jobs) for group in groups]  # groups not started yet, longest first
    slots: list[dict] = [{"actor": new_worker(), "jobs": [], "name": None} for _ in range(cluster.workers)]
    attempts: dict[int, int] = {}
    results: dict[int, JobResult] = {}
    running: dict[Any, tuple[dict, Job, bool]] = {}  # object ref -> (slot, job, inverts)

    def submit(slot: dict) -> None:
        if not slot["jobs"] and queue:
            slot["jobs"] = [(job, index == 0) for index, job in enumerate(queue.pop(0))]
        if not slot["jobs"]:
            return
        job, inverts = slot["jobs"].pop(0)
        attempts[job.number] = attempts.get(job.number, 0) + 1
        task = Task(job.number, _portable(job.request), cache_root(job.options["cache_dir"]).resolve(), inverts)
        running[slot["actor"].run.remote(task)] = (slot, job, inverts)
        say(BatchEvent("start", job.number, worker=slot["name"]))

    for slot in slots:
        submit(slot)
    try:
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            slot, job, inverts = running.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except RayActorError as err:
                ray.kill(slot["actor"], no_restart=True)
                slot["actor"], slot["name"] = new_worker(), None
                reason = _death(err)
                if attempts[job.number] <= retries:
                    slot["jobs"].insert(0, (job, inverts))
                    say(BatchEvent("retry", job.number, message=f"its worker died ({reason}); running it again "
                                   f"(attempt {attempts[job.number] + 1} of {retries + 1}), from the cache"))
                else:
                    result = JobResult(job.number, job.where, str(job.clip), labels(job),
                                       error=f"its worker died {attempts[job.number]} times ({reason}).",
                                       attempts=attempts[job.number])
                    results[job.number] = result
                    say(BatchEvent("finish", job.number, result))
                submit(slot)
                continue
            result.where, result.attempts = job.where, attempts[job.number]
            slot["name"] = result.worker
            results[job.number] = result
            say(BatchEvent("finish", job.number, result))
            submit(slot)
    finally:
        for slot in slots:
            ray.kill(slot["actor"], no_restart=True)
    return [results[number] for number in sorted(results)]


def _portable(request):
    """`request` with the paths a worker opens made absolute: a worker's folder is not the driver's."""
    import dataclasses

    options = dict(request.options)
    for name in ("clip", "out"):
        if options[name] is not None:
            options[name] = Path(options[name]).expanduser().absolute()
    model = Path(options["model"]).expanduser()
    if model.exists():  # a local folder or file, not a hub id
        options["model"] = str(model.absolute())
    loras = [(Path(path).expanduser().absolute(), scale) for path, scale in request.loras]
    return dataclasses.replace(request, options=options, loras=loras)


def _death(err: Exception) -> str:
    """A short reason from Ray's actor-death error (whose message runs over many lines)."""
    import re

    text = " ".join(str(err).split())
    exit_type = re.search(r"Worker exit type: (\w+)", text)
    return f"Ray says {exit_type.group(1)}" if exit_type else err.__class__.__name__


def stop_ray(started: bool) -> None:
    if started:
        import ray

        ray.shutdown()
