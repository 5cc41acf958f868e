"""A job's progress for people: the library's `(stage, done, total)` callbacks as rich bars on a terminal,
or as plain timestamped lines when stderr is not one (a pipe, nohup, CI).

Both say first what the whole command will do (`job.JobPlan.describe`: frames, size, steps, windows,
edits), once the clip's frame count is known and before it is decoded; then, from the first UNet pass
on, how long the whole command has left: the time since the first UNet report times the UNet work left
over the work done, counted in frame rows through the UNet (`PlannedRun.units`). Stages between UNet
loops (decoding, writing) count in that time, so the estimate carries them along in proportion.

Speed and ETA of every bar are its own done / elapsed, not rich's default estimate, which looks at the
last 30 s only and shows nothing when one update (one window pass) takes longer than that.

Lines mode prints a line at the first UNet pass, at the end of every stage and otherwise at most every
$DIFFFERV_PROGRESS_EVERY seconds (default 30; 0 prints every report).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

EVERY_ENV = "DIFFFERV_PROGRESS_EVERY"
DEFAULT_EVERY_S = 30.0


def duration(seconds: float) -> str:
    """1:02:03 (hours:minutes:seconds)."""
    whole = max(int(round(seconds)), 0)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def remaining(elapsed: float | None, done: float, total: float) -> float | None:
    """Time left at the pace so far; None before the first unit of work."""
    if not elapsed or done <= 0:
        return None
    return elapsed * max(total - done, 0) / done


class WorkTracker:
    """Where the command stands in its plan (`job.JobPlan`): each UNet loop's units done, from the reports
    whose stage head is the loop's name ("invert", "edit age (2 of 3)"). A loop that never reports before
    a later one starts was skipped (an inversion found in the cache) and leaves the total."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.plan = None
        self.clock = clock
        self.reported: dict[str, tuple[int, int]] = {}  # run name -> (units done, units in all)
        self.started: float | None = None  # first UNet report

    def update(self, stage: str, done: int, total: int) -> bool:
        """Count a report; whether it was one of the plan's UNet loops."""
        names = [run.name for run in self.plan.runs] if self.plan else []
        head = stage.partition(":")[0]
        if head not in names:
            return False
        position = names.index(head)
        for skipped in names[:position]:
            self.reported.setdefault(skipped, (0, 0))
        branches = self.plan.runs[position].branches
        self.reported[head] = (done * branches, total * branches)
        if self.started is None:
            self.started = self.clock()
        return True

    @property
    def done(self) -> int:
        return sum(done for done, _ in self.reported.values())

    @property
    def total(self) -> int:
        return sum(self.reported[run.name][1] if run.name in self.reported else run.units for run in self.plan.runs)

    def left(self) -> float | None:
        """Seconds the whole command has left, None before its first UNet pass."""
        if self.started is None:
            return None
        return remaining(self.clock() - self.started, self.done, self.total)


class _Count(ProgressColumn):
    def render(self, task) -> Text:
        if task.fields.get("overall"):
            return Text(f"{task.percentage:.0f}%")
        return Text(f"{task.completed:.0f}/{task.total:.0f}")


class _Speed(ProgressColumn):
    """Frames (frame pairs for flow, frame passes through the UNet for invert/edit) per second."""

    def render(self, task) -> Text:
        if task.fields.get("overall") or not task.elapsed or not task.completed:
            return Text("")
        return Text(f"{task.completed / task.elapsed:.2f} frames/s")


class _Left(ProgressColumn):
    def render(self, task) -> Text:
        if task.finished:
            return Text("done")
        left = remaining(task.elapsed, task.completed, task.total or 0)
        return Text("-:--:-- left" if left is None else f"{duration(left)} left")


class _Bars:
    """Rich bars: one per stage, and one for the whole command once its plan is known."""

    def __init__(self, bars: Progress, plan_of):
        self.bars, self.plan_of, self.work = bars, plan_of, WorkTracker()
        self.tasks: dict[str, int] = {}
        self.overall: int | None = None

    def clip_known(self, frames: int, working_size: tuple[int, int]) -> None:
        if self.plan_of is None:
            return
        self.work.plan = self.plan_of(frames, working_size)
        self.bars.console.print(f"Work: {self.work.plan.describe()}", markup=False, highlight=False, soft_wrap=True)
        self.overall = self.bars.add_task("whole command", total=self.work.plan.units, start=False, overall=True)

    def __call__(self, stage: str, done: int, total: int) -> None:
        bars = self.bars
        if stage not in self.tasks or (done <= 1 and bars.tasks[self.tasks[stage]].finished):
            self.tasks[stage] = bars.add_task(stage, total=total)
        bars.update(self.tasks[stage], completed=done, total=total)
        if self.work.update(stage, done, total) and self.overall is not None:
            if bars.tasks[self.overall].start_time is None:
                bars.start_task(self.overall)
            bars.update(self.overall, completed=self.work.done, total=self.work.total)


@dataclass
class _Stage:
    start: float
    ended: bool = False


class _Lines:
    """Plain timestamped lines, for logs: what `_Bars` shows, at a steady pace."""

    def __init__(self, console: Console, plan_of, every: float, clock: Callable[[], float] = time.monotonic):
        self.console, self.plan_of, self.every, self.clock = console, plan_of, every, clock
        self.work = WorkTracker(clock)
        self.stages: dict[str, _Stage] = {}
        self.last = clock()
        self.first_unit_said = False

    def _say(self, text: str) -> None:
        self.console.print(f"{time.strftime('%H:%M:%S')} {text}", markup=False, highlight=False, soft_wrap=True)
        self.last = self.clock()

    def clip_known(self, frames: int, working_size: tuple[int, int]) -> None:
        if self.plan_of is not None:
            self.work.plan = self.plan_of(frames, working_size)
            self._say(f"Work: {self.work.plan.describe()}")

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = self.clock()
        state = self.stages.get(stage)
        if state is None or (done <= 1 and state.ended):
            state = self.stages[stage] = _Stage(now)
        unet = self.work.update(stage, done, total)
        ended = total > 0 and done >= total
        first_unit = unet and done > 0 and not self.first_unit_said
        if (ended and state.ended) or not (ended or first_unit or now - self.last >= self.every):
            return
        state.ended = ended
        self.first_unit_said |= first_unit
        elapsed = now - state.start
        text = f"{stage}: {done}/{total}"
        if ended:
            text += f", done in {duration(elapsed)}"
        else:
            text += f" ({100 * done / total:.0f}%)" if total else ""
            if elapsed > 0 and done > 0:
                text += f", {done / elapsed:.2f} frames/s"
            left = remaining(elapsed, done, total)
            text += f", {duration(left)} left" if left is not None else ""
        whole = self.work.left()
        if whole is not None and self.work.done < self.work.total:
            text += f"; whole command {100 * self.work.done / max(self.work.total, 1):.0f}%, {duration(whole)} left"
        self._say(text)


def progress_every() -> float:
    """$DIFFFERV_PROGRESS_EVERY seconds between progress lines in lines mode (default 30)."""
    try:
        return max(float(os.environ.get(EVERY_ENV, DEFAULT_EVERY_S)), 0.0)
    except ValueError:
        return DEFAULT_EVERY_S


@contextmanager
def job_progress(console: Console, plan_of: Callable | None = None) -> Iterator[_Bars | _Lines]:
    """The progress callback of one command, bars on a terminal, lines otherwise. `plan_of(frames,
    working_size)` gives the command's `job.JobPlan`; the callback's `clip_known(frames, working_size)`
    announces it (called before decoding)."""
    if int(os.environ.get("RANK", "0") or 0) > 0:  # a launcher's follower rank: rank 0 reports for the job
        yield _Lines(Console(quiet=True), plan_of, progress_every())
        return
    if not console.is_terminal:
        yield _Lines(console, plan_of, progress_every())
        return
    columns = (TextColumn("{task.description}"), BarColumn(), _Count(), _Speed(), TimeElapsedColumn(), _Left())
    with Progress(*columns, console=console, transient=False) as bars:
        yield _Bars(bars, plan_of)
