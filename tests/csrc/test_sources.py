"""csrc/'s layout, checked by reading the sources: every file short enough to read, every file built or tracked by
setup.py (a header missing from `depends` would leave a stale extension after an edit), the test-only bindings in
their own file and submodule."""

from __future__ import annotations

import re

import pytest

from tests.conftest import REPO_ROOT
from tests.test_architecture import MAX_LINES

CSRC = REPO_ROOT / "csrc"
SOURCES = sorted(p for p in CSRC.iterdir() if p.suffix in (".cpp", ".h"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_no_source_is_too_long(path):
    lines = path.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_LINES, f"csrc/{path.name} has {lines} lines: split it by concern"


def test_setup_builds_every_source_and_tracks_every_header():
    named = set(re.findall(r'"csrc/([\w.]+)"', (REPO_ROOT / "setup.py").read_text(encoding="utf-8")))
    assert named == {p.name for p in SOURCES}
    assert all((CSRC / name).is_file() for name in named)


def test_the_test_bindings_are_apart():
    """Only test_bindings.cpp defines the `testing` submodule; the module's own bindings define no test helper."""
    defining = [p.name for p in SOURCES if 'def_submodule("testing"' in p.read_text(encoding="utf-8")]
    assert defining == ["test_bindings.cpp"]
    assert "packed_linear_into" not in (CSRC / "bindings.cpp").read_text(encoding="utf-8")
