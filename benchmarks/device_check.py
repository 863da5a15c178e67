"""GPU acceptance check in one command: every kernel at CALM-M shapes in fp32/bf16/fp16 against its reference.

    python benchmarks/device_check.py            # prints a table; exit status 1 if any check fails

It measures the machine's memory bandwidth and matmul peak first (a 1 GiB copy, an 8192^3 matmul per dtype) and
reports each kernel's time as a percentage of its binding floor. Checks are plain functions in `CHECKS`, each
taking the run's `Context` and returning table `Row`s; later checks (e.g. CUDA-graph replay of the engine) append
themselves to that list. Runs in about two minutes on an H100/H200.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the repository: calm_engine, tests.model_factory
from kernel_cases import FACTORIES, floors  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Acceptance targets of issue 4: fraction of the binding floor a kernel must reach (bf16, CALM-M shapes).
TARGETS = {"energy_head": 0.5, "decode_attention": 0.6}


@dataclass
class Context:
    device: str
    bandwidth: float = 0.0  # bytes/s, measured
    peaks: dict = field(default_factory=dict)  # dtype -> FLOP/s, measured


@dataclass
class Row:
    check: str
    shape: str
    dtype: str
    seconds: float | None = None
    percent_of_floor: float | None = None
    speedup: float | None = None
    error: str | None = None  # None: passed
    note: str = ""


def bench(fn: Callable[[], object]) -> float:
    """Median seconds per call (triton.testing.do_bench: L2 flushed between calls, CUDA-event timing)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3


def measure_ceilings(ctx: Context) -> None:
    source = torch.empty(2**28, device=ctx.device, dtype=torch.float32)  # 1 GiB: far beyond L2
    target = torch.empty_like(source)
    ctx.bandwidth = 2 * source.numel() * 4 / bench(lambda: target.copy_(source))
    for dtype in DTYPES:
        a = torch.randn(8192, 8192, device=ctx.device, dtype=dtype)
        b = torch.randn(8192, 8192, device=ctx.device, dtype=dtype)
        ctx.peaks[dtype] = 2 * 8192**3 / bench(lambda: a @ b)  # noqa: B023  (timed before a, b change)


def kernel_check(op: str) -> Callable[[Context], list[Row]]:
    def check(ctx: Context) -> list[Row]:
        rows = []
        for dtype in DTYPES:
            name = str(dtype).removeprefix("torch.")
            try:
                case = FACTORIES[op](ctx.device, dtype, "calm-m")
                error = case.check()
                kernel_time, reference_time = bench(case.kernel), bench(case.reference)
            except Exception as exc:  # a failing check is a table row, not the end of the run
                rows.append(Row(op, "", name, error=f"{type(exc).__name__}: {exc}"[:160]))
                continue
            memory_floor, compute_floor = floors(case, ctx.bandwidth, ctx.peaks[dtype])
            bound = max(memory_floor, compute_floor)
            percent = 100 * bound / kernel_time
            note = "memory-bound" if memory_floor >= compute_floor else "compute-bound"
            if dtype == torch.bfloat16 and op in TARGETS and percent < 100 * TARGETS[op]:
                note += f"; below the {100 * TARGETS[op]:.0f}% target"
            rows.append(Row(op, case.shape, name, kernel_time, percent, reference_time / kernel_time, error, note))
        return rows

    check.__name__ = f"check_{op}"
    return check


def engine_graph_check(ctx: Context) -> list[Row]:
    """CUDA-graph decode steps of a random CALM-M model (bf16): replay equals the eager step bit for bit in every
    bucket, and the time per step at batch 1, 8 and 64 (T = 1) with and without the graph."""
    from shapes import configs

    from calm_engine.engine.cuda_graph import CudaGraphCapture, DecodeGraphRunner
    from calm_engine.engine.kv_cache import SlotKVCache
    from calm_engine.engine.model_runner import ModelRunner, SamplingBatch
    from calm_engine.model.calm import CalmModel
    from tests.model_factory import randomize_

    calm_config, ae_config = configs("calm_m")
    model = randomize_(CalmModel(calm_config, ae_config), 0).to(ctx.device, torch.bfloat16).eval()
    cache = SlotKVCache(model.config, 64, 256, model.device, model.dtype)
    runner = ModelRunner(model, cache)
    graphs = DecodeGraphRunner(runner, [1, 8, 64], CudaGraphCapture())
    rows = []
    for batch in (1, 8, 64):
        try:
            generator = torch.Generator(device=ctx.device).manual_seed(batch)
            ids = torch.randint(0, calm_config.vocab_size, (batch, calm_config.patch_size), device=ctx.device)
            positions = torch.randint(0, 200, (batch,), device=ctx.device, generator=generator)
            slots = torch.randperm(64, device=ctx.device)[:batch]
            sampling = SamplingBatch(
                torch.arange(batch, device=ctx.device) + 7, torch.zeros(batch, dtype=torch.long, device=ctx.device),
                torch.ones(batch, 1, dtype=torch.bool, device=ctx.device),
                torch.ones(batch, dtype=torch.long, device=ctx.device),
                torch.zeros(batch, dtype=torch.float64, device=ctx.device),
                torch.zeros(batch, dtype=torch.long, device=ctx.device), 0,
            )  # fmt: skip

            def eager(ids=ids, positions=positions, slots=slots, sampling=sampling):
                hidden = runner.decode(ids, positions, slots, cache.capacity)
                return runner.sample_patches(hidden, sampling)[0]

            expected = eager()
            replayed = graphs.run(ids, positions, slots, sampling)[0]
            error = None if torch.equal(replayed, expected) else "graph replay differs from the eager step"
            graph_time = bench(lambda: graphs.run(ids, positions, slots, sampling))  # noqa: B023
            eager_time = bench(eager)
            rows.append(Row("engine_decode_step", f"CALM-M B={batch} T=1", "bfloat16", graph_time, None,
                            eager_time / graph_time, error, "CUDA graph vs eager"))  # fmt: skip
        except Exception as exc:
            rows.append(Row("engine_decode_step", f"B={batch}", "bfloat16", error=f"{type(exc).__name__}: {exc}"[:160]))
    return rows


CHECKS: list[Callable[[Context], list[Row]]] = [kernel_check(op) for op in FACTORIES] + [engine_graph_check]


def print_table(rows: list[Row]) -> None:
    print(f"{'check':18} {'shape':24} {'dtype':9} {'time':>10} {'% floor':>8} {'speed-up':>8}  result")
    for row in rows:
        time_text = f"{row.seconds * 1e6:8.1f}us" if row.seconds is not None else f"{'-':>10}"
        percent = f"{row.percent_of_floor:7.1f}%" if row.percent_of_floor is not None else f"{'-':>8}"
        speedup = f"{row.speedup:7.2f}x" if row.speedup is not None else f"{'-':>8}"
        result = "ok" if row.error is None else f"FAIL {row.error}"
        print(f"{row.check:18} {row.shape:24} {row.dtype:9} {time_text} {percent} {speedup}  {result} {row.note}")


def main(argv: list[str] | None = None) -> int:
    if not torch.cuda.is_available():
        print("device_check: needs a CUDA device (on CPU run `python -m pytest tests/kernels benchmarks`)")
        return 2
    started = time.perf_counter()
    ctx = Context(device="cuda")
    measure_ceilings(ctx)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    peaks = ", ".join(f"{str(d).removeprefix('torch.')} {p / 1e12:.0f} TFLOP/s" for d, p in ctx.peaks.items())
    print(f"measured: copy bandwidth {ctx.bandwidth / 1e12:.2f} TB/s; matmul {peaks}")
    rows: list[Row] = []
    for check in CHECKS:
        rows.extend(check(ctx))
        torch.cuda.empty_cache()
    print_table(rows)
    failed = [row for row in rows if row.error is not None]
    print(f"{len(rows) - len(failed)} ok, {len(failed)} failed in {time.perf_counter() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
