"""Mutation testing of the core modules with mutmut 3, one module at a time, each against its own tests.

    python scripts/mutation.py                       # every module below
    python scripts/mutation.py editing/features.py   # some of them
    MUTATION_CHILDREN=1 python scripts/mutation.py   # one test process at a time (default 2)
    python scripts/mutation.py --sample 100 editing/inversion.py   # 100 of its mutants, drawn at random

`--sample N` runs N mutants drawn with a fixed seed (the same N give the same mutants on the same code) and
scores those: an estimate of the module's score for modules whose every mutant runs tiny inversions (tens
of seconds each on 2 cores), printed with its 95 % interval.

Each module runs in its own scratch folder `.mutation/<module>/` (git-ignored): a copy of the package and
the tests with a pyproject.toml whose [tool.mutmut] table mutates that one module and selects its test
files, so a module's mutants only ever run the fast tests that exercise it. mutmut keeps its results
there (`mutants/`) until the next run of that module, which starts afresh; `cd .mutation/<module> &&
mutmut results` lists the survivors and `mutmut show <name>` prints one. Prints killed / total per module
(a mutant no selected test reaches counts as not killed).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRATCH = REPO / ".mutation"

# module (under diffferv_cli/) -> pytest arguments selecting the tests that exercise it
MODULES: dict[str, list[str]] = {
    # the full-size static-clip test (a minute per run) checks what the tiny one checks, on other shapes
    "temporal/processors.py": ["tests/test_attention.py", "tests/test_prior.py", "-k", "not full_size"],
    "temporal/trajectories.py": ["tests/test_trajectories.py",
                                 "tests/test_windows.py::test_window_trajectories_are_the_clip_trajectories_cut_to_the_window",
                                 "tests/test_windows.py::test_streamed_links_equal_the_whole_clip_trajectories"],
    # the job-level tests (resume, power cut, group commits, modes) without the CLI runs
    "editing/inversion.py": ["tests/test_sampling.py", "tests/test_main_job.py", "-k",
                             "not test_cli and not side_by_side"],
    "editing/sampling.py": ["tests/test_sampling.py", "tests/test_main_job.py", "-k",
                            "not test_cli and not side_by_side"],
    "editing/features.py": ["tests/test_features.py"],
    "editing/prompts.py": ["tests/test_prompts.py"],
    # plus the job tests of its group commits, resumes and power cuts (holds, make_durable)
    "editing/cache.py": ["tests/test_cache_files.py", "tests/test_cache.py",
                         *(f"tests/test_main_job.py::{name}" for name in (
                             "test_step_files_are_flushed_in_group_commits_not_per_step",
                             "test_resume_after_a_power_cut_redoes_the_steps_whose_files_were_lost",
                             "test_resume_keeps_every_step_whose_file_holds",
                             "test_a_resume_checks_only_the_step_files_after_the_last_group_commit",
                             "test_corrupted_latent_file_is_a_clear_error",
                             "test_latents_are_float32_and_cache_is_small"))],
    "evaluation/metrics.py": ["tests/test_metrics.py"],
    "training/data.py": ["tests/test_training_data.py",
                         "tests/test_training.py::test_sidecar_manifest_and_tar_layouts_give_the_same_items",
                         "tests/test_training.py::test_sample_plan_keeps_the_prior_share_and_walks_epochs",
                         "tests/test_training.py::test_augmentation_applies_to_faces_only_and_keeps_images_valid",
                         "tests/test_hostile.py::test_tar_shard_caption_of_the_wrong_type_counts_as_missing"],
    "training/loop.py": ["tests/test_training.py", "-k", "not caption"],
}


def _settings(module: str) -> str:
    tests = MODULES[module]
    return "\n".join([
        "",
        "[tool.mutmut]",
        'source_paths = ["diffferv_cli"]',
        'also_copy = ["presets"]  # found beside the package (editing/presets.py), as in a checkout',
        f'only_mutate = ["diffferv_cli/{module}"]',
        f"pytest_add_cli_args_test_selection = {json.dumps(tests)}",
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-x", "-q"]',
        'process_isolation = "forkserver"  # torch is not fork-safe after its thread pools start',
        "timeout_constant = 60  # CPU seconds: a worker also builds its session fixtures (the tiny model)",
        "",
    ])


def prepare(module: str) -> Path:
    folder = SCRATCH / module.replace("/", "__").removesuffix(".py")
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("diffferv_cli", "tests", "presets", "mutants"):
        target = folder / name
        if target.exists():
            shutil.rmtree(target)
        if name != "mutants":
            shutil.copytree(REPO / name, target, ignore=shutil.ignore_patterns("__pycache__"))
    pyproject = (REPO / "pyproject.toml").read_text()
    (folder / "pyproject.toml").write_text(pyproject + _settings(module))
    return folder


SAMPLE_SEED = 0
# `mutmut run` with this name generates the mutants and collects the tests' stats, then stops (exit 1:
# "nothing matches") before running any mutant
NO_MUTANT = "no-such-mutant"


def mutants(folder: Path) -> list[tuple[str, str]]:
    """(name, status) of every mutant, from `mutmut results --all true`."""
    listing = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=folder,
                             capture_output=True, text=True, check=True).stdout
    return [tuple(line.strip().rsplit(": ", 1)) for line in listing.splitlines() if ": " in line]


def sample(folder: Path, count: int) -> list[str]:
    """`count` mutant names drawn with `SAMPLE_SEED` from the module's mutants, in their listed order."""
    names = sorted(name for name, _ in mutants(folder))
    return sorted(random.Random(SAMPLE_SEED).sample(names, min(count, len(names))))


def interval(killed: int, total: int) -> tuple[float, float]:
    """Wilson 95 % interval of a score measured on `total` sampled mutants."""
    if total == 0:
        return 0.0, 1.0
    z, share = 1.96, killed / total
    centre = (share + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(share * (1 - share) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return centre - half, centre + half


def score(rows: list[tuple[str, str]], only: list[str] | None = None) -> tuple[int, int, list[str]]:
    """(killed, total, survivors) of the mutants listed by `mutants()` (of those in `only` if given);
    "killed" counts the mutants whose tests failed, timed out or crashed (a segfault in cv2 on a None image
    is a caught mutant, not a survivor)."""
    if only is not None:
        chosen = set(only)
        rows = [(name, status) for name, status in rows if name in chosen]
    caught = ("killed", "timeout", "segfault")  # a test failed, hung or crashed its process
    killed = sum(status in caught for _, status in rows)
    survivors = [name for name, status in rows if status not in caught]
    return killed, len(rows), survivors


def main(names: list[str]) -> int:
    count = None
    if names[:1] == ["--sample"]:
        if len(names) < 2 or not names[1].isdigit() or int(names[1]) < 1:
            print("--sample takes a positive number of mutants", file=sys.stderr)
            return 2
        count, names = int(names[1]), names[2:]
    modules = [name.removeprefix("diffferv_cli/") for name in names] or list(MODULES)
    unknown = [m for m in modules if m not in MODULES]
    if unknown:
        print(f"unknown module(s) {unknown}; known: {list(MODULES)}", file=sys.stderr)
        return 2
    table = []
    for module in modules:
        folder = prepare(module)
        print(f"== {module}: mutmut run in {folder.relative_to(REPO)}", flush=True)
        run = [sys.executable, "-m", "mutmut", "run", "--max-children", os.environ.get("MUTATION_CHILDREN", "2")]
        chosen = None
        if count is not None:
            subprocess.run([*run, NO_MUTANT], cwd=folder, capture_output=True)
            chosen = sample(folder, count)
            if not chosen or not (folder / "mutants" / "mutmut-stats.json").is_file():
                print(f"mutmut could not generate the mutants of {module} or run its tests", file=sys.stderr)
                table.append((module, 0, 0, None))
                continue
            print(f"   {len(chosen)} mutants drawn (seed {SAMPLE_SEED})", flush=True)
        env_run = subprocess.run(run + (chosen or []), cwd=folder)
        if env_run.returncode:
            print(f"mutmut failed on {module} (exit {env_run.returncode})", file=sys.stderr)
        rows = mutants(folder)
        killed, total, survivors = score(rows, chosen)
        table.append((module, killed, total, None if chosen is None else len(rows)))
        for name in survivors:
            print(f"   survived: {name}")
    print("\nmodule                       killed / total   score")
    for module, killed, total, of in table:
        line = f"{module:<28} {killed:>6} / {total:<6}  {100 * killed / max(total, 1):5.1f} %"
        if of is not None:
            low, high = interval(killed, total)
            line += f"  (sample of {of} mutants; 95 % interval {100 * low:.1f} .. {100 * high:.1f} %)"
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
