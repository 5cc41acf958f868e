"""A jobs file -> validated jobs, every one checked before any work (`diffferv batch`).

A jobs file is JSON Lines (`.jsonl`, `.ndjson`: one object a line), CSV (`.csv`: a header row of field
names; list fields as `;`-separated text) or TOML (`.toml`: `[[job]]` tables). A job's fields are the
options of one command under their long names with underscores (`tau_app`, `cache_dir`; a dash is read
as an underscore), taken from the command's own signature (`option_fields`): the same names, types,
defaults and bounds as on its command line. `presets` is the name of the repeatable `--preset`. An empty
CSV cell or a JSON `null` leaves the option at its default. Paths are read as on the command line,
relative to the current folder.

`load_jobs` turns every row into the command's request with the command's own function (`build`: for
`batch`, `cli.edit.edit_request`, which `edit` itself runs), then checks every output of every job:
no two jobs write one file, no job writes over an input, and no existing file is replaced unless
`overwrite`. Any problem is one `UserError` sentence naming the file, the row and the field.

`plan` orders the work: jobs that share an inversion (the same clip, frame selection, model and
inversion settings) form a group that one worker runs in turn, so the clip is inverted once and every
other job of the group edits from the cached inversion; groups run longest first.
"""

from __future__ import annotations

import csv
import difflib
import inspect
import io
import json
import re
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffferv_cli.errors import UserError
from diffferv_cli.files import read_small_file

JOBS_FILE_LIMIT = 64 * 2**20  # bytes
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".toml": "toml"}
ALIASES = {"presets": "preset"}  # a job's field name -> the command's parameter name
LIST_SEPARATOR = ";"
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


@dataclass(frozen=True)
class Row:
    """One job as the file says it: `where` names it in messages ("line 3" in JSONL and CSV, "job 2" in
    TOML); `fields` maps field names to raw values (text in CSV)."""

    number: int  # 1-based position among the file's jobs
    where: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class OptionField:
    """One option a job may set: its parameter name, type and default, and the command line's own bounds
    and check (typer's `min`, `max`, `callback`)."""

    name: str
    kind: type  # bool, int, float, str or Path
    many: bool = False  # a repeatable option: a list
    default: Any = None
    required: bool = False
    minimum: float | None = None
    maximum: float | None = None
    check: Callable[[Any], Any] | None = None

    @property
    def label(self) -> str:
        """The name a jobs file uses."""
        return {parameter: alias for alias, parameter in ALIASES.items()}.get(self.name, self.name)


@dataclass(frozen=True)
class Job:
    """A validated job: `options` are every option of the command (defaults filled in), `request` what
    `build(**options)` made of them, `targets` the files it writes."""

    number: int
    where: str
    options: dict[str, Any]
    request: Any
    targets: tuple[Path, ...] = ()

    @property
    def clip(self) -> Path:
        return self.options["clip"]


@dataclass
class Group:
    """Jobs that share one inversion, in the order one worker runs them, and their estimated work."""

    key: tuple
    jobs: list[Job] = field(default_factory=list)
    weight: float = 0.0


# -- reading ------------------------------------------------------------------------------------------
def jobs_format(path: Path) -> str:
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"The jobs file {path} must end in .jsonl, .csv or .toml (JSON Lines, CSV with a header "
                        "row, or TOML [[job]] tables), not {path.suffix or 'no extension'!r}.")
    return kind


def read_rows(path: Path) -> list[Row]:
    """The jobs of `path` as written, in order (UserError: unreadable, not its format, or no job)."""
    path = Path(path)
    kind = jobs_format(path)
    raw = read_small_file(path, JOBS_FILE_LIMIT, "jobs file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"The jobs file {path} is not UTF-8 text.") from None
    rows = {"jsonl": _jsonl_rows, "csv": _csv_rows, "toml": _toml_rows}[kind](text, path)
    if not rows:
        raise UserError(f"The jobs file {path} holds no job.")
    return rows


def _jsonl_rows(text: str, path: Path) -> list[Row]:
    rows = []
    for line_number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            fields = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path.name} line {line_number} is not JSON ({err.msg} at column {err.colno}).") from None
        if not isinstance(fields, dict):
            raise UserError(f"{path.name} line {line_number} must be a JSON object of fields, like "
                            '{"clip": "a.mp4", "presets": ["age"]}.')
        rows.append(Row(len(rows) + 1, f"line {line_number}", fields))
    return rows


def _csv_rows(text: str, path: Path) -> list[Row]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return []
        names = [name.strip() for name in header]
        if "" in names:
            raise UserError(f"{path.name} line 1: column {names.index('') + 1} of the header row has no field name.")
        rows = []
        for cells in reader:
            if not any(cell.strip() for cell in cells):
                continue
            where = f"line {reader.line_num}"
            if len(cells) > len(names):
                raise UserError(f"{path.name} {where} has {len(cells)} cells but the header names {len(names)} fields.")
            fields = {name: cell for name, cell in zip(names, cells, strict=False) if cell.strip()}
            rows.append(Row(len(rows) + 1, where, fields))
    except csv.Error as err:
        raise UserError(f"{path.name} line {reader.line_num} is not CSV ({err}).") from None
    return rows


def _toml_rows(text: str, path: Path) -> list[Row]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"The jobs file {path} is not TOML ({err}).") from None
    others = sorted(set(data) - {"job"})
    if others:
        raise UserError(f"{path.name} may hold only [[job]] tables, not {others[0]!r}.")
    tables = data.get("job", [])
    if not isinstance(tables, list) or not all(isinstance(table, dict) for table in tables):
        raise UserError(f"{path.name}: jobs are [[job]] tables (an array of tables named job).")
    return [Row(number, f"job {number}", table) for number, table in enumerate(tables, 1)]


# -- the command's options --------------------------------------------------------------------------
def option_fields(command: Callable) -> dict[str, OptionField]:
    """What a job may set: every parameter of `command` (a Typer command function whose options are
    `Annotated[type, typer.Option(...)]`), by name."""
    hints = typing.get_type_hints(command, include_extras=True)
    fields = {}
    for name, parameter in inspect.signature(command).parameters.items():
        annotation, metadata = hints.get(name, str), ()
        if typing.get_origin(annotation) is typing.Annotated:
            annotation, *metadata = typing.get_args(annotation)
        kind, many = _kind(annotation)
        info = next((item for item in metadata if hasattr(item, "param_decls")), None)
        fields[name] = OptionField(
            name, kind, many, None if parameter.default is inspect.Parameter.empty else parameter.default,
            required=parameter.default is inspect.Parameter.empty,
            minimum=getattr(info, "min", None), maximum=getattr(info, "max", None),
            check=getattr(info, "callback", None))
    return fields


def _kind(annotation) -> tuple[type, bool]:
    """(item type, whether a list) of `int | None`, `list[str] | None`, `Path`..."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def convert(option: OptionField, value: Any) -> Any:
    """`value` from a jobs file as the option's type; ValueError with the reason (a clause) otherwise."""
    if option.many:
        items = [part.strip() for part in value.split(LIST_SEPARATOR)] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise ValueError(f"must be a list or {LIST_SEPARATOR!r}-separated text, not {value!r}")
        return [_convert_one(option, item) for item in items if item != ""]
    return _convert_one(option, value)


def _convert_one(option: OptionField, value: Any) -> Any:
    kind = option.kind
    if kind is bool:
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, not {value!r}")
        return value
    if kind in (int, float):
        number = value
        if isinstance(value, str):
            try:
                number = float(value.strip()) if kind is float else int(value.strip())
            except ValueError:
                pass
        if isinstance(number, bool) or not isinstance(number, (int, float)) or (kind is int and isinstance(number, float)):
            raise ValueError(f"must be {'a whole number' if kind is int else 'a number'}, not {value!r}")
        number = kind(number)
        if option.minimum is not None and number < option.minimum:
            raise ValueError(f"must be at least {option.minimum}, not {number}")
        if option.maximum is not None and number > option.maximum:
            raise ValueError(f"must be at most {option.maximum}, not {number}")
        return number
    if not isinstance(value, str):
        raise ValueError(f"must be text, not {value!r}")
    return Path(value) if kind is Path else value


def _checked(option: OptionField, value: Any) -> Any:
    """The command line's own check of the option (typer's callback), its complaint as a ValueError."""
    if option.check is None or value is None:
        return value
    try:
        result = option.check(value)
    except Exception as err:  # typer.BadParameter and friends: the message is for people
        message = getattr(err, "message", None) or str(err)
        raise ValueError(message.rstrip(".")) from None
    return value if result is None else result


def row_options(row: Row, fields: dict[str, OptionField], source: str) -> dict[str, Any]:
    """The keyword options of `row`: every field converted, defaults for the rest (UserError naming the
    row and field)."""
    given: dict[str, Any] = {}
    for raw_name, value in row.fields.items():
        name = ALIASES.get(str(raw_name).replace("-", "_"), str(raw_name).replace("-", "_"))
        if name not in fields:
            raise UserError(f"{source} {row.where}: unknown field {raw_name!r}{_suggestion(str(raw_name), fields)}.")
        if name in given:
            raise UserError(f"{source} {row.where}: the field {fields[name].label!r} is given twice.")
        if value is None or (isinstance(value, str) and not value.strip() and not fields[name].many):
            continue
        try:
            given[name] = _checked(fields[name], convert(fields[name], value))
        except ValueError as err:
            raise UserError(f"{source} {row.where}: field {fields[name].label!r}: {err}.") from None
    for option in fields.values():
        if option.required and option.name not in given:
            raise UserError(f"{source} {row.where}: no {option.label!r} field; every job needs one.")
    return {name: given.get(name, option.default) for name, option in fields.items()}


def _suggestion(name: str, fields: dict[str, OptionField]) -> str:
    labels = [option.label for option in fields.values()]
    close = difflib.get_close_matches(name.replace("-", "_"), labels, n=1)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f"; a job's fields are {', '.join(labels)}"


SHORT_OPTIONS = {"o": "out", "p": "preset", "m": "model", "g": "guidance"}


def field_names(message: str, fields: dict[str, OptionField]) -> str:
    """A command's message with its options named as a jobs file names them: '--tau-app' -> 'tau_app',
    '-o' -> 'out'."""

    def named(match: re.Match) -> str:
        name = match.group(2).replace("-", "_")
        name = SHORT_OPTIONS.get(name, name) if len(match.group(1)) == 1 else name
        return f"'{fields[name].label}'" if name in fields else match.group(0)

    return re.sub(r"(?<![\w-])(--?)([a-z][a-z0-9-]*)", named, message)


# -- validation -------------------------------------------------------------------------------------
def load_jobs(path: Path, build: Callable[..., Any], *, targets: Callable[[Any], Sequence[Path]],
              overwrite: bool = False) -> list[Job]:
    """Every job of the jobs file `path`, each built with `build(**options)` (the command's own checks and
    configs), then every output checked (`check_outputs`), all before any work. `targets(request)` gives
    the files a job writes; a job's own `overwrite` option adds to `overwrite`."""
    path = Path(path)
    fields = option_fields(build)
    rows = read_rows(path)
    jobs = []
    for row in rows:
        options = row_options(row, fields, path.name)
        try:
            request = build(**options)
            written = tuple(targets(request))
        except UserError as err:
            raise UserError(f"{path.name} {row.where}: {field_names(err.message, fields)}") from None
        jobs.append(Job(row.number, row.where, options, request, written))
    check_outputs(jobs, path.name, overwrite=overwrite)
    return jobs


def check_outputs(jobs: Sequence[Job], source: str, *, overwrite: bool = False) -> None:
    """Every output of every job: written by one job only, never an input, new unless `overwrite` (or the
    job's own `overwrite`)."""
    inputs = {job.clip.resolve(): job for job in jobs}
    writers: dict[Path, Job] = {}
    for job in jobs:
        for target in job.targets:
            resolved = target.resolve()
            if resolved in inputs:
                raise UserError(f"{source} {job.where}: the output {target} is the input video of "
                                f"{inputs[resolved].where}; give 'out' another path.")
            if resolved in writers:
                raise UserError(f"{source} {job.where} and {writers[resolved].where} both write {target}; give one "
                                "of them another 'out'.")
            writers[resolved] = job
            if target.exists() and not (overwrite or job.options.get("overwrite")):
                raise UserError(f"{source} {job.where}: {target} already exists; pass --overwrite or give 'out' "
                                "another path.")


# -- planning ---------------------------------------------------------------------------------------
def plan(jobs: Sequence[Job], key: Callable[[Job], tuple], weight: Callable[[Job, bool], float]) -> list[Group]:
    """The jobs in groups of one inversion (`key`), longest group first (the sum of `weight(job, inverts)`,
    where `inverts` is true for the group's first job, the one that inverts); ties keep file order."""
    groups: dict[tuple, Group] = {}
    for job in jobs:
        group = groups.setdefault(key(job), Group(key(job)))
        group.weight += weight(job, not group.jobs)
        group.jobs.append(job)
    return sorted(groups.values(), key=lambda group: -group.weight)
