"""presets.py and the shipped presets/*.toml."""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest
from pydantic import ValidationError

from diffferv_cli.editing.presets import Preset, builtin_dir, list_presets, load_preset
from diffferv_cli.errors import UserError

REPO = Path(__file__).resolve().parents[1]

REQUIRED = {"age", "young", "man", "woman", "smiling", "blond", "bangs", "lipstick", "glasses"}
TEXTURE = {"age", "young", "blond", "lipstick"}  # paper: tau_app 0.9
SHAPE = {"man", "woman", "smiling", "bangs", "glasses"}  # paper: tau_app 0.7


def test_builtin_presets_are_all_there_and_valid():
    presets = {preset.name: preset for preset in list_presets()}
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
    assert load_preset("pirate", extra_dir=tmp_path) == pirate
    assert load_preset("age", extra_dir=tmp_path).description == "My age."  # the extra folder wins
    assert load_preset("age").description != "My age."
    names = [preset.name for preset in list_presets(tmp_path)]
    assert "pirate" in names and names.count("age") == 1 and names == sorted(names)


def test_unknown_preset_names_the_available_ones():
    with pytest.raises(UserError, match=r"Unknown preset 'elderly'; available: age, .*woman") as caught:
        load_preset("elderly")
    assert "\n" not in str(caught.value)


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
        load_preset("bad", extra_dir=tmp_path)


def test_missing_preset_file_or_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_preset(str(tmp_path / "nope.toml"))
    with pytest.raises(UserError, match="preset folder .* does not exist"):
        list_presets(tmp_path / "nowhere")


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
