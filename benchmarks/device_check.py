"""The GPU check in one command: what CI cannot settle without a device, in about 5 minutes on an H200.

    python benchmarks/device_check.py               # every check; each row prints as it is measured; exit 1 on a fail
    OUT=dir python benchmarks/device_check.py       # also rewrites dir/device_check.json after every row
    python benchmarks/device_check.py --dry-run     # CPU: builds every check's inputs at small shapes, runs the PyTorch
                                                    # paths, skips the kernels, and prints each check's time budget

Checks and their time limits (seconds on an H200, cold triton cache; a check past its limit becomes a failed row and
the run goes on):
- tests, sanitizer (background, started first, one process per test file so triton compiles on many cores):
  tests/kernels' CUDA-only rows (bf16/fp16 at the tests' odd shapes, several split counts), and the small-shape rows
  again under TRITON_DEBUG=1 (triton's debug mode: device asserts and overflow-checked offset arithmetic).
- attention: decode attention with GQA, ragged lengths, padding rows (slot -1, length 0) and a 2,048-chunk cache at
  batch 1 (the split path), each dtype against its reference.
- engine: a CALM-M model (bf16, 16 layers): CUDA-graph replay vs the eager step vs the plain PyTorch path
  (TorchOps) at T = 1 and T = 0.5 with both samplers, three rows in a bucket of four (one padding row);
  ids equal between graph and eager, hidden states within tolerance of PyTorch, and on a float32 model ids equal
  to PyTorch's too.
- timings (after the background checks, alone on the GPU): measured ceilings (copy bandwidth, matmul peak per
  dtype); every kernel at CALM-M shapes in fp32/bf16/fp16 against its reference and its floor (energy head >= 50%
  of its floor, decode attention >= 60%, bf16); the decode step per graph bucket (batch 1 <= 2x the HBM floor of the
  weights it reads; batch 64 in tokens/s).
No pre-compiled triton cache is carried: its keys would have to match this machine's (target, ptxas, triton source),
which nothing here shows, so every kernel compiles cold within the budgets above.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(REPO_ROOT))  # the repository: calm_engine, kernels, tests
from kernel_cases import FACTORIES, floors  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Acceptance targets (issue 4 and 18): fraction of the binding floor a kernel reaches at CALM-M shapes in bf16.
KERNEL_TARGETS = {"energy_head": 0.5, "decode_attention": 0.6}
STEP_FLOOR_FACTOR = 2.0  # the batch-1 decode step must take at most this many times the HBM floor of its weights
# Seconds each check may take (an H200, cold triton cache); the dry run prints them and their total.
BUDGETS = {
    "tests": 120,  # background: the 112 CUDA-only rows, one process per file
    "sanitizer": 120,  # background, concurrently with tests
    "engine": 90,  # alongside the background checks
    "ceilings": 10,
    "attention": 25,
    "kernels": 70,
    "steps": 45,
}
WALL_BUDGET = 300
TEST_FILES = sorted(p.name for p in (REPO_ROOT / "tests" / "kernels").glob("test_*.py") if p.name != "test_compile.py")
CUDA_ROWS = "bf16 or fp16"  # tests/kernels' rows marked cuda_only carry these ids
SANITIZER_ROWS = "not calm_m and not bf16"  # small shapes, fp32 and fp16, under TRITON_DEBUG=1


@dataclasses.dataclass
class Row:
    check: str
    name: str
    dtype: str = ""
    seconds: float | None = None  # measured (median) time
    floor: float | None = None  # the binding floor (bytes / bandwidth or FLOPs / peak), seconds
    target: str = ""  # what passing means, e.g. ">= 50% of floor"
    passed: bool | None = None  # None: informational, neither passes nor fails
    note: str = ""

    def line(self) -> str:
        time_text = f"{self.seconds * 1e6:9.1f}us" if self.seconds is not None else f"{'-':>11}"
        floor_text = f"{self.floor * 1e6:9.1f}us" if self.floor is not None else f"{'-':>11}"
        percent = f"{100 * self.floor / self.seconds:6.1f}%" if self.floor and self.seconds else f"{'-':>7}"
        result = {True: "ok", False: "FAIL", None: "info"}[self.passed]
        return (f"{self.check:10} {self.name:44} {self.dtype:5} {time_text} {floor_text} {percent}  {result:4} "
                f"{self.target} {self.note}").rstrip()  # fmt: skip


class Report:
    """Prints each row as it comes and rewrites $OUT/device_check.json after each, so a timeout loses nothing."""

    HEADER = f"{'check':10} {'what':44} {'dtype':5} {'time':>11} {'floor':>11} {'%floor':>7}  result"

    def __init__(self, out_dir: str | None, meta: dict):
        self.rows: list[Row] = []
        self.meta = meta
        self.path = Path(out_dir) / "device_check.json" if out_dir else None
        print(self.HEADER, flush=True)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print(row.line(), flush=True)
        if self.path is not None:
            data = {"meta": self.meta, "rows": [dataclasses.asdict(r) for r in self.rows]}
            self.path.write_text(json.dumps(data, indent=1))

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.passed is False]


class CheckTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise CheckTimeout in the main thread after `seconds` (checked whenever Python runs between GPU calls)."""

    def expire(signum, frame):
        raise CheckTimeout(f"over its {seconds:.0f} s limit")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclasses.dataclass
class Context:
    device: str
    dry_run: bool
    bandwidth: float = 0.0  # bytes/s, measured
    peaks: dict = dataclasses.field(default_factory=dict)  # dtype -> FLOP/s, measured
    models: dict = dataclasses.field(default_factory=dict)  # (shape, dtype) -> random model, built once per run


def bench(ctx: Context, fn: Callable[[], object]) -> float:
    """Median seconds per call: triton.testing.do_bench (CUDA events, L2 flushed between calls)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") / 1e3


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    if not torch.isfinite(actual).all():
        return float("inf")
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 4e-2, torch.float16: 1e-2}


# ---- background: the kernel tests on the GPU, and again under triton's debug mode ---------------------------------


class PytestRun:
    """tests/kernels files as concurrent pytest processes, each writing a JUnit XML report."""

    def __init__(self, check: str, selection: str, env: dict, tmp: Path):
        self.check, self.selection, self.tmp = check, selection, tmp
        self.processes = {}
        self.started = time.perf_counter()
        for name in TEST_FILES:
            xml = tmp / f"{check}-{name}.xml"
            command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"tests/kernels/{name}",
                       "-k", selection, f"--junitxml={xml}"]  # fmt: skip
            self.processes[name] = subprocess.Popen(
                command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )

    def rows(self, limit: float) -> Iterator[Row]:
        for name, process in self.processes.items():
            remaining = max(1.0, limit - (time.perf_counter() - self.started))
            try:
                process.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                process.kill()
                yield Row(self.check, name, passed=False, note=f"over its {limit:.0f} s limit")
                continue
            yield self._row(name, process.returncode)

    def _row(self, name: str, returncode: int) -> Row:
        xml = self.tmp / f"{self.check}-{name}.xml"
        if not xml.exists():
            return Row(self.check, name, passed=False, note=f"pytest exited {returncode} without a report")
        suite = ElementTree.parse(xml).getroot().find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        failed = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None or
                  c.find("error") is not None]  # fmt: skip
        ran = counts["tests"] - counts["skipped"]
        note = f"{ran} passed" if not failed else f"{len(failed)} of {ran} failed: {', '.join(failed[:4])}"
        if counts["skipped"]:
            note += f", {counts['skipped']} skipped"
        return Row(self.check, name, seconds=float(suite.get("time", 0)), passed=not failed and returncode in (0, 5),
                   note=note)  # fmt: skip


def collect_rows(check: str, selection: str) -> Iterator[Row]:
    """Dry run: the rows each file would run (collected, not run); a file whose collection fails is a failed row."""
    files = [f"tests/kernels/{name}" for name in TEST_FILES]
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files]
    command += ["-k", selection]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    selected = [line for line in result.stdout.splitlines() if "::" in line]
    for name in TEST_FILES:
        count = sum(line.startswith(f"tests/kernels/{name}::") for line in selected)
        note = f"{count} rows selected (dry run: collected, not run)"
        yield Row(check, name, passed=result.returncode == 0, note=note)


def test_environment(debug: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRITON_")}
    if debug:
        env["TRITON_DEBUG"] = "1"
    return env


# ---- attention: GQA, ragged lengths, padding rows, the split path --------------------------------------------------

ATTENTION_CASES = {  # batch, heads, kv heads, head dim, slots, capacity, lengths (-1: a padding row's slot)
    "gqa4 ragged + padding rows": (6, 32, 8, 64, 8, 2048, [2048, 1, 777, 0, 1500, -1]),
    "mha batch 1, 2048 chunks (split)": (1, 16, 16, 64, 2, 2048, [2048]),
    "gqa8 batch 1, 1500 of 2048 (split)": (1, 64, 8, 128, 2, 2048, [1500]),
}


def attention_check(ctx: Context) -> Iterator[Row]:
    from calm_engine.kernels.decode_attention import decode_attention, decode_attention_ref, split_plan

    generator = torch.Generator().manual_seed(18)
    for name, (batch, heads, kv_heads, dim, slots, capacity, lengths) in ATTENTION_CASES.items():
        splits, _ = split_plan(batch, kv_heads, capacity)
        if ctx.dry_run:
            capacity, lengths = 96, [min(n, 96) for n in lengths]  # the same set-up, small
        for dtype_name, dtype in DTYPES.items():
            q = torch.randn(batch, heads, dim, generator=generator).to(ctx.device, dtype)
            k = torch.randn(slots, kv_heads, capacity, dim, generator=generator).to(ctx.device, dtype)
            v = torch.randn(slots, kv_heads, capacity, dim, generator=generator).to(ctx.device, dtype)
            slot_ids = torch.tensor([-1 if n < 0 else i % slots for i, n in enumerate(lengths)], device=ctx.device)
            length = torch.tensor([max(n, 0) for n in lengths], device=ctx.device)
            expected = decode_attention_ref(q, k, v, slot_ids, length, dim**-0.5)
            if ctx.dry_run:
                yield Row("attention", f"{name}, {splits} splits", dtype_name, note="reference only (dry run)")
                continue
            out = torch.full_like(q, float("nan"))
            decode_attention(q, k, v, slot_ids, length, dim**-0.5, out=out)
            error = rel_error(out, expected)
            padding_zero = all(bool((out[i] == 0).all()) for i, n in enumerate(lengths) if n <= 0)
            seconds = bench(ctx, lambda: decode_attention(q, k, v, slot_ids, length, dim**-0.5, out=out))  # noqa: B023
            read = 2 * sum(max(n, 0) for n in lengths) * kv_heads * dim * q.element_size()
            yield Row("attention", f"{name}, {splits} splits", dtype_name, seconds, read / ctx.bandwidth,
                      f"rel error <= {TOLERANCE[dtype]:.0e}, padding rows 0", error <= TOLERANCE[dtype] and
                      padding_zero, f"rel error {error:.1e}")  # fmt: skip


# ---- the engine: graph replay, eager, plain PyTorch ----------------------------------------------------------------

ENGINE_MODES = {  # label -> (samples per row, n = floor(1/T), exact-sampler pools)
    "T=1": (1, 1, 0),
    "T=0.5 approximate": (200, 2, 0),
    "T=0.5 exact": (200, 2, 8),
}


def _sampling(rows: int, samples: int, inv_floor: int, pools: int, device):
    from calm_engine.engine.sampler import SamplingBatch

    return SamplingBatch(
        seeds=torch.arange(rows, device=device) * 7919 + 11, steps=torch.arange(rows, device=device) % 3,
        valid=torch.ones(rows, samples, dtype=torch.bool, device=device),
        inv_floor=torch.full((rows,), inv_floor, device=device),
        inv_frac=torch.zeros(rows, dtype=torch.float64, device=device), pools=torch.full((rows,), pools, device=device),
        max_pools=pools,
    )  # fmt: skip


def _engine_model(ctx: Context, shape: str, dtype: torch.dtype, slots: int, capacity: int | None = None):
    from benchmarks.shapes import configs
    from calm_engine.engine.kv_cache import SlotKVCache
    from calm_engine.model.calm import CalmModel
    from tests.model_factory import randomize_

    if (shape, dtype) not in ctx.models:
        calm_config, ae_config = configs(shape)
        model = randomize_(CalmModel(calm_config, ae_config), 0).to(ctx.device, dtype).eval().requires_grad_(False)
        ctx.models[shape, dtype] = model
    model = ctx.models[shape, dtype]

    def cache():
        kv = SlotKVCache(model.config, slots, capacity or model.config.max_chunks, model.device, dtype)
        generator = torch.Generator(device=ctx.device).manual_seed(3)
        for tensor in kv.keys + kv.values:
            tensor.normal_(generator=generator)
        return kv

    return model, cache


def _padded(ids, positions, slots, batch):
    """The step's inputs with one padding row appended as GraphStep neutralises it: a zero chunk at position 0 in
    slot PADDING_SLOT, one sample, T = 1, no exact pools."""
    from calm_engine.engine.kv_cache import PADDING_SLOT
    from calm_engine.engine.sampler import SamplingBatch

    def pad(t, value):
        return torch.cat((t, torch.full((1, *t.shape[1:]), value, dtype=t.dtype, device=t.device)))

    valid = torch.zeros(1, batch.valid.shape[1], dtype=torch.bool, device=ids.device)
    valid[0, 0] = True
    sampling = SamplingBatch(
        seeds=pad(batch.seeds, 0), steps=pad(batch.steps, 0), valid=torch.cat((batch.valid, valid)),
        inv_floor=pad(batch.inv_floor, 1), inv_frac=pad(batch.inv_frac, 0.0), pools=pad(batch.pools, 0),
        max_pools=batch.max_pools,
    )  # fmt: skip
    return pad(ids, 0), pad(positions, 0), pad(slots, PADDING_SLOT), sampling


def engine_check(ctx: Context) -> Iterator[Row]:
    """Three rows (slots 0-2) in a bucket of four at ragged positions, every sampling mode."""
    from calm_engine.engine.step.graph_step import CudaGraphCapture, EagerCapture, GraphStep
    from tests.engine.steps import torch_step

    cases = [("calm_m", torch.bfloat16, "bf16")] if not ctx.dry_run else [("small", torch.float32, "fp32")]
    cases += [("small", torch.float32, "fp32")] if not ctx.dry_run else []
    for shape, dtype, dtype_name in cases:
        model, make_cache = _engine_model(ctx, shape, dtype, slots=8, capacity=64 if ctx.dry_run else None)
        config = model.config
        fast = torch_step(model, make_cache(), use_kernels=not ctx.dry_run)
        plain = torch_step(model, make_cache(), use_kernels=False)
        graphs = GraphStep(fast, [1, 2, 4, 8], EagerCapture() if ctx.dry_run else CudaGraphCapture())
        ids = torch.randint(0, config.vocab_size, (3, config.patch_size), device=ctx.device)
        capacity = fast.cache.capacity
        positions = torch.tensor([0, capacity // 3, capacity - 1], device=ctx.device)
        slots = torch.tensor([2, 0, 1], device=ctx.device)
        hidden_fast = fast.decode_hidden(ids, positions, slots, capacity)
        hidden_plain = plain.decode_hidden(ids, positions, slots, capacity)
        error = rel_error(hidden_fast.float(), hidden_plain.float())
        what = "kernels vs PyTorch" if not ctx.dry_run else "PyTorch vs PyTorch (dry run)"
        yield Row("engine", f"{shape} decode hidden, {what}", dtype_name, target=f"rel error <= {TOLERANCE[dtype]:.0e}",
                  passed=error <= TOLERANCE[dtype], note=f"rel error {error:.1e}")  # fmt: skip
        for mode, (samples, inv_floor, pools) in ENGINE_MODES.items():
            batch = _sampling(3, samples, inv_floor, pools, ctx.device)
            replayed = graphs.run(ids, positions, slots, batch).chunks.clone()
            # The eager step on the bucket's four rows, the fourth a padding row as the graph step makes it: the
            # same launches at the same shapes, so the same ids bit for bit. (Three rows alone may round the
            # backbone's cuBLAS products differently: that comparison is reported, not required.)
            padded = _padded(ids, positions, slots, batch)
            eager = fast.sample(fast.decode_hidden(*padded[:3], capacity), padded[3]).chunks[:3]
            unpadded = fast.sample(fast.decode_hidden(ids, positions, slots, capacity), batch).chunks
            reference = plain.sample(plain.decode_hidden(ids, positions, slots, capacity), batch).chunks
            same = float((unpadded == reference).float().mean())
            graph_ok = torch.equal(replayed, eager)
            # bf16 kernels round differently from PyTorch, so a near-tie in the 128k-way argmax may flip a token;
            # in float32 every path must give the same ids.
            need = 1.0 if dtype == torch.float32 else 0.5
            note = (f"graph == eager {graph_ok}, == unpadded eager {float((replayed == unpadded).float().mean()):.0%}, "
                    f"unpadded == PyTorch {same:.0%}")  # fmt: skip
            yield Row(
                "engine",
                f"{shape} B=3 in bucket 4, {mode}",
                dtype_name,
                target=f"graph == eager ids; == PyTorch ids on >= {need:.0%}",
                passed=graph_ok and same >= need,
                note=note,
            )
        del model, fast, plain, graphs
        if ctx.device == "cuda":
            torch.cuda.empty_cache()


# ---- timings: ceilings, kernels at CALM-M shapes, the decode step per bucket ---------------------------------------


def ceilings_check(ctx: Context) -> Iterator[Row]:
    if ctx.dry_run:
        yield Row("ceilings", "copy bandwidth, matmul peaks", note="skipped (dry run)")
        return
    source = torch.empty(2**28, device=ctx.device, dtype=torch.float32)  # 1 GiB: far beyond L2
    target = torch.empty_like(source)
    ctx.bandwidth = 2 * source.numel() * 4 / bench(ctx, lambda: target.copy_(source))
    yield Row("ceilings", "copy bandwidth", note=f"{ctx.bandwidth / 1e12:.2f} TB/s")
    for name, dtype in DTYPES.items():
        a = torch.randn(8192, 8192, device=ctx.device, dtype=dtype)
        b = torch.randn(8192, 8192, device=ctx.device, dtype=dtype)
        ctx.peaks[dtype] = 2 * 8192**3 / bench(ctx, lambda: a @ b)  # noqa: B023
        yield Row("ceilings", "matmul 8192^3", name, note=f"{ctx.peaks[dtype] / 1e12:.0f} TFLOP/s")


def kernels_check(ctx: Context) -> Iterator[Row]:
    size = "cpu" if ctx.dry_run else "calm-m"
    for op, factory in FACTORIES.items():
        for name, dtype in DTYPES.items():
            if ctx.dry_run and name != "fp32":
                continue
            case = factory(ctx.device, dtype, size)
            if ctx.dry_run:
                case.reference()
                yield Row("kernels", f"{op} {case.shape}", name, note="reference only (dry run)")
                continue
            error = case.check()
            kernel_time, reference_time = bench(ctx, case.kernel), bench(ctx, case.reference)
            memory_floor, compute_floor = floors(case, ctx.bandwidth, ctx.peaks[dtype])
            bound = max(memory_floor, compute_floor)
            target, passed = "", error is None
            if dtype == torch.bfloat16 and op in KERNEL_TARGETS:
                target = f">= {KERNEL_TARGETS[op]:.0%} of floor"
                passed = passed and bound / kernel_time >= KERNEL_TARGETS[op]
            kind = "memory" if memory_floor >= compute_floor else "compute"
            note = f"{kind}-bound, {reference_time / kernel_time:.2f}x PyTorch" + (f"; {error}" if error else "")
            yield Row("kernels", f"{op} {case.shape}", name, kernel_time, bound, target, passed, note)
        if ctx.device == "cuda":
            torch.cuda.empty_cache()


def step_weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: everything but the backbone's embedding table (K rows gathered)
    and the autoencoder encoder (unused in decode; its embedding is the decoder's tied output projection)."""
    decode_parts = (model.backbone, model.embed_proj, model.generative_head, model.autoencoder.decoder)
    seen, total = set(), 0
    for part in decode_parts:
        for name, p in part.named_parameters():
            if id(p) in seen or name == "embed_tokens.weight":
                continue
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def steps_check(ctx: Context) -> Iterator[Row]:
    """The CALM-M bf16 decode step through its CUDA graph at every default bucket (T = 1)."""
    from calm_engine.engine.step.graph_step import CudaGraphCapture, EagerCapture, GraphStep, default_buckets
    from tests.engine.steps import torch_step

    shape, dtype = ("small", torch.float32) if ctx.dry_run else ("calm_m", torch.bfloat16)
    model, make_cache = _engine_model(ctx, shape, dtype, slots=64, capacity=64 if ctx.dry_run else None)
    step = torch_step(model, make_cache(), use_kernels=not ctx.dry_run)
    graphs = GraphStep(step, default_buckets(64), EagerCapture() if ctx.dry_run else CudaGraphCapture())
    weights = step_weight_bytes(model)
    config = model.config
    for bucket in graphs.buckets:
        ids = torch.randint(0, config.vocab_size, (bucket, config.patch_size), device=ctx.device)
        positions = torch.randint(0, step.cache.capacity, (bucket,), device=ctx.device)
        slots = torch.arange(bucket, device=ctx.device)
        batch = _sampling(bucket, 1, 1, 0, ctx.device)
        graphs.run(ids, positions, slots, batch)  # captures this bucket's graph
        if ctx.dry_run:
            yield Row("steps", f"{shape} decode step B={bucket}", "fp32", note="eager capture, not timed (dry run)")
            continue
        seconds = bench(ctx, lambda: graphs.run(ids, positions, slots, batch))  # noqa: B023
        tokens = bucket * config.patch_size / seconds
        row = Row("steps", f"CALM-M decode step B={bucket} (graph)", "bf16", seconds, note=f"{tokens:,.0f} tokens/s")
        if bucket == 1:
            row.floor = weights / ctx.bandwidth
            row.target = f"<= {STEP_FLOOR_FACTOR:.0f}x the HBM floor of {weights / 1e6:.0f} MB of weights"
            row.passed = seconds <= STEP_FLOOR_FACTOR * row.floor
            capacity = step.cache.capacity
            eager = bench(ctx, lambda: step.sample(step.decode_hidden(ids, positions, slots, capacity), batch))  # noqa: B023
            row.note += f"; eager {eager * 1e6:.0f} us"
        yield row


# ---- the run ----------------------------------------------------------------------------------------------------

# check -> function, in order: FOREGROUND runs while the background tests compile and run, TIMINGS alone after them.
FOREGROUND = {"engine": engine_check}
TIMINGS = {"ceilings": ceilings_check, "attention": attention_check, "kernels": kernels_check, "steps": steps_check}


def run_check(report: Report, ctx: Context, name: str, check: Callable[[Context], Iterator[Row]]) -> None:
    started = time.perf_counter()
    try:
        with time_limit(BUDGETS[name]):
            for row in check(ctx):
                report.add(row)
    except CheckTimeout as error:
        report.add(Row(name, "(the rest of this check)", passed=False, note=str(error)))
    except Exception as error:  # noqa: BLE001 - one broken check must not hide the others' rows
        report.add(Row(name, "(the rest of this check)", passed=False, note=f"{type(error).__name__}: {error}"[:300]))
    print(f"# {name}: {time.perf_counter() - started:.1f} s of its {BUDGETS[name]} s budget", flush=True)


def print_budgets() -> None:
    background = max(BUDGETS["tests"], BUDGETS["sanitizer"])
    foreground = sum(BUDGETS[name] for name in FOREGROUND)
    timings = sum(BUDGETS[name] for name in TIMINGS)
    wall = max(background, foreground) + timings
    print("# budgets (seconds, H200, cold triton cache):")
    print(f"#   background, concurrently: tests {BUDGETS['tests']}, sanitizer {BUDGETS['sanitizer']}")
    print("#   alongside them: " + ", ".join(f"{n} {BUDGETS[n]}" for n in FOREGROUND))
    print("#   then alone on the GPU: " + ", ".join(f"{n} {BUDGETS[n]}" for n in TIMINGS))
    print(f"#   wall clock at most max({background}, {foreground}) + {timings} = {wall} s (limit {WALL_BUDGET} s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU: set-up only, kernels skipped, budgets printed")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("device_check: needs a CUDA device; on CPU run `python benchmarks/device_check.py --dry-run`")
        return 2
    started = time.perf_counter()
    ctx = Context(device="cpu" if args.dry_run else "cuda", dry_run=args.dry_run)
    device_name = torch.cuda.get_device_name() if not args.dry_run else "cpu (dry run)"
    import triton

    meta = {"device": device_name, "torch": torch.__version__, "triton": triton.__version__,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "budgets": BUDGETS}  # fmt: skip
    print(f"device_check on {device_name}, torch {torch.__version__}, triton {triton.__version__}")
    print_budgets()
    report = Report(os.environ.get("OUT"), meta)
    with tempfile.TemporaryDirectory(prefix="device-check-") as tmp:
        if args.dry_run:
            for row in collect_rows("tests", CUDA_ROWS):
                report.add(row)
            for row in collect_rows("sanitizer", SANITIZER_ROWS):
                report.add(row)
        else:
            tests = PytestRun("tests", CUDA_ROWS, test_environment(debug=False), Path(tmp))
            sanitizer = PytestRun("sanitizer", SANITIZER_ROWS, test_environment(debug=True), Path(tmp))
        for name, check in FOREGROUND.items():
            run_check(report, ctx, name, check)
        if not args.dry_run:
            for run in (tests, sanitizer):
                for row in run.rows(BUDGETS[run.check]):
                    report.add(row)
        for name, check in TIMINGS.items():
            run_check(report, ctx, name, check)
    failed = report.failed
    print(f"{len(report.rows) - len(failed)} rows ok or info, {len(failed)} failed in "
          f"{time.perf_counter() - started:.0f} s")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
