"""Mutation testing of the core modules with mutmut 3, one module at a time, each against its own tests.

    python scripts/mutation.py                       # every module below
    python scripts/mutation.py editing/features.py   # some of them
    MUTATION_CHILDREN=1 python scripts/mutation.py   # one test process at a time (default 2)

Each module runs in its own scratch folder `.mutation/<module>/` (git-ignored): a copy of the package and
the tests with a pyproject.toml whose [tool.mutmut] table mutates that one module and selects its test
files, so a module's mutants only ever run the fast tests that exercise it. mutmut keeps its results
there (`mutants/`) until the next run of that module, which starts afresh; `cd .mutation/<module> &&
mutmut results` lists the survivors and `mutmut show <name>` prints one. Prints killed / total per module
(a mutant no selected test reaches counts as not killed).
"""

from __future__ import annotations

import json
import os
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
    "editing/cache.py": ["tests/test_cache_files.py", "tests/test_cache.py"],
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


def score(folder: Path) -> tuple[int, int, list[str]]:
    """(killed, total, survivors) from `mutmut results --all true`; "killed" counts the mutants whose tests
    failed, timed out or crashed (a segfault in cv2 on a None image is a caught mutant, not a survivor)."""
    listing = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=folder,
                             capture_output=True, text=True, check=True).stdout
    rows = [line.strip().rsplit(": ", 1) for line in listing.splitlines() if ": " in line]
    caught = ("killed", "timeout", "segfault")  # a test failed, hung or crashed its process
    killed = sum(status in caught for _, status in rows)
    survivors = [name for name, status in rows if status not in caught]
    return killed, len(rows), survivors


def main(names: list[str]) -> int:
    modules = [name.removeprefix("diffferv_cli/") for name in names] or list(MODULES)
    unknown = [m for m in modules if m not in MODULES]
    if unknown:
        print(f"unknown module(s) {unknown}; known: {list(MODULES)}", file=sys.stderr)
        return 2
    table = []
    for module in modules:
        folder = prepare(module)
        print(f"== {module}: mutmut run in {folder.relative_to(REPO)}", flush=True)
        children = os.environ.get("MUTATION_CHILDREN", "2")
        env_run = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", children], cwd=folder)
        if env_run.returncode:
            print(f"mutmut failed on {module} (exit {env_run.returncode})", file=sys.stderr)
        killed, total, survivors = score(folder)
        table.append((module, killed, total))
        for name in survivors:
            print(f"   survived: {name}")
    print("\nmodule                       killed / total   score")
    for module, killed, total in table:
        print(f"{module:<28} {killed:>6} / {total:<6}  {100 * killed / max(total, 1):5.1f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
