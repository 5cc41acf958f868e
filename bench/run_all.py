"""Run every benchmark (bench/bench_*.py), then print one markdown table of all figures for the README.

    python bench/run_all.py                 # each benchmark with its own defaults (`make bench`)
    python bench/run_all.py --quick         # smaller sizes / fewer repeats: a fast smoke pass
    python bench/run_all.py --only flow unet_step
    python bench/run_all.py --no-run        # only the table, from the JSON files already in bench/results/
    python bench/run_all.py --markdown bench/results/README.md

Each benchmark writes bench/results/<name>.json through bench/common.py's `report`:
{"name", "date", "machine", "settings", "rows"}. Every row becomes one line of the table:

| figure | value | goal | command | machine | date |

* figure: the row's "figure" (or "step") cell, else its first column as `column value`, prefixed by the
  benchmark's name;
* value: the row's "value" cell, else its numeric cells as `column=value` (at most four; the JSON has all);
* goal: the row's "goal" cell, when the benchmark states one;
* command: the exact command that produced the file in this run (else the file's "command", else the
  benchmark's default command);
* machine: CPU count and architecture, torch version, and the benchmark's device when it records one.

`--quick` passes `--quick` to benchmarks that declare it, and otherwise smaller settings from QUICK_ARGS
for the options a benchmark actually declares (read from its source), so a renamed option is skipped, not
an error. Quick figures are smoke numbers: the command column shows the settings they were taken with.
Exit code 1 when a benchmark fails (the table is still printed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"

# Smaller settings for --quick, per benchmark; only the options the script declares are passed.
QUICK_ARGS: dict[str, list[str]] = {
    "bench_flow.py": ["--size", "256", "--repeat", "2"],
    "bench_trajectories.py": ["--frames", "8", "--size", "256", "--repeat", "1"],
    "bench_unet_step.py": ["--frames", "8", "--size", "128", "--repeats", "1"],
    "bench_cache.py": ["--size", "256", "--steps", "5", "--frames", "2"],
    "bench_edit_memory.py": ["--size", "256", "--frames", "4"],
    "bench_feature_modes.py": ["--size", "128", "--frames", "2", "--steps", "2"],
    "bench_windows.py": ["--quick"],
    "bench_composite.py": ["--frames", "2", "--steps", "2", "--repeat", "2", "--no-unet"],
    "bench_step_loop.py": ["--frames", "4", "--steps", "5", "--repeats", "1", "--no-compile"],
    "bench_end_to_end.py": ["--frames", "2", "--size", "64", "--steps", "1"],
    "bench_clip_memory.py": ["--size", "64", "--source-size", "228x128", "--frames", "50", "500"],
}
GENERIC_QUICK_ARGS = ["--repeat", "1", "--repeats", "1"]  # for benchmarks not in QUICK_ARGS
MAX_VALUE_CELLS = 4
LABEL_COLUMNS = ("figure", "step", "name", "case")


def bench_scripts(only: list[str] | None = None) -> list[Path]:
    scripts = sorted(BENCH.glob("bench_*.py"))
    if only:
        wanted = {name.removeprefix("bench_").removesuffix(".py") for name in only}
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in wanted]
    return scripts


def declared_options(script: Path) -> set[str]:
    """The --options a benchmark's argparse declares (read from its source, without running it)."""
    return set(re.findall(r"add_argument\(\s*['\"](--[\w-]+)['\"]", script.read_text()))


def _option_pairs(args: list[str]) -> list[list[str]]:
    """["--a", "1", "--b", "2", "3", "--c"] -> [["--a", "1"], ["--b", "2", "3"], ["--c"]]."""
    groups: list[list[str]] = []
    for arg in args:
        if arg.startswith("--") or not groups:
            groups.append([arg])
        else:
            groups[-1].append(arg)
    return groups


def command_for(script: Path, quick: bool) -> list[str]:
    command = [sys.executable, str(script.relative_to(REPO))]
    if not quick:
        return command
    options = declared_options(script)
    if "--quick" in options:
        return [*command, "--quick"]
    wanted = QUICK_ARGS.get(script.name, GENERIC_QUICK_ARGS)
    for group in _option_pairs(wanted):
        if group[0] in options:
            command += group
    return command


def display_command(command: list[str]) -> str:
    return shlex.join(["python", *command[1:]])


def run_benchmarks(scripts: list[Path], quick: bool, timeout: float) -> tuple[dict[str, str], list[str]]:
    """Run each script; return (result file name -> command that wrote it, failures)."""
    produced: dict[str, str] = {}
    failures: list[str] = []
    for script in scripts:
        command = command_for(script, quick)
        before = _result_times()
        print(f"\n=== {display_command(command)}", flush=True)
        started = time.perf_counter()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        try:
            completed = subprocess.run(command, cwd=REPO, env=env, timeout=timeout, check=False)
            status = completed.returncode
        except subprocess.TimeoutExpired:
            status = None
        seconds = time.perf_counter() - started
        if status != 0:
            why = f"timed out after {timeout:.0f} s" if status is None else f"exit code {status}"
            failures.append(f"{script.name}: {why}")
            print(f"=== {script.name} failed ({why})", flush=True)
        else:
            print(f"=== {script.name} done in {seconds:.1f} s", flush=True)
        for name, mtime in _result_times().items():
            if before.get(name) != mtime:
                produced[name] = display_command(command)
    return produced, failures


def _result_times() -> dict[str, float]:
    return {p.name: p.stat().st_mtime for p in RESULTS.glob("*.json")} if RESULTS.is_dir() else {}


# Table ------------------------------------------------------------------------------------------------


def _format(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    if isinstance(value, list | tuple):
        return "x".join(_format(v) for v in value)
    return "" if value is None else str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def machine_summary(payload: dict) -> str:
    machine = payload.get("machine") or {}
    parts = []
    if machine.get("cpu_count"):
        parts.append(f"{machine['cpu_count']} CPU {machine.get('processor', '')}".strip())
    torch_version = (machine.get("versions") or {}).get("torch")
    if torch_version:
        parts.append(f"torch {torch_version}")
    device = (payload.get("settings") or {}).get("device") or machine.get("device") or machine.get("gpu")
    if device and device != "cpu":
        parts.append(str(device))
    return ", ".join(parts)


def rows_for(payload: dict, command: str) -> list[dict[str, str]]:
    name = payload.get("name", "?")
    date = str(payload.get("date", ""))[:10]
    machine = machine_summary(payload)
    lines = []
    for row in payload.get("rows") or []:
        label_column = next((c for c in LABEL_COLUMNS if c in row), None)
        if label_column is not None:
            label = _format(row[label_column])
        elif row:
            first = next(iter(row))
            label_column = first
            label = f"{first} {_format(row[first])}"
        else:
            continue
        if "value" in row:
            value = _format(row["value"])
        else:
            cells = [(column, v) for column, v in row.items()
                     if column not in (label_column, "goal") and isinstance(v, int | float) and v is not None]
            value = ", ".join(f"{column}={_format(v)}" for column, v in cells[:MAX_VALUE_CELLS])
        lines.append({"figure": f"{name}: {label}", "value": value, "goal": _format(row.get("goal", "")),
                      "command": f"`{command}`" if command else "", "machine": machine, "date": date})
    return lines


def markdown_table(produced: dict[str, str], names: set[str] | None = None) -> str:
    header = ["figure", "value", "goal", "command", "machine", "date"]
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for path in sorted(RESULTS.glob("*.json")) if RESULTS.is_dir() else []:
        if names is not None and path.stem not in names:
            continue
        try:
            payload = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            out.append(f"| {path.name}: unreadable ({_cell(str(err))}) | | | | | |")
            continue
        command = produced.get(path.name) or payload.get("command") or _default_command(path.stem)
        for line in rows_for(payload, command):
            out.append("| " + " | ".join(_cell(line[column]) for column in header) + " |")
    return "\n".join(out)


def _default_command(name: str) -> str:
    script = BENCH / f"bench_{name}.py"
    return f"python {script.relative_to(REPO)}" if script.is_file() else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller settings: a fast smoke pass")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these (flow, bench_flow, bench_flow.py)")
    parser.add_argument("--no-run", action="store_true", help="only print the table from existing results")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per benchmark (default 1800, 600 with --quick)")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)

    scripts = bench_scripts(args.only)
    if args.only and not scripts:
        print(f"no benchmark matches {args.only}; have: {[s.name for s in bench_scripts()]}", file=sys.stderr)
        return 2
    produced, failures = {}, []
    if not args.no_run:
        timeout = args.timeout or (600.0 if args.quick else 1800.0)
        produced, failures = run_benchmarks(scripts, args.quick, timeout)
    names = None
    if args.only:  # the table shows the selected benchmarks' files (and whatever they wrote)
        names = {s.stem.removeprefix("bench_") for s in scripts} | {Path(n).stem for n in produced}
    table = markdown_table(produced, names)
    print("\n" + table)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table + "\n")
        print(f"wrote {args.markdown}")
    if failures:
        print("\nfailed: " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
