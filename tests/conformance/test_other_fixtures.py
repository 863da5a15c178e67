"""The conformance suite runs unchanged on fixtures of other shapes.

- official_fixtures/: made by the official implementation (a script of ours run outside the repository; no
  official code is committed): K=2 with grouped-query attention, rope_theta 5e5, pad id 299 and a 4+4-layer
  autoencoder; K=8 with biases and linear rope scaling. Their READMEs describe them.
- make_fixture.py variants: written by our own saver, expected outputs from our float64 reference.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conformance.make_fixture import VARIANTS, make_fixture
from tests.conftest import REPO_ROOT

OFFICIAL_FIXTURES = Path(__file__).parent / "official_fixtures"


def run_suite(fixture_dir: Path) -> None:
    env = {**os.environ, "CALM_CONFORMANCE_DIR": str(fixture_dir)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/conformance/test_conformance.py",
            "tests/conformance/test_engine_conformance.py",
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


@pytest.mark.parametrize("name", sorted(p.name for p in OFFICIAL_FIXTURES.iterdir() if p.is_dir()))
def test_suite_passes_on_official_fixture(name):
    run_suite(OFFICIAL_FIXTURES / name)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_suite_passes_on_made_fixture(tmp_path, variant):
    make_fixture(tmp_path / variant, variant)
    run_suite(tmp_path / variant)
