"""presets.py and the shipped presets/*.toml."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from diffferv_cli.editing.presets import (
    ENV_VAR,
    Preset,
    builtin_dir,
    list_presets,
    load_preset,
    preset_folders,
)
from diffferv_cli.errors import UserError

REPO = Path(__file__).resolve().parents[1]

REQUIRED = {"age", "young", "man", "woman", "smiling", "blond", "bangs", "lipstick", "glasses"}
TEXTURE = {"age", "young", "blond", "lipstick"}  # paper: tau_app 0.9
SHAPE = {"man", "woman", "smiling", "bangs", "glasses"}  # paper: tau_app 0.7


def test_builtin_presets_are_all_there_and_valid():
    listing = list_presets()
    presets = {preset.name: preset for preset in listing.presets}
    assert not listing.problems and set(listing.folders.values()) == {builtin_dir()}
    assert REQUIRED <= set(presets)
    assert sorted(presets) == sorted(path.stem for path in builtin_dir().glob("*.toml"))
    for name in TEXTURE:
        assert presets[name].tau_app == 0.9
    for name in SHAPE:
        assert presets[name].tau_app == 0.7
    assert all(preset.guidance == 5.0 and preset.subject == "person" for preset in presets.values())


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_edit_prompt_shares_most_words_with_the_source(name):
    source, edited = load_preset(name).prompts()
    assert source == "a photo of a person"
    source_words, edit_words = source.split(), edited.split()
    matcher = difflib.SequenceMatcher(a=source_words, b=edit_words)
    shared = sum(block.size for block in matcher.get_matching_blocks())
    assert shared >= len(source_words) - 1  # at most one source word swapped (person -> man)
    assert len(edit_words) - shared <= 3  # one to three new words


def test_subject_fills_both_prompts():
    assert load_preset("age").prompts("woman") == ("a photo of a woman", "a photo of an old woman")
    assert load_preset("man").prompts("child") == ("a photo of a child", "a photo of a man")


def test_preset_is_frozen_and_strict():
    preset = load_preset("age")
    with pytest.raises(ValidationError):
        preset.tau_app = 0.5
    with pytest.raises(ValidationError):
        Preset(name="x", description="d", edit_prompt="e", colour="red")


def test_load_by_path_and_from_an_extra_folder(tmp_path):
    (tmp_path / "age.toml").write_text('description = "My age."\nedit_prompt = "a photo of a very old {subject}"\n')
    (tmp_path / "pirate.toml").write_text('description = "Arr."\nedit_prompt = "a photo of a {subject} as a pirate"\n'
                                          'tau_app = 0.8\nguidance = 7.5\nsubject = "sailor"\n')
    pirate = load_preset(str(tmp_path / "pirate.toml"))
    assert pirate.name == "pirate" and pirate.prompts() == ("a photo of a sailor", "a photo of a sailor as a pirate")
    assert load_preset("pirate", [tmp_path]) == pirate
    assert load_preset("age", [tmp_path]).description == "My age."  # the extra folder wins
    assert load_preset("age").description != "My age."
    listing = list_presets([tmp_path])
    names = [preset.name for preset in listing.presets]
    assert "pirate" in names and names.count("age") == 1 and names == sorted(names)
    assert listing.folders["age"] == listing.folders["pirate"] == tmp_path
    assert listing.folders["man"] == builtin_dir()


def test_unknown_preset_names_the_available_ones():
    with pytest.raises(UserError, match=r"Unknown preset 'elderly' in the built-in presets \(available: age, .*, young\)") \
            as caught:
        load_preset("elderly")
    assert "\n" not in str(caught.value)


def test_unknown_preset_suggests_near_names_the_path_form_and_preset_dir(tmp_path):
    (tmp_path / "redhair.toml").write_text('description = "Red."\nedit_prompt = "a photo of a {subject} with red hair"\n')
    with pytest.raises(UserError) as caught:
        load_preset("agee")
    assert str(caught.value) == ("Unknown preset 'agee' in the built-in presets (did you mean age?); pass a file as "
                                 "-p path/to/file.toml or a folder of presets with --preset-dir DIR.")
    with pytest.raises(UserError, match=rf"'redhiar' in {tmp_path} or the built-in presets \(did you mean redhair\?\)"):
        load_preset("redhiar", [tmp_path])
    with pytest.raises(UserError, match=r"\(available: .*redhair"):  # no near name: all of them, the folder's too
        load_preset("elderly", [tmp_path])


def _preset(folder: Path, name: str, description: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.toml"
    path.write_text(f'description = "{description}"\nedit_prompt = "a photo of a {{subject}} with red hair"\n')
    return path


def test_the_first_folder_that_has_a_name_wins_then_the_builtins(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    _preset(first, "redhair", "First.")
    _preset(second, "redhair", "Second.")
    _preset(second, "auburn", "Auburn.")
    assert load_preset("redhair", [first, second]).description == "First."
    assert load_preset("redhair", [second, first]).description == "Second."
    assert load_preset("auburn", [first, second]).description == "Auburn."
    listing = list_presets([first, second])
    shown = {preset.name: preset.description for preset in listing.presets}
    assert shown["redhair"] == "First." and shown["auburn"] == "Auburn." and "age" in shown
    assert listing.folders["redhair"] == first and listing.folders["auburn"] == second


def test_preset_folders_come_from_the_option_else_the_environment(tmp_path, monkeypatch):
    one, two, three = tmp_path / "one", tmp_path / "two", tmp_path / "three"
    for folder in (one, two, three):
        folder.mkdir()
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert preset_folders() == [] and preset_folders([]) == []
    monkeypatch.setenv(ENV_VAR, f"{one}{os.pathsep}{os.pathsep}{two}{os.pathsep}")  # empty parts are skipped
    assert preset_folders() == [one, two]
    assert preset_folders([three]) == [three]  # the option replaces the variable
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "gone"))
    with pytest.raises(UserError) as caught:
        preset_folders()
    assert str(caught.value) == f"The preset folder {tmp_path / 'gone'} (DIFFFERV_PRESETS) does not exist."
    with pytest.raises(UserError, match=r"\(--preset-dir\) does not exist"):
        preset_folders([one, tmp_path / "gone"])


def test_a_broken_file_is_reported_and_hides_no_other_preset(tmp_path):
    _preset(tmp_path, "redhair", "Red.")
    (tmp_path / "broken.toml").write_text('description = "x\n')
    (tmp_path / "age.toml").write_text('description = "no edit prompt"\n')  # shadows the built-in age, broken
    listing = list_presets([tmp_path])
    names = [preset.name for preset in listing.presets]
    assert "redhair" in names and "man" in names
    assert "age" not in names  # `-p age` reads this folder's broken age.toml, so the listing does not offer the built-in
    assert [(path.name, reason) for path, reason in listing.problems] == [
        ("age.toml", "Preset file age.toml: missing field 'edit_prompt'."),
        ("broken.toml", listing.problems[1][1]),
    ]
    assert listing.problems[1][1].startswith("Preset file broken.toml is not valid TOML: ")


@pytest.mark.parametrize("text, message", [
    ('description = "x"\nedit_prompt = a photo\n', r"bad.toml is not valid TOML: .*line 2"),
    ('description = "x"\n', r"bad.toml: missing field 'edit_prompt'"),
    ('description = "x"\nedit_prompt = "y"\ntau = 0.5\n', r"bad.toml: unknown field 'tau'"),
    ('description = "x"\nedit_prompt = "y"\ntau_app = 1.5\n', r"bad.toml: tau_app: .*less than or equal to 1"),
    ('description = "x"\nedit_prompt = "y"\nguidance = "high"\n', r"bad.toml: guidance: "),
    ('description = "x"\nedit_prompt = "a photo of a {person}"\n', r"bad.toml: edit_prompt: .*\{subject\}"),
    ('description = "x"\nedit_prompt = "a photo of a {subject}"\n', r"bad.toml: .*same as source_prompt"),
    ('name = "other"\ndescription = "x"\nedit_prompt = "y"\n', r"bad.toml: name 'other' does not match"),
    ('description = "two\\nlines"\nedit_prompt = "y"\n', r"bad.toml: description: must be one"),
])
def test_malformed_preset_is_one_line_naming_file_and_field(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UserError, match=message) as caught:
        load_preset(str(path))
    assert "\n" not in str(caught.value)
    with pytest.raises(UserError, match=message):
        load_preset("bad", [tmp_path])


def test_missing_preset_file_or_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_preset(str(tmp_path / "nope.toml"))
    with pytest.raises(UserError, match="preset folder .* does not exist"):
        preset_folders([tmp_path / "nowhere"])


def test_builtin_presets_are_found_in_a_wheel_install(tmp_path, monkeypatch):
    """Outside a source checkout the presets come from <prefix>/share/diffferv/presets (pyproject data-files)."""
    import sys

    import diffferv_cli.editing.presets as presets_module

    installed = tmp_path / "prefix" / "share" / "diffferv" / "presets"
    installed.mkdir(parents=True)
    for source in (REPO / "presets").glob("*.toml"):
        (installed / source.name).write_text(source.read_text())
    monkeypatch.setattr(presets_module, "__file__", str(tmp_path / "site-packages" / "diffferv_cli" / "presets.py"))
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "prefix"))
    assert presets_module.builtin_dir() == installed
    assert presets_module.load_preset("age").tau_app == 0.9
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"share/diffferv/presets" = ["presets/*.toml"]' in pyproject


# The CLI: --preset-dir and $DIFFFERV_PRESETS reach the lookup ------------------------------------------


class Stop(Exception):
    """Raised by the stand-in job once the CLI has handed over the edits it built."""


@pytest.fixture
def edits(monkeypatch):
    """Stand-ins for the clip loader and the edit job: record the edit configs, then stop."""
    import diffferv_cli.cli.edit as edit_cli
    import diffferv_cli.editing.job as job

    seen: dict[str, object] = {}

    def run_edits(components, video, inversion, configs, **kwargs):
        seen.update(inversion=inversion, configs=configs)
        raise Stop

    monkeypatch.setattr(edit_cli, "_load", lambda *args, **kwargs: (SimpleNamespace(), SimpleNamespace()))
    monkeypatch.setattr(job, "run_edits", run_edits)
    return seen


def _edit(*args: str, env: dict[str, str] | None = None):
    from typer.testing import CliRunner

    from diffferv_cli.cli import app

    return CliRunner().invoke(app, ["edit", "clip.mp4", *args], env=env)


def _prompts(edits) -> list[tuple[str, str]]:
    return [(label, config.prompt_edit) for label, config in edits["configs"]]


def test_edit_finds_a_preset_in_preset_dir(edits, tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    _preset(tmp_path / "mine", "redhair", "Red.")
    result = _edit("-p", "redhair", "-p", "age", "--preset-dir", str(tmp_path / "mine"))
    assert isinstance(result.exception, Stop), result.output
    assert _prompts(edits) == [("redhair", "a photo of a person with red hair"), ("age", "a photo of an old person")]
    assert edits["inversion"].prompt == "a photo of a person"
    result = _edit("-p", "redhair")  # without the folder the name is unknown
    assert result.exit_code == 2 and "Unknown preset 'redhair'" in result.output and "Traceback" not in result.output


def test_edit_finds_a_preset_through_the_environment_and_the_option_replaces_it(edits, tmp_path, monkeypatch):
    empty, mine, theirs = tmp_path / "empty", tmp_path / "mine", tmp_path / "theirs"
    empty.mkdir()
    _preset(mine, "redhair", "Mine.")
    (theirs / "redhair.toml").parent.mkdir()
    (theirs / "redhair.toml").write_text('description = "Theirs."\nedit_prompt = "a photo of a {subject} with pink hair"\n')
    monkeypatch.setenv(ENV_VAR, f"{empty}{os.pathsep}{mine}")
    assert isinstance(_edit("-p", "redhair").exception, Stop)
    assert _prompts(edits) == [("redhair", "a photo of a person with red hair")]
    assert isinstance(_edit("-p", "redhair", "--preset-dir", str(theirs)).exception, Stop)
    assert _prompts(edits) == [("redhair", "a photo of a person with pink hair")]


def test_edit_with_an_unknown_preset_or_folder_is_one_sentence(edits, tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    result = _edit("-p", "agee")
    assert result.exit_code == 2 and not edits
    assert result.output.strip().splitlines() == [
        "Error: Unknown preset 'agee' in the built-in presets (did you mean age?); pass a file as "
        "-p path/to/file.toml or a folder of presets with --preset-dir DIR."]
    result = _edit("-p", "age", "--preset-dir", str(tmp_path / "nowhere"))
    assert result.exit_code == 2 and "does not exist" in result.output and not edits
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "nowhere"))  # a stale variable does not get in the way of a prompt
    assert isinstance(_edit("--prompt-edit", "a photo of an old person").exception, Stop)


def _presets(*args: str):
    from typer.testing import CliRunner

    from diffferv_cli.cli import app

    return CliRunner().invoke(app, ["presets", *args], env={"COLUMNS": "300"})


def test_presets_lists_a_folder_and_names_each_bad_file(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    mine = tmp_path / "mine"
    _preset(mine, "redhair", "Red hair for a test.")
    result = _presets("--dir", str(mine))
    assert result.exit_code == 0, result.output
    assert "Red hair for a test." in result.stdout and f"{mine}" in result.stdout and "built-in" in result.stdout
    (mine / "broken.toml").write_text('description = "x\n')
    (mine / "short.toml").write_text('description = "x"\n')
    result = _presets("--preset-dir", str(mine))
    assert result.exit_code == 2
    assert "Red hair for a test." in result.stdout and "Older" in result.stdout  # the good ones, mine and built-in
    assert f"Skipped {mine / 'broken.toml'}: Preset file broken.toml is not valid TOML" in result.stderr
    assert f"Skipped {mine / 'short.toml'}: Preset file short.toml: missing field 'edit_prompt'." in result.stderr
    assert result.stderr.strip().splitlines()[-1] == ("Error: 2 preset files could not be read (named above); fix or "
                                                      "remove them, the presets in the table work.")
    monkeypatch.setenv(ENV_VAR, str(mine))  # the variable is the default folder of the listing too
    assert "Red hair for a test." in _presets().stdout
