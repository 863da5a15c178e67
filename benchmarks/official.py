"""The official implementation as a benchmark baseline: is it available here, and run its `generate` timing.

The official checkout is never imported into this process: `run_official` runs official_generate.py in
$CALM_OFFICIAL_PYTHON (transformers==4.43.0; default: this interpreter) with $CALM_OFFICIAL_DIR on its path.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import unittest
from pathlib import Path

OFFICIAL_DIR_ENV = "CALM_OFFICIAL_DIR"
OFFICIAL_PYTHON_ENV = "CALM_OFFICIAL_PYTHON"
OFFICIAL_TRANSFORMERS_VERSION = "4.43.0"
OFFICIAL_GENERATE_SCRIPT = Path(__file__).with_name("official_generate.py")

# run_official's keyword arguments, each the script option of the same name with '-' for '_'.
GENERATE_OPTIONS = (
    "batch",
    "prompt_len",
    "new_tokens",
    "temperature",
    "num_samples",
    "threads",
    "repeats",
    "warmup",
    "seed",
)


class OfficialUnavailable(unittest.SkipTest):
    """No usable official checkout or interpreter; pytest reports it as a skip, a script can catch it."""


def official_python() -> str:
    return os.environ.get(OFFICIAL_PYTHON_ENV) or sys.executable


def official_unavailable_reason() -> str | None:
    """Why the official baseline cannot run here, or None when it can."""
    official_dir = os.environ.get(OFFICIAL_DIR_ENV)
    if not official_dir:
        return f"${OFFICIAL_DIR_ENV} is not set (a checkout of github.com/shaochenze/calm)"
    if not Path(official_dir, "models", "modeling_energy.py").is_file():
        return f"${OFFICIAL_DIR_ENV}={official_dir} holds no models/modeling_energy.py"
    return _python_problem(official_python())


@functools.cache
def _python_problem(python: str) -> str | None:
    query = "import importlib.metadata as m; print(m.version('torch')); print(m.version('transformers'))"
    try:
        completed = subprocess.run([python, "-c", query], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"${OFFICIAL_PYTHON_ENV}={python} does not run: {error}"
    if completed.returncode != 0:
        return f"${OFFICIAL_PYTHON_ENV}={python} lacks torch or transformers: {last_line(completed.stderr)}"
    versions = completed.stdout.split()
    transformers_version = versions[1] if len(versions) == 2 else completed.stdout.strip()
    if transformers_version != OFFICIAL_TRANSFORMERS_VERSION:
        return (
            f"${OFFICIAL_PYTHON_ENV}={python} has transformers {transformers_version}; the official code needs "
            f"{OFFICIAL_TRANSFORMERS_VERSION}"
        )
    return None


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def official_available() -> bool:
    return official_unavailable_reason() is None


def run_official(checkpoint: str | Path, *, timeout_s: float | None = None, **options) -> dict:
    """Time the official generate on `checkpoint` in a subprocess; returns official_generate.py's JSON result.

    `options` are GENERATE_OPTIONS (e.g. batch=8, prompt_len=32, new_tokens=64, temperature=1.0, threads=2).
    Raises OfficialUnavailable (a skip under pytest) when the official code is not usable here.
    """
    unknown = sorted(set(options) - set(GENERATE_OPTIONS))
    if unknown:
        raise TypeError(f"unknown official generate option(s) {unknown}; known: {list(GENERATE_OPTIONS)}")
    reason = official_unavailable_reason()
    if reason is not None:
        raise OfficialUnavailable(reason)
    command = [official_python(), str(OFFICIAL_GENERATE_SCRIPT), "--checkpoint", str(checkpoint)]
    for name, value in options.items():
        command += [f"--{name.replace('_', '-')}", str(value)]
    env = dict(os.environ)
    if "threads" in options:
        # set_num_threads covers intra-op work; OpenMP's own pool must not spawn one thread per core beside it.
        env["OMP_NUM_THREADS"] = str(options["threads"])
    try:
        completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(f"official generate timed out after {timeout_s} s: {' '.join(command)}") from error
    if completed.returncode != 0:
        raise RuntimeError(
            f"official generate failed (exit {completed.returncode}): {' '.join(command)}\n"
            f"{completed.stderr.strip()[-4000:]}"
        )
    lines = completed.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise RuntimeError(
            f"official generate printed no JSON result: {' '.join(command)}\nstdout: {completed.stdout[-2000:]}\n"
            f"stderr: {completed.stderr.strip()[-2000:]}"
        ) from None
    if result.get("impl") != "official":
        raise RuntimeError(f"official generate printed an unexpected result: {lines[-1]}")
    return result
