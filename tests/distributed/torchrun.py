"""Helpers of the multi-process tests: a free loopback port and a bounded `torchrun` of the `calm` command."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from tests.conftest import REPO_ROOT

TORCHRUN_TIMEOUT_S = 120  # two processes of a tiny model start and finish in ~15 s on 2 cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *calm_args: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node nproc -m calm_engine.cli ...` on loopback, killed after TORCHRUN_TIMEOUT_S."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
        "--master-port", str(free_port()), "-m", "calm_engine.cli", *calm_args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S)
    assert result.returncode == 0, f"torchrun failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result
