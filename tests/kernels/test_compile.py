"""Every kernel launch compiles for sm_80 and sm_90 without a GPU (benchmarks/compile_check.py).

The check runs in subprocesses with triton's interpreter off (this pytest process has it on for the other kernel
tests, and a kernel is interpreted or compiled from its definition on): one worker per target records the launchers'
launches through a stub driver and compiles each distinct one to cubin with triton's bundled ptxas. It fails on a
compile error, shared memory over the target's limit, a register spill in a bf16/fp16 decode step, unpipelined K/V
loads in half-precision decode attention, or a kernel no plan launches. Its table prints below the test results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from tests.kernels.conftest import needs_triton

pytestmark = needs_triton

ENGINE_BUCKETS = 11  # default_buckets(64): 1, 2, 4, 8, 16, ..., 64
ENGINE_PLANS = 2 * ENGINE_BUCKETS * 3  # bf16 and fp16, T = 1 and T = 0.5 with both samplers


def _environment() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("TRITON_")}


def _print_past_capture(request, text: str) -> None:
    writer = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if writer is None or capture is None:
        return
    with capture.global_and_fixture_disabled():
        writer.write_line("")
        for line in text.splitlines():
            writer.write_line(line)


def test_every_launch_compiles_for_sm80_and_sm90(request, tmp_path):
    out = tmp_path / "launches.json"
    command = [sys.executable, "benchmarks/compile_check.py", "--json", str(out)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=_environment(), capture_output=True, text=True, timeout=1800)
    _print_past_capture(request, result.stdout)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-4000:]
    data = json.loads(out.read_text())
    assert sorted(data) == ["80", "90"]
    for arch, run in data.items():
        assert run["failures"] == [], arch
        engine = {label: count for label, count in run["plans"].items() if label.startswith("engine")}
        assert len(engine) == ENGINE_PLANS and all(engine.values()), f"sm_{arch}: engine plans {engine}"
        launches = run["launches"]
        assert all(launch["error"] is None and launch["regs"] for launch in launches)
        decode = [launch for launch in launches if launch["decode_half"]]
        assert decode and all(launch["spill_stores"] == 0 for launch in decode)
        reduce = [launch for launch in decode if launch["kernel"].endswith("._argmax_reduce_kernel")]
        assert reduce, f"sm_{arch}: the decode step's argmax reduction was not recorded"


DRIFT = """
import sys
sys.path.insert(0, "benchmarks")
import torch
import compile_check
recorder = compile_check.Recorder(90)
recorder.install()
from calm_engine.kernels.rms_norm import _rms_norm_kernel, rms_norm
x, w = torch.randn(3, 40), torch.randn(40)
recorder.plan("launcher", "fp32", False, lambda: rms_norm(x, w, 1e-6))
recorder.plan("drifted", "fp32", False, lambda: _rms_norm_kernel[(3,)](x, w, x, 40, 40, 40, 1e-6, BLOCK=64, BLOK=2))
recorder.plan("missing", "fp32", False, lambda: _rms_norm_kernel[(3,)](x, w, x, 40, 40, 1e-6, BLOCK=64))
(launch,) = recorder.launches.values()
print("VARIANT", launch.variant, launch.dtype, launch.plans)
for failure in recorder.failures:
    print("FAILURE", failure)
"""


def test_the_recorder_sees_launches_through_the_launcher_and_catches_drift():
    """A launch is recorded with its constexprs and options, not compiled or run; a launch passing an argument the
    kernel does not take, or missing one, fails as it would on a GPU."""
    result = subprocess.run([sys.executable, "-c", DRIFT], cwd=REPO_ROOT, env=_environment(), capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.splitlines()
    assert "VARIANT BLOCK=64 w1 s3 fp32 ['launcher']" in lines
    failures = [line for line in lines if line.startswith("FAILURE")]
    assert len(failures) == 2
    assert "drifted" in failures[0] and "BLOK" in failures[0]
    assert "missing" in failures[1] and "TypeError" in failures[1]


@pytest.mark.parametrize("text, regs, stores, loads", [
    ("ptxas info    : Function properties for k\n    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
     "ptxas info    : Used 80 registers, used 1 barriers", 80, 0, 0),
    ("    9072 bytes stack frame, 20712 bytes spill stores, 22448 bytes spill loads\n"
     "ptxas info    : Used 64 registers, used 0 barriers, 9072 bytes cumulative stack size", 64, 20712, 22448),
])  # fmt: skip
def test_ptxas_report_parsing(text, regs, stores, loads):
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        import compile_check
    finally:
        sys.path.pop(0)
    launch = compile_check.Launch("k", "key", "", "fp32", [])
    compile_check._read_ptxas_report(text, launch)
    assert (launch.regs, launch.spill_stores, launch.spill_loads, launch.error) == (regs, stores, loads, None)
    compile_check._read_ptxas_report("ptxas info : 0 bytes gmem", launch)
    assert launch.error is not None
