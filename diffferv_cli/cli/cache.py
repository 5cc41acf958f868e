"""`diffferv cache [list] | rm | prune | clear | clean`: what the inversion cache holds, and removing it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from diffferv_cli.cli import CacheOpt, _App, console, err_console, friendly

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the entries as JSON instead of a table.")]

cache_app = _App(help="List and remove cached inversions (`diffferv cache` alone lists them).",
                 rich_markup_mode=None, invoke_without_command=True)


def _root(cache_dir: Path | None) -> Path:
    from diffferv_cli.editing.cache import cache_root

    return cache_root(cache_dir)


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds))


def _settings(entry) -> Text:
    """Model, prompt and working size, one a line (as text: a prompt's brackets are not rich markup)."""
    if entry.model is None and entry.prompt is None and entry.working_size is None:
        return Text("-")
    size = "x".join(map(str, entry.working_size)) if entry.working_size else "?"
    parts = [entry.model or "?", repr(entry.prompt) if entry.prompt is not None else "?", size]
    return Text("\n".join(parts + (["features on disk"] if entry.features_stored else [])))


def _steps(entry) -> str:
    if entry.steps is None:
        return "-"
    return f"{max(entry.finished_steps if entry.finished_steps is not None else -1, 0)}/{entry.steps}"


def list_cmd(cache_dir: CacheOpt = None, as_json: JsonOpt = False) -> None:
    """List the cached inversions: clip, settings, frames, steps done, size, last use."""
    import json

    from diffferv_cli.editing.cache_admin import human_size, list_entries, total_size

    root = _root(cache_dir)
    entries = list_entries(root)
    if as_json:
        console.print_json(json.dumps({"root": str(root), "total_size": total_size(entries),
                                       "entries": [entry.to_json() for entry in entries]}))
        return
    table = Table("key", "clip", "model, prompt, working size", "frames", "steps", "size", "last use", "state",
                  title=Text(f"Inversion cache {root}"))
    for entry in entries:
        state = Text.assemble(("broken", "red"), f": {entry.problem}") if entry.problem else \
            Text("complete" if entry.complete else "partial (resumes)")
        table.add_row(entry.key, Text(entry.clip or "?"), _settings(entry), "-" if entry.frames is None else str(entry.frames),
                      _steps(entry), human_size(entry.size), _when(entry.last_used), state)
    if entries:
        console.print(table)
    console.print(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, {human_size(total_size(entries))} in "
                  f"{root}", markup=False, highlight=False)


def _report(done, verb: str) -> None:
    from diffferv_cli.editing.cache_admin import human_size

    for entry in done.removed:
        console.print(f"{verb} {entry.key} ({human_size(entry.size)})", markup=False, highlight=False)
    for path in done.leftovers:
        console.print(f"Removed leftover {path}", markup=False, highlight=False)
    for entry in done.busy:
        err_console.print(f"Skipped {entry.key}: another diffferv process is using it.", style="yellow",
                          markup=False, highlight=False)
    console.print(f"Freed {human_size(done.freed)}.", markup=False, highlight=False)


def rm_cmd(keys: Annotated[list[str], typer.Argument(help="Keys, or unique prefixes of keys, from `diffferv cache list`.",
                                                     show_default=False)],
           cache_dir: CacheOpt = None) -> None:
    """Remove cache entries by key. Exit code 1 when an entry was skipped because another process uses it."""
    from diffferv_cli.editing.cache_admin import list_entries, remove, select

    root = _root(cache_dir)
    done = remove(root, select(list_entries(root), keys))
    _report(done, "Removed")
    if done.busy:
        raise typer.Exit(1)


def prune_cmd(older_than: Annotated[str, typer.Option("--older-than", help="Age, a number and a unit s, m, h or d: "
                                                      "30d, 12h. Entries last used longer ago are removed.",
                                                      show_default=False)],
              dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would be removed.")] = False,
              cache_dir: CacheOpt = None) -> None:
    """Remove the entries last used more than --older-than ago."""
    from diffferv_cli.editing.cache_admin import human_size, list_entries, parse_age, remove, unused_for

    seconds = parse_age(older_than)
    root = _root(cache_dir)
    old = unused_for(list_entries(root), seconds)
    if dry_run:
        for entry in old:
            console.print(f"Would remove {entry.key} ({human_size(entry.size)}, last used {_when(entry.last_used)})",
                          markup=False, highlight=False)
        return
    _report(remove(root, old), "Removed")


def clear_cmd(yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
              cache_dir: CacheOpt = None) -> None:
    """Remove every cache entry (asks first unless --yes)."""
    from diffferv_cli.editing.cache_admin import human_size, list_entries, remove, total_size

    root = _root(cache_dir)
    entries = list_entries(root)
    if not entries:
        console.print(f"The cache {root} holds no entries.", markup=False, highlight=False)
        return
    if not yes:
        typer.confirm(f"Remove all {len(entries)} cache entries ({human_size(total_size(entries))}) in {root}?",
                      abort=True)
    _report(remove(root, entries), "Removed")


def clean_cmd(cache_dir: CacheOpt = None) -> None:
    """Remove what interrupted runs left: temporary files, files no manifest names, entries without a
    manifest. Complete entries and entries in use are kept."""
    from diffferv_cli.editing.cache_admin import clean

    _report(clean(_root(cache_dir)), "Removed unfinished")


@friendly
def _list_by_default(ctx: typer.Context) -> None:
    if ctx.invoked_subcommand is None:
        list_cmd(cache_dir=None, as_json=False)


cache_app.callback()(_list_by_default)
cache_app.command("list")(list_cmd)
cache_app.command("rm")(rm_cmd)
cache_app.command("prune")(prune_cmd)
cache_app.command("clear")(clear_cmd)
cache_app.command("clean")(clean_cmd)


def register(app: typer.Typer) -> None:
    app.add_typer(cache_app, name="cache")

