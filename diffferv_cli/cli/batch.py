"""`diffferv batch JOBS`: many edits (clips x presets) on Ray, every job checked before any work."""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from diffferv_cli.cli import console, err_console
from diffferv_cli.errors import UserError

JobsArg = Annotated[Path, typer.Argument(
    help="Jobs file: JSON Lines (.jsonl), CSV with a header row (.csv) or TOML [[job]] tables (.toml). A job's "
    "fields: clip, presets (a list; ';'-separated in CSV) or prompt_edit, out (a file, or a folder that is "
    "made), and any other option of `edit` under its long name with underscores (model, size, steps, frames, "
    "tau_app, cache_dir, ...).", show_default=False)]
AddressOpt = Annotated[str | None, typer.Option(
    "--address", envvar="RAY_ADDRESS", metavar="HOST:PORT", help="Ray cluster to join (HEAD:6379, or auto for one started on this "
    "machine with `ray start --head`); default: an embedded local instance sized to this machine.",
    show_default=False)]
WorkersOpt = Annotated[int | None, typer.Option(
    "--workers", min=1, metavar="N", help="Workers on CPU, each with its share of the CPUs (default 1); with GPUs, one per GPU "
    "(at most this many).", show_default=False)]
RetriesOpt = Annotated[int, typer.Option(
    "--retries", min=0, max=100, metavar="N", help="Times a job runs again after its worker died (killed, node lost); it "
    "resumes from the cache.")]
ReportOpt = Annotated[Path | None, typer.Option(
    "--report", metavar="FILE", help="Write a JSON report: every job's outputs, time, inversion and error.", show_default=False)]


def _targets(request) -> list[Path]:
    """The files one job writes: each edit's video, then the side-by-side comparisons."""
    from diffferv_cli.editing.job import output_path, side_by_side_path

    options = request.options
    labels = [label for label, _ in request.edits]
    videos = [output_path(options["clip"], label, options["out"], len(labels)) for label in labels]
    return videos + ([side_by_side_path(path) for path in videos] if options["side_by_side"] else [])


def _builder(local: bool):
    """`edit`'s own checks and configs for one job (`edit_request`), then what `edit` checks before decoding:
    the model, and the device when the instance is local (a cluster's workers have their own)."""
    from diffferv_cli.cli.edit import _check_device, edit_request
    from diffferv_cli.models.loading import check_model

    @functools.wraps(edit_request)  # a job's fields are edit_request's parameters
    def build(**options):
        request = edit_request(**options)
        check_model(options["model"])
        if local:
            _check_device(options["device"], options["dtype"])
        return request

    return build


def _make_output_folders(jobs, source: str, *, overwrite: bool) -> None:
    """Each job's output folder made and its files checked as `edit` does, once no job is left unchecked."""
    from diffferv_cli.editing.job import edit_outputs

    for job in jobs:
        options = job.options
        try:
            edit_outputs(job.clip, [label for label, _ in job.request.edits], options["out"],
                         overwrite=overwrite or options["overwrite"], side_by_side=options["side_by_side"])
        except UserError as err:
            raise UserError(f"{source} {job.where}: {err.message}") from None


class _Progress:
    """The batch's progress for people: one overall bar (jobs done of all, the time left from the UNet
    work done so far) on a terminal, timestamped lines otherwise; a line per finished job either way."""

    def __init__(self, jobs, weights: dict[int, int]):
        self.where = {job.number: job.where for job in jobs}
        self.clips = {job.number: job.clip.name for job in jobs}
        self.weights, self.total_weight = weights, max(sum(weights.values()), 1)
        self.done, self.done_weight, self.count = 0, 0, len(jobs)
        self.started = time.monotonic()
        self.bar = None

    def __enter__(self):
        if err_console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("jobs"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                TextColumn("{task.fields[left]}"), console=err_console)
            self.bar.start()
            self.task = self.bar.add_task("jobs", total=self.count, left="")
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def _say(self, text: str, style: str | None = None) -> None:
        if self.bar is None:
            text = f"{time.strftime('%H:%M:%S')} {text}"
        err_console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)

    def left(self) -> str:
        from diffferv_cli.cli.progress import duration, remaining

        seconds = remaining(time.monotonic() - self.started, self.done_weight, self.total_weight)
        return "" if seconds is None or self.done == self.count else f"{duration(seconds)} left"

    def __call__(self, event) -> None:
        head = f"{self.where[event.number]} ({self.clips[event.number]})"
        if event.kind == "retry":
            self._say(f"{head}: {event.message}", "yellow")
            return
        if event.kind != "finish":
            return
        result = event.result
        self.done += 1
        self.done_weight += self.weights.get(event.number, 0)
        if result.ok:
            inversion = f"inverted ({result.inversion_steps} steps)" if result.inversion_steps else "cached inversion"
            self._say(f"done {head}: {', '.join(result.outputs)} in {result.seconds:.1f} s, {inversion}")
        else:
            self._say(f"failed {head}: {result.error.strip() if result.bug else result.error}", "red")
        for note in result.notes:
            self._say(f"{head}: {note}")
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, left=self.left())
        else:
            left = self.left()
            self._say(f"{self.done} of {self.count} jobs finished{f', {left}' if left else ''}")


def batch_cmd(
    jobs_file: JobsArg,
    address: AddressOpt = None,
    workers: WorkersOpt = None,
    retries: RetriesOpt = 2,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing output files (and the report).")] = False,
    report: ReportOpt = None,
) -> None:
    """Run many edits (clips x presets) on Ray: every job checked first, each clip inverted once, models kept
    loaded across jobs, longest jobs first, a job whose worker dies run again from the cache. Exit code 2
    when any job failed."""
    from diffferv_cli.files import atomic_write_json
    from diffferv_cli.scale import cluster
    from diffferv_cli.scale.jobs import load_jobs

    jobs = load_jobs(jobs_file, _builder(local=not address), targets=_targets, overwrite=overwrite)
    if report is not None and report.exists() and not overwrite:
        raise UserError(f"The report {report} already exists; pass --overwrite or another --report.")
    if report is not None and not report.parent.is_dir():
        raise UserError(f"The report's folder {report.parent} does not exist.")
    _make_output_folders(jobs, jobs_file.name, overwrite=overwrite)
    groups, results, weights = cluster.plan_jobs(jobs)
    started_at, started = time.strftime("%Y-%m-%dT%H:%M:%S"), time.monotonic()
    shape = None
    with _Progress(jobs, weights) as progress:
        for failed in results:  # their clip did not probe
            progress(cluster.BatchEvent("finish", failed.number, failed))
        if groups:
            ray_started = cluster.start_ray(address)
            try:
                shape = cluster.cluster_shape(address, workers, len(groups))
                results += cluster.run_batch(groups, shape, retries=retries, events=progress)
            finally:
                cluster.stop_ray(ray_started)
    results.sort(key=lambda result: result.number)
    seconds = time.monotonic() - started
    _summary(results, seconds)
    failed = [result for result in results if not result.ok]
    if report is not None:
        atomic_write_json(report, {
            "jobs_file": str(jobs_file), "started": started_at, "seconds": round(seconds, 3),
            "ray": (shape.address or "local") if shape else None, "workers": shape.workers if shape else 0,
            "jobs": len(results), "failed": len(failed), "inversions": sum(1 for r in results if r.inversion_steps),
            "results": [result.as_dict() for result in results]})
        console.print(f"Wrote {report}")
    if failed:
        where = ", ".join(result.where for result in failed)
        raise UserError(f"{len(failed)} of {len(results)} jobs failed ({where}); the others finished.")


def _summary(results, seconds: float) -> None:
    table = Table("job", "clip", "edits", "status", "time", "inversion", "outputs / error",
                  title=f"{len(results)} jobs in {seconds:.1f} s")
    for result in results:
        inversion = f"{result.inversion_steps} steps" if result.inversion_steps else ("cached" if result.ok else "-")
        detail = "\n".join(result.outputs) if result.ok else (result.error.strip().splitlines()[-1] if result.bug
                                                              else result.error)
        attempts = f" ({result.attempts} attempts)" if result.attempts > 1 else ""
        cells = (result.where, Path(result.clip).name, ", ".join(result.edits),
                 ("ok" if result.ok else "failed") + attempts, f"{result.seconds:.1f} s", inversion, detail)
        table.add_row(*(Text(cell) for cell in cells))  # paths and messages are text, not rich markup
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("batch", epilog="Examples: diffferv batch jobs.jsonl --report report.json  |  diffferv batch "
                "jobs.toml --workers 2  |  RAY_AUTH_MODE=token diffferv batch jobs.csv --address HEAD:6379")(batch_cmd)
