"""The conformance suite runs unchanged on fixtures of other shapes, written in the official layout by our saver."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conformance.make_fixture import VARIANTS, make_fixture
from tests.conftest import REPO_ROOT


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_suite_passes_on_made_fixture(tmp_path, variant):
    make_fixture(tmp_path / variant, variant)
    env = {**os.environ, "CALM_CONFORMANCE_DIR": str(tmp_path / variant)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/conformance/test_conformance.py"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout
