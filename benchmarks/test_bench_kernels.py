"""pytest-benchmark timings of every kernel against its PyTorch reference, with achieved GB/s, GFLOP/s and floors.

On CPU only the references are timed (the triton interpreter is a correctness tool, not a performance path); on CUDA
the Triton kernels too. The floors use ceilings measured in the same run (a large copy, a large matmul).
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import FACTORIES, floors, measure_ceilings, synchronize

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
SIZE = "calm-m" if DEVICE == "cuda" else "cpu"
ROWS: list[str] = []


@pytest.fixture(scope="module")
def ceilings():
    return measure_ceilings(DEVICE, DTYPE, big=DEVICE == "cuda")


@pytest.fixture(scope="module", autouse=True)
def report(request, ceilings):
    yield
    bandwidth, peak = ceilings
    writer = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if writer is None or capture is None:
        return
    with capture.global_and_fixture_disabled():  # print past pytest's output capture, even without -s
        _write_table(writer, bandwidth, peak)


def _write_table(writer, bandwidth: float, peak: float) -> None:
    writer.write_line("")
    writer.write_line(f"{DEVICE} {DTYPE}: measured ceilings {bandwidth / 1e9:.1f} GB/s, {peak / 1e9:.1f} GFLOP/s")
    header = f"{'op':17} {'shape':24} {'provider':9} {'median':>10} {'GB/s':>8} {'GFLOP/s':>9} {'mem floor':>10}"
    writer.write_line(header + f" {'flop floor':>10} {'% of bind':>9}")
    for row in ROWS:
        writer.write_line(row)


@pytest.mark.parametrize("provider", ["torch_ref", "triton"])
@pytest.mark.parametrize("op", list(FACTORIES))
def test_bench(benchmark, ceilings, op, provider):
    if provider == "triton" and DEVICE != "cuda":
        pytest.skip("CPU: the triton interpreter is not a performance path; only references are timed")
    case = FACTORIES[op](DEVICE, DTYPE, SIZE)
    fn = case.kernel if provider == "triton" else case.reference

    def run():
        fn()
        synchronize(DEVICE)

    benchmark.group = op
    benchmark.pedantic(run, rounds=5 if DEVICE == "cpu" else 50, iterations=1, warmup_rounds=1)
    seconds = benchmark.stats.stats.median
    memory_floor, compute_floor = floors(case, *ceilings)
    bound = max(memory_floor, compute_floor)
    benchmark.extra_info.update(
        gb_per_s=case.bytes / seconds / 1e9, gflop_per_s=case.flops / seconds / 1e9, memory_floor_s=memory_floor,
        compute_floor_s=compute_floor, device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        torch=torch.__version__,
    )  # fmt: skip
    ROWS.append(
        f"{op:17} {case.shape:24} {provider:9} {seconds * 1e3:8.3f}ms {case.bytes / seconds / 1e9:8.2f} "
        f"{case.flops / seconds / 1e9:9.1f} {memory_floor * 1e3:8.3f}ms {compute_floor * 1e3:8.3f}ms "
        f"{100 * bound / seconds:8.1f}%"
    )
