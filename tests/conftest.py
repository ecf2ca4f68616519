"""Shared pytest fixtures (keep generic; other test files may add theirs here)."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture
def repo_root() -> Path:
    """The repository root (for configs/ and offline/ scripts)."""
    return REPO


@pytest.fixture
def fixtures_dir() -> Path:
    """tests/fixtures: small hand-written input files."""
    return FIXTURES


@pytest.fixture
def write_lines(tmp_path):
    """Write lines (str or bytes) to a fresh file under tmp_path, one per line; returns its path."""
    def write(name: str, lines: list) -> Path:
        path = tmp_path / name
        path.write_bytes(b"".join((ln if isinstance(ln, bytes) else ln.encode("utf-8")) + b"\n" for ln in lines))
        return path
    return write
