"""Fixtures for the conformance suite: the fixture directory (CALM_CONFORMANCE_DIR) and models loaded from it."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import pytest

import calm_engine
from tests.conformance.fixture_format import CHECKPOINT_DIRS, Fixture
from tests.conftest import SHARED_DIR


def conformance_dir() -> Path:
    return Path(os.environ.get("CALM_CONFORMANCE_DIR", SHARED_DIR / "conformance"))


@cache
def _fixture() -> Fixture:
    root = conformance_dir()
    if not (root / "cases.json").is_file():
        pytest.fail(f"conformance fixture missing: {root}/cases.json (set CALM_CONFORMANCE_DIR or provide ../shared)")
    return Fixture.open(root)


@cache
def _calm(fmt: str):
    return calm_engine.load(_fixture().checkpoint_dir(fmt, "calm"))


@cache
def _autoencoder(fmt: str, source: str):
    if source == "standalone":
        return calm_engine.load_autoencoder(_fixture().checkpoint_dir(fmt, "autoencoder"))
    return _calm(fmt).autoencoder


@pytest.fixture
def fixture() -> Fixture:
    return _fixture()


@pytest.fixture(params=sorted(CHECKPOINT_DIRS))
def model(request):
    """The CALM model, from the pickled and from the safetensors copy."""
    return _calm(request.param)


@pytest.fixture(
    params=[(fmt, source) for fmt in sorted(CHECKPOINT_DIRS) for source in ("standalone", "embedded")],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def autoencoder(request):
    """The autoencoder from its own checkpoint and from the CALM checkpoint's ae_model.* copy, in both formats."""
    return _autoencoder(*request.param)
