"""The settings that made an output, recorded in the output file itself.

`write_video(settings=...)` puts them in the MP4's global `description` tag as one line,
`diffferv settings: {json}` (the `comment` tag keeps the frame selection, `probe.selection_tag`), so an
HTML report (`evaluation/html.py`) or a person with `ffprobe` can say how an edit was made without any
side file. Files written before the tag existed, or by other tools, have none: `read_settings` gives None.
"""

from __future__ import annotations

import json
from pathlib import Path

SETTINGS_TAG = "description"  # the MP4 metadata key `write_video(settings=...)` fills
_PREFIX = "diffferv settings: "


def settings_tag(settings: dict) -> str:
    """The metadata text that records `settings` (JSON-serialisable values) in an output file."""
    return _PREFIX + json.dumps(settings, ensure_ascii=True, separators=(", ", ": "))


def parse_settings_tag(text: str | None) -> dict | None:
    """The settings `settings_tag` wrote, or None for any other text (another tool's description)."""
    text = (text or "").strip()
    if not text.startswith(_PREFIX):
        return None
    try:
        settings = json.loads(text[len(_PREFIX):])
    except ValueError:
        return None
    return settings if isinstance(settings, dict) else None


def read_settings(path) -> dict | None:
    """The settings recorded in the video `path`, None when it records none (or is no video)."""
    import av

    from diffferv_cli.video.probe import file_url

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with av.open(file_url(path)) as container:
            return parse_settings_tag(container.metadata.get(SETTINGS_TAG))
    except (av.error.FFmpegError, OSError, ValueError):
        return None
