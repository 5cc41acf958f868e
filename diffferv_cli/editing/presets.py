"""Edit presets: `presets/*.toml`, one file per edit, validated into a frozen `Preset`.

A preset file (its name is the file stem, e.g. `age.toml` -> `age`):

    description = "Older: wrinkles, grey hair, aged skin."   # one line
    source_prompt = "a photo of a {subject}"                  # optional, this is the default
    edit_prompt = "a photo of an old {subject}"
    tau_app = 0.9                                             # optional, default 0.9
    guidance = 5.0                                            # optional, default 5.0
    subject = "person"                                        # optional, default "person"

Names are looked up in the user's folders first (`--preset-dir DIR`, repeatable, else the folders in
`$DIFFFERV_PRESETS`, separated by `os.pathsep`), then in the built-ins; `-p path/to/file.toml` names a
file directly.

`{subject}` is the only placeholder; the CLI's `--subject woman` fills it. Edit prompts repeat the
source prompt's words and add or swap one or two (prompt-to-prompt word alignment keeps the
cross-attention maps of the shared words).

`tau_app` (appearance injection while t > (1 - tau_app) T) follows the paper: 0.9 for *texture* edits
that keep the face's shape (age, young, blond, lipstick), 0.7 for *shape* edits that must move
contours (man, woman, smiling, bangs, glasses, beard).
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from diffferv_cli.config import MAX_GUIDANCE
from diffferv_cli.errors import UserError
from diffferv_cli.files import read_small_file

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ENV_VAR = "DIFFFERV_PRESETS"
SUBJECT = "{subject}"
DEFAULT_SOURCE_TEMPLATE = "a photo of a {subject}"
MAX_PRESET_BYTES = 64 * 1024
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class Preset(BaseModel):
    """One edit: a source/edit prompt pair plus the injection and guidance settings."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    name: str = Field(description="the file stem")
    description: str
    source_prompt: str = DEFAULT_SOURCE_TEMPLATE
    edit_prompt: str
    tau_app: float = Field(0.9, ge=0.0, le=1.0)
    guidance: float = Field(5.0, ge=0.0, le=MAX_GUIDANCE)
    subject: str = Field("person", min_length=1)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"{value!r} is not a valid preset name (letters, digits, _ . -)")
        return value

    @field_validator("description")
    @classmethod
    def _one_line(cls, value: str) -> str:
        if not value.strip() or "\n" in value.strip():
            raise ValueError("must be one non-empty line")
        return value.strip()

    @field_validator("source_prompt", "edit_prompt")
    @classmethod
    def _template(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        if "{" in value.replace(SUBJECT, "") or "}" in value.replace(SUBJECT, ""):
            raise ValueError("the only placeholder allowed is {subject}")
        return value.strip()

    @model_validator(mode="after")
    def _edit_differs(self) -> Preset:
        if self.source_prompt == self.edit_prompt:
            raise ValueError("edit_prompt is the same as source_prompt")
        return self

    def prompts(self, subject: str | None = None) -> tuple[str, str]:
        """(source prompt, edit prompt) with {subject} filled (default: the preset's subject)."""
        filler = (subject or self.subject).strip()
        return self.source_prompt.replace(SUBJECT, filler), self.edit_prompt.replace(SUBJECT, filler)


def builtin_dir() -> Path:
    """The presets shipped with diffferv: `<repo>/presets` in a source checkout (editable install), else
    `<prefix>/share/diffferv/presets`, where a wheel install puts them (pyproject data-files)."""
    checkout = Path(__file__).resolve().parents[2] / "presets"
    if checkout.is_dir():
        return checkout
    return Path(sys.prefix) / "share" / "diffferv" / "presets"


def _read(path: Path) -> Preset:
    raw = read_small_file(path, MAX_PRESET_BYTES, "preset file")  # refuses devices and FIFOs: never blocks
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise UserError(f"Cannot read preset file {path}: {err}.") from None
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"Preset file {path.name} is not valid TOML: {err}.") from None
    if "name" in data and data["name"] != path.stem:
        raise UserError(f"Preset file {path.name}: name {data['name']!r} does not match the file name "
                        f"(leave it out; the name is the file stem).")
    try:
        return Preset(**{**data, "name": path.stem})
    except ValidationError as err:
        raise UserError(f"Preset file {path.name}: {_first_problem(err)}.") from None


def _first_problem(err: ValidationError) -> str:
    problem = err.errors()[0]
    field = ".".join(str(part) for part in problem["loc"])
    if problem["type"] == "missing":
        return f"missing field {field!r}"
    if problem["type"] == "extra_forbidden":
        known = ", ".join(name for name in Preset.model_fields if name != "name")
        return f"unknown field {field!r} (fields: {known})"
    message = problem["msg"].removeprefix("Value error, ")
    return f"{field}: {message}" if field else message


def preset_folders(given: Sequence[Path | str] | None = None) -> list[Path]:
    """The user's preset folders, searched before the built-ins: `given` (`--preset-dir`, repeatable),
    else `$DIFFFERV_PRESETS` (one folder, or several separated by `os.pathsep`), else none. Each must exist."""
    if given:
        folders, origin = [Path(folder).expanduser() for folder in given], "--preset-dir"
    else:
        listed = os.environ.get(ENV_VAR, "").split(os.pathsep)
        folders, origin = [Path(folder).expanduser() for folder in listed if folder.strip()], ENV_VAR
    for folder in folders:
        if not folder.is_dir():
            raise UserError(f"The preset folder {folder} ({origin}) does not exist.")
    return folders


def _search_order(folders: Sequence[Path]) -> list[Path]:
    """Where a name is looked up, first match wins: the user's folders in order, then the built-ins."""
    return [*folders, builtin_dir()]


@dataclass(frozen=True)
class PresetListing:
    """Every preset `list_presets` found (one per name, the first in search order) and the files it
    could not read, each with its one-sentence reason."""

    presets: list[Preset]
    folders: dict[str, Path]  # preset name -> the folder it came from
    problems: list[tuple[Path, str]]


def list_presets(folders: Sequence[Path] = ()) -> PresetListing:
    """The presets in `folders` (see `preset_folders`) and the built-ins, sorted by name. A file that does
    not read is reported in `problems`, never hiding the others; a name already found earlier in the
    search order shadows later files of that name, which are not read."""
    found: dict[str, Preset] = {}
    origin: dict[str, Path] = {}
    problems: list[tuple[Path, str]] = []
    seen: set[str] = set()  # names read, well or not: `load_preset` would read the same file
    for folder in _search_order(folders):
        for path in sorted(folder.glob("*.toml")):
            if path.stem in seen:
                continue
            seen.add(path.stem)
            try:
                found[path.stem] = _read(path)
            except UserError as err:
                problems.append((path, err.message))
                continue
            origin[path.stem] = folder
    names = sorted(found)
    return PresetListing([found[name] for name in names], {name: origin[name] for name in names}, problems)


def load_preset(name_or_path: str, folders: Sequence[Path] = ()) -> Preset:
    """A preset by name (looked up in `folders` in order, then the built-ins) or by `.toml` path."""
    text = str(name_or_path)
    if text.endswith(".toml") or "/" in text or "\\" in text:
        path = Path(text).expanduser()
        if path.is_dir():
            raise UserError(f"Preset {path} is a folder, not a .toml file.")
        return _read(path)
    search = _search_order(folders)
    for folder in search:
        candidate = folder / f"{text}.toml"
        if _NAME.match(text) and candidate.is_file():
            return _read(candidate)
    raise UserError(_unknown(text, folders, sorted({path.stem for folder in search for path in folder.glob("*.toml")})))


def _unknown(name: str, folders: Sequence[Path], available: list[str]) -> str:
    """One sentence: near names (or all of them when none is near) and the other ways to name a preset."""
    near = difflib.get_close_matches(name, available, n=3, cutoff=0.6)
    where = "the built-in presets" if not folders else f"{', '.join(map(str, folders))} or the built-in presets"
    if near:
        hint = f"did you mean {' or '.join(near)}?"
    else:
        hint = f"available: {', '.join(available) or 'none'}"
    return (f"Unknown preset {name!r} in {where} ({hint}); pass a file as -p path/to/file.toml or a folder of "
            "presets with --preset-dir DIR.")
