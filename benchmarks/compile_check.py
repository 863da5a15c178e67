"""Every Triton launch the launchers make, compiled for sm_80 and sm_90 without a GPU: registers, spills, shared memory.

    python benchmarks/compile_check.py                 # both targets, one worker process each; exit 1 on a failure
    python benchmarks/compile_check.py --markdown      # the table as benchmarks/RESULTS.md keeps it
    python benchmarks/compile_check.py --json FILE     # also every launch's figures

How it works without a GPU: `triton.runtime.driver` uses the one backend driver that reports itself active (the CUDA
driver only when torch sees a device: here none, so any launch would raise); `driver.set_active` puts a stub in its
place, `JITFunction` asks the active driver for the target and `make_backend` picks the NVIDIA backend from it. The
stub reports `GPUTarget("cuda", 90, 32)` (or 80), and triton's JIT cache hook sees each launch after `JITFunction.run`
has bound and specialised the launcher's arguments (so a launcher passing what its kernel does not take fails here, as
it would on a GPU) and before anything compiles or runs; the hook records the launch and skips it. The launchers run
for real on host tensors (kernels/utils.check_launch accepts them under a recording driver) at three sets of shapes:
- the engine's decode step, the PyTorch step with the Triton ops (TritonOps) through the graph step, at every
  default graph bucket (a padding row in each bucket above 1) at T = 1 and at T = 0.5 with both samplers, on a
  CALM-M model with one backbone layer (every layer makes the same launches) in bf16 and fp16;
- CALM-M shapes (benchmarks/shapes.py KERNEL_SIZES) in fp32, bf16 and fp16;
- the kernel tests' shapes (tests/kernels/cases.py) in fp32 (the rows CI runs under the interpreter) and bf16 (the
  CUDA-only rows; fp16 differs from bf16 only in the MMA type and is compiled in the two sets above). A test launch
  that differs from one already recorded only in tile sizes or argument divisibility is counted as covered by it
  (the `covered` column), so every kernel, dtype and feature flag is compiled without compiling each odd size.
Each distinct launch (triton's own key: argument types, integer and pointer divisibility, constexprs, options) is then
compiled once per target through `JITFunction.preload`, triton's own path from a recorded specialisation to a compiled
kernel, to PTX and to cubin with triton's bundled ptxas: registers and spills from `ptxas -v`, shared memory from the
kernel's metadata. The worker runs with a fresh triton cache, so compile times are cold ones.

Rules (a failure makes the exit status 1): every kernel in kernels/ is launched by some plan and compiles; shared
memory stays within the target's per-block limit; no launch of a bf16/fp16 decode step spills registers; the bf16/fp16
decode attention pipelines its K/V loads (cp.async in the PTX).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Compute capability -> shared memory one block may use (the opt-in maximum): A100 163 KB, H100/H200 227 KB.
SHARED_LIMITS = {80: 163 * 1024, 90: 227 * 1024}
HALF_DTYPES = ("bf16", "fp16")
# The tests' shapes in fp32 (the rows CI runs under the interpreter) and bf16 (the CUDA-only rows); fp16 differs
# from bf16 only in the MMA type and is compiled at CALM-M shapes and in the engine's step.
TEST_DTYPES = ("fp32", "bf16")
ENGINE_BATCH = 64  # the engine's default max_batch_size: graph buckets 1, 2, 4, 8, 16, ..., 64
ENGINE_SAMPLES = 200  # the head samples of a T < 1 step (SamplingParams.num_samples' default)
ENGINE_EXACT_POOLS = 8  # SamplingParams.exact_max_pools' default
WORKER_TIMEOUT = 900  # seconds; a worker compiles each launch once, about a minute on two cores


@dataclasses.dataclass
class Launch:
    """One distinct launch specialisation and, once compiled, what the compiler says about it."""

    kernel: str  # module.function
    key: str  # triton's JIT cache key (specialisation + options)
    variant: str  # constexprs, warps, stages: what the table groups by
    dtype: str  # the element type of the kernel's first float pointer
    plans: list[str]  # where it was launched (first few)
    decode_half: bool = False  # launched by a bf16/fp16 engine decode step
    covered: int = 0  # test-shape launches differing from this one only in tiles or divisibility (not compiled)
    regs: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    shared: int | None = None
    cp_async: bool | None = None
    seconds: float | None = None
    error: str | None = None


# ---- the worker: record every launch at one target, then compile each distinct one --------------------------------


class Recorder:
    """Installs the stub driver and the JIT cache hook; `plan(...)` labels the launches made inside it."""

    def __init__(self, arch: int):
        import torch
        from triton.backends.compiler import GPUTarget
        from triton.backends.driver import DriverBase

        class RecordingDriver(DriverBase):
            """A triton driver for a GPU that is not there: it names the target and records launches."""

            records_launches = True  # kernels/utils.check_launch then accepts host tensors

            @classmethod
            def is_active(cls):
                return False  # never picked by triton's own driver discovery

            def get_current_target(self):
                return GPUTarget("cuda", arch, 32)

            def get_active_torch_device(self):
                return torch.device("cpu")

            def get_current_device(self):
                return 0

            def get_current_stream(self, device=None):
                return 0

            def map_python_to_cpp_type(self, ty):
                raise NotImplementedError("the recording driver builds no launcher")

            def get_benchmarker(self):
                raise NotImplementedError("the recording driver runs nothing")

        self.arch = arch
        self.driver = RecordingDriver()
        self.launches: dict[tuple[str, str], Launch] = {}
        self.functions: dict[tuple[str, str], object] = {}  # the JITFunction and its specialisation data
        self.families: dict[tuple[str, str, str], Launch] = {}  # (kernel, dtype, _family(variant)) -> first launch
        self.covered: set[tuple[str, str]] = set()  # launches stood for by their group's first launch
        self.plans: dict[str, int] = {}  # plan label -> launches recorded
        self.failures: list[str] = []
        self._label, self._dtype, self._decode, self._represent = "", "", False, False
        self._compiling = False

    def install(self) -> None:
        """Make the stub triton's active driver and hook every launch; for a process of its own (there is no GPU
        driver to go back to)."""
        import triton
        from triton import knobs

        triton.runtime.driver.set_active(self.driver)
        knobs.runtime.jit_cache_hook = self._hook

    def plan(
        self, label: str, dtype: str, decode: bool, launch: Callable[[], object], represented: bool = False
    ) -> None:
        """Run `launch` (launcher calls) with its launches labelled; an exception is a failure of that plan.

        represented: a launch of the same kernel, dtype, options and feature constexprs as one already recorded,
        differing only in tile sizes or the divisibility of its arguments, is counted as covered by that one instead
        of compiled again (the tests' odd sizes give odd tiles; every flag combination and dtype is still compiled).
        """
        self._label, self._dtype, self._decode, self._represent = label, dtype, decode, represented
        self.plans.setdefault(label, 0)
        try:
            launch()
        except Exception as error:  # noqa: BLE001 - a launcher that fails here would fail on a GPU
            self.failures.append(f"{label}: the launcher raised {type(error).__name__}: {error}")

    def _hook(self, *, key, repr, fn, compile, is_manual_warmup, already_compiled):  # noqa: A002 - triton's names
        if self._compiling:
            return False  # compile_all: let triton compile
        function = fn.jit_function
        name = f"{function.fn.__module__}.{function.fn.__name__}"
        self.plans[self._label] += 1
        launch = self.launches.get((name, key))
        if launch is None:
            variant, dtype = _variant(function, compile), _dtype(compile["signature"])
            family = (name, dtype, _family(variant))
            launch = self.families.get(family) if self._represent else None
            if launch is not None:
                launch.covered += (name, key) not in self.covered
                self.covered.add((name, key))
                return True
            launch = Launch(name, key, variant, dtype, [])
            self.launches[(name, key)] = launch
            self.families.setdefault(family, launch)
            self.functions[(name, key)] = (function, compile["specialization_data"])
        if len(launch.plans) < 3 and self._label not in launch.plans:
            launch.plans.append(self._label)
        launch.decode_half |= self._decode and self._dtype in HALF_DTYPES
        return True  # recorded: nothing compiles, nothing runs

    def compile_all(self) -> None:
        """Compile each distinct launch once, through triton's own preload path, with ptxas -v's report captured."""
        from triton import knobs

        knobs.nvidia.dump_ptxas_log = True
        self._compiling = True
        try:
            for (name, key), launch in self.launches.items():
                function, specialization = self.functions[(name, key)]
                report = io.StringIO()
                started = time.perf_counter()
                try:
                    with contextlib.redirect_stdout(report):
                        kernel = function.preload(specialization)
                except Exception as error:  # noqa: BLE001 - a compile error is this launch's result
                    launch.error = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"
                    continue
                finally:
                    launch.seconds = time.perf_counter() - started
                _read_ptxas_report(report.getvalue(), launch)
                launch.shared = int(kernel.metadata.shared)
                launch.cp_async = "cp.async" in kernel.asm["ptx"]
        finally:
            self._compiling = False
            knobs.nvidia.dump_ptxas_log = False


def _variant(function, compile: dict) -> str:
    constants = compile["constants"]
    names = function.arg_names
    parts = [f"{names[path[0]]}={value}" for path, value in sorted(constants.items()) if len(path) == 1]
    return " ".join(parts + [f"w{compile['num_warps']}", f"s{compile['num_stages']}"])


def _family(variant: str) -> str:
    """A variant without its tile sizes (BLOCK*=n)."""
    return " ".join(part for part in variant.split() if not part.startswith("BLOCK"))


def _dtype(signature: dict) -> str:
    floats = [t[1:] for t in signature.values() if isinstance(t, str) and t.startswith("*") and t[1:3] in ("fp", "bf")]
    return floats[0] if floats else "-"


def _read_ptxas_report(text: str, launch: Launch) -> None:
    """ptxas -v: 'N bytes spill stores, M bytes spill loads' and 'Used R registers' for the one entry function."""
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if regs is None or spills is None:
        launch.error = f"no ptxas -v report in the compile output: {text[-300:]!r}"
        return
    launch.regs = int(regs.group(1))
    launch.spill_stores, launch.spill_loads = int(spills.group(1)), int(spills.group(2))


# ---- what is launched: the plans --------------------------------------------------------------------------------


def _torch_dtypes():
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _empty_calm_m(dtype, layers: int = 1):
    """A CALM-M-shaped model with uninitialised weights (shapes and dtypes are all a launch records)."""
    import torch

    from benchmarks.shapes import configs
    from calm_engine.model.calm import CalmModel

    calm_config, ae_config = configs("calm_m")
    calm_config = dataclasses.replace(calm_config, num_hidden_layers=layers)
    with torch.device("meta"):
        model = CalmModel(calm_config, ae_config)
    return model.to(dtype).to_empty(device="cpu").eval().requires_grad_(False)


def plan_test_shapes(recorder: Recorder) -> None:
    """The launches of tests/kernels at their shapes, in each dtype (on a GPU the bf16/fp16 rows run too)."""
    import torch
    from calm_engine.kernels import (
        ae_decode,
        ae_encode,
        decode_attention,
        energy_head,
        fused_linear,
        philox,
        rms_norm,
        swiglu,
    )

    from calm_engine.engine.weights import ModelWeights, encoder_weights
    from tests.kernels import cases
    from tests.model_factory import random_calm_model

    def noise():
        seeds = torch.tensor(cases.PHILOX_SEEDS)
        for samples, dim in cases.NOISE_SIZES:
            philox.uniform_noise(seeds, torch.zeros_like(seeds), samples, dim)

    recorder.plan("tests", "fp32", False, noise, represented=True)
    for name, dtype in _torch_dtypes().items():
        if name not in TEST_DTYPES:
            continue

        def norms(dtype=dtype):
            for shape in cases.RMS_NORM_SHAPES:
                rms_norm.rms_norm(torch.randn(shape, dtype=dtype), torch.randn(shape[-1], dtype=dtype), 1e-5)
            for shape in cases.SWIGLU_SHAPES:
                swiglu.swiglu(torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype))

        def linears(dtype=dtype):
            for flags in cases.LINEAR_CASES.values():
                for m, n, k, blocks in cases.LINEAR_SIZES:
                    args, kwargs = cases.linear_inputs(m, n, k, dtype, "cpu", **flags)
                    fused_linear.fused_linear(*args, blocks=blocks, **kwargs)
            for blocks in ((16, 16, 16), None):  # the gather of the input compression
                table, ids = torch.randn(50, 24, dtype=dtype), torch.randint(0, 50, (13, 3))
                fused_linear.fused_linear(table, torch.randn(21, 72, dtype=dtype), gather_ids=ids, blocks=blocks)

        def attention(dtype=dtype):
            for shape in cases.ATTENTION_SHAPES.values():
                for splits in cases.ATTENTION_SPLITS:
                    q, k, v, slots, lengths = cases.attention_inputs(shape, dtype, "cpu")
                    decode_attention.decode_attention(q, k, v, slots, lengths, 0.37, num_splits=splits)

        def heads(dtype=dtype):
            for shape in cases.HEAD_SHAPES.values():
                head = ModelWeights.of(random_calm_model(3, **shape).to(dtype)).head
                for rows, samples in cases.HEAD_ROWS_SAMPLES:
                    hidden = torch.randn(rows, head.hidden_embed.in_features, dtype=dtype)
                    seeds = torch.arange(rows)
                    energy_head.energy_head(head, hidden, seeds, seeds, samples)

        def autoencoders(dtype=dtype):
            for shared in cases.AE_MODELS.values():
                model = random_calm_model(4, **shared).to(dtype)
                config, weights = model.autoencoder.config, ModelWeights.of(model)
                encoder = encoder_weights(model.autoencoder)
                for rows in cases.AE_ROWS:
                    ids = torch.randint(0, config.vocab_size, (rows, config.patch_size))
                    ae_encode.ae_encode(encoder, ids)
                    ae_encode.compress(weights.compression, weights.backbone.embed, ids)
                    latents = torch.randn(rows, config.latent_size, dtype=dtype)
                    ae_decode.decode_argmax(weights.decoder, latents)
            for rows, vocab, dim in cases.ARGMAX_SIZES:
                for splits in cases.ARGMAX_SPLITS:
                    h, table = torch.randn(rows, dim, dtype=dtype), torch.randn(vocab, dim, dtype=dtype)
                    ae_decode.project_argmax(h, table, splits=splits, block_m=16)

        for part in (norms, linears, attention, heads, autoencoders):
            recorder.plan(f"tests {name}", name, False, part, represented=True)


def plan_calm_m(recorder: Recorder) -> None:
    """Each kernel at CALM-M shapes (benchmarks/kernel_cases.py's "calm-m" sizes), in each dtype."""
    import torch
    from calm_engine.kernels import ae_decode, ae_encode, decode_attention, energy_head, philox, rms_norm, swiglu

    from benchmarks.shapes import KERNEL_SIZES
    from calm_engine.engine.weights import ModelWeights, encoder_weights

    size = KERNEL_SIZES["calm-m"]
    for name, dtype in _torch_dtypes().items():
        model = _empty_calm_m(dtype)
        config, weights, encoder = model.config, ModelWeights.of(model), encoder_weights(model.autoencoder)

        def launch(model=model, config=config, weights=weights, encoder=encoder, dtype=dtype):
            rows, samples = size["head_rows"], size["samples"]
            seeds = torch.arange(rows)
            hidden = torch.empty(rows, config.hidden_size, dtype=dtype)
            energy_head.energy_head(weights.head, hidden, seeds, seeds, samples)
            latents = torch.empty(size["decode_rows"], config.latent_size, dtype=dtype)
            ae_decode.decode_argmax(weights.decoder, latents)
            ids = torch.zeros(size["encode_rows"], config.patch_size, dtype=torch.long)
            ae_encode.ae_encode(encoder, ids)
            ids = torch.zeros(size["batch"], config.patch_size, dtype=torch.long)
            ae_encode.compress(weights.compression, weights.backbone.embed, ids)
            batch, heads, dim = size["batch"], config.num_attention_heads, config.head_dim
            q = torch.empty(batch, heads, dim, dtype=dtype)
            cache = torch.empty(batch, config.num_key_value_heads, size["context"], dim, dtype=dtype)
            lengths = torch.full((batch,), size["context"])
            decode_attention.decode_attention(q, cache, cache, torch.arange(batch), lengths, dim**-0.5)
            rms_norm.rms_norm(torch.empty(batch, config.hidden_size, dtype=dtype), model.backbone.norm.weight, 1e-6)
            gate = torch.empty(batch, config.intermediate_size, dtype=dtype)
            swiglu.swiglu(gate, gate)
            noise_seeds = torch.arange(size["noise_rows"])
            philox.uniform_noise(noise_seeds, noise_seeds, samples, config.noise_size)

        recorder.plan(f"CALM-M {name}", name, False, launch)


ENGINE_MODES = {  # label -> (samples per row, n = floor(1/T), exact-sampler pools)
    "T=1": (1, 1, 0),
    "T=0.5 approximate": (ENGINE_SAMPLES, 2, 0),
    "T=0.5 exact": (ENGINE_SAMPLES, 2, ENGINE_EXACT_POOLS),
}


def plan_engine(recorder: Recorder) -> None:
    """The engine's decode step through the CUDA-graph runner (eager capture), at every bucket, T = 1 and T = 0.5."""
    import torch

    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        _plan_engine_dtype(recorder, name, dtype)


def _plan_engine_dtype(recorder: Recorder, name: str, dtype) -> None:
    import torch
    from calm_engine.kernels.philox import uniform_noise

    from calm_engine.engine.kv_cache import SlotKVCache
    from calm_engine.engine.noise import CHOICE_UNIFORMS, counter
    from calm_engine.engine.sampler import SamplingBatch
    from calm_engine.engine.step.graph_step import EagerCapture, GraphStep, default_buckets
    from tests.engine.steps import torch_step

    model = _empty_calm_m(dtype)
    config = model.config
    cache = SlotKVCache(config, ENGINE_BATCH, config.max_chunks, model.device, dtype)
    graphs = GraphStep(torch_step(model, cache, use_kernels=True), default_buckets(ENGINE_BATCH), EagerCapture())

    def step(rows: int, samples: int, inv_floor: int, pools: int) -> None:
        batch = SamplingBatch(
            seeds=torch.arange(rows) + 1, steps=torch.zeros(rows, dtype=torch.long),
            valid=torch.ones(rows, samples, dtype=torch.bool), inv_floor=torch.full((rows,), inv_floor),
            inv_frac=torch.zeros(rows, dtype=torch.float64), pools=torch.full((rows,), pools), max_pools=pools,
        )  # fmt: skip
        positions = torch.linspace(0, config.max_chunks - 1, rows).long()
        ids = torch.zeros(rows, config.patch_size, dtype=torch.long)
        graphs.run(ids, positions, torch.arange(rows), batch)
        if samples > 1:
            # On CUDA the choice uniforms come from the noise kernel (noise.philox_noise); on host tensors that
            # function takes its CPU branch, so the same call is made here directly.
            uniform_noise(batch.seeds, counter(batch.steps, stream=CHOICE_UNIFORMS), samples, 1)

    for bucket in graphs.buckets:
        rows = max(1, bucket - 1)  # a padding row in every bucket above 1
        for mode, (samples, inv_floor, pools) in ENGINE_MODES.items():
            launch = functools.partial(step, rows, samples, inv_floor, pools)
            recorder.plan(f"engine {name} B={bucket} {mode}", name, True, launch)


PLANS = (plan_engine, plan_calm_m, plan_test_shapes)  # the tests' launches last: they may be represented


def kernels_defined() -> set[str]:
    """Every launchable kernel in kernels/ (`_<op>_kernel`), module.function."""
    import importlib
    import pkgutil

    import calm_engine.kernels as kernels
    from triton.runtime.jit import JITFunction

    found = set()
    for module_info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"calm_engine.kernels.{module_info.name}")
        for name, value in vars(module).items():
            if isinstance(value, JITFunction) and name.endswith("_kernel") and value.fn.__module__ == module.__name__:
                found.add(f"{module.__name__}.{name}")
    return found


def run_worker(arch: int, out: Path, only: str | None) -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("compile_check: the worker must run without TRITON_INTERPRET (it compiles, not interprets)")
    import torch

    torch.set_num_threads(1)  # one worker per target shares the machine's cores with the other
    recorder = Recorder(arch)
    started = time.perf_counter()
    recorder.install()
    for plan in PLANS:
        plan(recorder)
    recorded = time.perf_counter() - started
    launched = {launch.kernel for launch in recorder.launches.values()}
    if only is None:
        for kernel in sorted(kernels_defined() - launched):
            recorder.failures.append(f"{kernel} is never launched by any plan")
    else:
        recorder.launches = {k: v for k, v in recorder.launches.items() if only in k[0]}
    recorder.compile_all()
    result = {
        "arch": arch,
        "record_seconds": recorded,
        "total_seconds": time.perf_counter() - started,
        "plans": recorder.plans,
        "failures": recorder.failures,
        "launches": [dataclasses.asdict(launch) for launch in recorder.launches.values()],
    }
    out.write_text(json.dumps(result, indent=1))


# ---- the parent: one worker per target, then the rules and the table -----------------------------------------------


def run_workers(archs: list[int], only: str | None = None) -> dict[int, dict]:
    """One worker process per target, concurrently, each with a clean triton environment and a fresh cache."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TRITON_")}
    with tempfile.TemporaryDirectory(prefix="calm-compile-") as tmp:
        processes = {}
        for arch in archs:
            env = {**environment, "TRITON_CACHE_DIR": str(Path(tmp) / f"cache-sm{arch}")}
            command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(arch), "--json"]
            command.append(str(Path(tmp) / f"sm{arch}.json"))
            if only is not None:
                command += ["--kernel", only]
            processes[arch] = subprocess.Popen(
                command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        results = {}
        for arch, process in processes.items():
            output, _ = process.communicate(timeout=WORKER_TIMEOUT)
            if process.returncode != 0:
                raise RuntimeError(f"compile_check worker for sm_{arch} failed ({process.returncode}):\n{output}")
            results[arch] = json.loads((Path(tmp) / f"sm{arch}.json").read_text())
    return results


def failures(results: dict[int, dict]) -> list[str]:
    found = []
    for arch, result in results.items():
        found += [f"sm_{arch}: {failure}" for failure in result["failures"]]
        for launch in map(lambda d: Launch(**d), result["launches"]):
            where = f"sm_{arch} {launch.kernel.rsplit('.', 1)[1]} [{launch.variant}] ({', '.join(launch.plans)})"
            if launch.error is not None:
                found.append(f"{where}: compile error: {launch.error}")
                continue
            if launch.shared > SHARED_LIMITS[arch]:
                found.append(f"{where}: {launch.shared} B of shared memory, over the {SHARED_LIMITS[arch]} B limit")
            if launch.decode_half and launch.spill_stores + launch.spill_loads > 0:
                found.append(f"{where}: spills {launch.spill_stores} B / {launch.spill_loads} B in the decode step")
            if launch.decode_half and launch.kernel.endswith("._decode_attention_kernel") and not launch.cp_async:
                found.append(f"{where}: K/V loads are not pipelined (no cp.async in the PTX)")
    return found


@dataclasses.dataclass
class Row:
    kernel: str
    variant: str
    dtype: str
    keys: int = 0  # distinct launches compiled
    covered: int = 0  # test-shape launches they stand for
    regs: dict = dataclasses.field(default_factory=dict)  # arch -> max registers over the row's launches
    spills: dict = dataclasses.field(default_factory=dict)  # arch -> max spill stores (bytes)
    shared: dict = dataclasses.field(default_factory=dict)  # arch -> max shared memory (bytes)
    seconds: dict = dataclasses.field(default_factory=dict)  # arch -> max compile seconds
    decode: bool = False


def table_rows(results: dict[int, dict]) -> list[Row]:
    """One row per (kernel, dtype, constexprs, warps, stages); launches differing only in argument divisibility or
    alignment share a row, which shows the worst of them."""
    rows: dict[tuple[str, str, str], Row] = {}
    for arch, result in results.items():
        for launch in map(lambda d: Launch(**d), result["launches"]):
            kernel = launch.kernel.rsplit(".", 1)[1]
            row = rows.setdefault((kernel, launch.dtype, launch.variant), Row(kernel, launch.variant, launch.dtype))
            if arch == min(results):
                row.keys += 1
                row.covered += launch.covered
            row.decode |= launch.decode_half
            for field, value in (("regs", launch.regs), ("spills", launch.spill_stores), ("shared", launch.shared),
                                 ("seconds", launch.seconds)):  # fmt: skip
                column = getattr(row, field)
                if value is not None:
                    column[arch] = max(column.get(arch, value), value)
    return sorted(rows.values(), key=lambda r: (r.kernel, r.dtype, r.variant))


def _pair(values: dict, archs: list[int], fmt: Callable[[float], str]) -> str:
    return "/".join(fmt(values[a]) if a in values else "ERR" for a in archs)


def format_table(results: dict[int, dict], markdown: bool) -> str:
    archs = sorted(results)
    arch_names = "/".join(f"sm_{a}" for a in archs)
    header = ["kernel", "dtype", "variant (constexprs, warps, stages)", "launches", f"registers {arch_names}",
              f"spills B {arch_names}", f"shared KB {arch_names}", f"compile s {arch_names}"]  # fmt: skip
    lines = []
    for row in table_rows(results):
        name = row.kernel + (" *" if row.decode else "")
        lines.append([
            name, row.dtype, row.variant, f"{row.keys}" + (f" (+{row.covered})" if row.covered else ""),
            _pair(row.regs, archs, lambda v: f"{v:d}"),
            _pair(row.spills, archs, lambda v: f"{v:d}"), _pair(row.shared, archs, lambda v: f"{v / 1024:.1f}"),
            _pair(row.seconds, archs, lambda v: f"{v:.2f}"),
        ])  # fmt: skip
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(line) + " |" for line in lines]
    else:
        widths = [max(len(x) for x in column) for column in zip(header, *lines, strict=True)]
        out = ["  ".join(x.ljust(w) for x, w in zip(header, widths, strict=True))]
        out += ["  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)) for line in lines]
    return "\n".join(out)


def summary(results: dict[int, dict]) -> str:
    parts = []
    for arch, result in sorted(results.items()):
        launches = result["launches"]
        recorded = sum(result["plans"].values())
        slowest = max(launches, key=lambda d: d["seconds"] or 0.0)
        parts.append(
            f"sm_{arch}: {recorded} launches recorded in {len(result['plans'])} plans -> {len(launches)} distinct, "
            f"recorded in {result['record_seconds']:.1f} s, all compiled in {result['total_seconds']:.1f} s "
            f"(slowest {slowest['kernel'].rsplit('.', 1)[1]} {slowest['seconds']:.1f} s)"
        )
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", choices=sorted(SHARED_LIMITS), default=sorted(SHARED_LIMITS))
    parser.add_argument("--json", type=Path, help="write every launch's figures (per target) here")
    parser.add_argument("--markdown", action="store_true", help="print the table in Markdown")
    parser.add_argument("--kernel", help="compile only the kernels whose name contains this (while tuning one)")
    parser.add_argument("--worker", type=int, choices=sorted(SHARED_LIMITS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        run_worker(args.worker, args.json, args.kernel)
        return 0
    results = run_workers(args.arch, args.kernel)
    print(format_table(results, args.markdown))
    print("(* launched by a bf16/fp16 decode step: must not spill. launches: distinct launch keys compiled; (+n):")
    print(" test-shape launches differing from them only in tiles or divisibility. compile s: the row's slowest.)")
    print(summary(results))
    if args.json is not None:
        args.json.write_text(json.dumps({str(arch): result for arch, result in results.items()}, indent=1))
    found = failures(results)
    for failure in found:
        print("FAIL", failure)
    print(f"compile_check: {'FAILED, ' + str(len(found)) + ' problems' if found else 'ok'}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
