"""One setup factory per kernel, shared by `test_bench_kernels.py` (pytest-benchmark) and `device_check.py`.

Each factory builds random inputs and modules at a named size and returns a `Case`: the Triton call, the PyTorch
reference call, a correctness check of the first against the second, and the bytes and FLOPs that set its floors.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # benchmarks/ has no package: make `kernels` and `tests` importable
    sys.path.insert(0, str(REPO_ROOT))

from calm_engine.kernels import ae_decode, ae_encode, decode_attention, energy_head, philox, rms_norm, swiglu  # noqa: E402

from benchmarks.shapes import KERNEL_SIZES  # noqa: E402
from calm_engine.engine.weights import ModelWeights, encoder_weights  # noqa: E402
from tests.conftest import max_rel_error  # noqa: E402
from tests.model_factory import random_calm_model  # noqa: E402

# CALM-M (CALM.md 1.2/1.3) with the official autoencoder; the engine decodes up to 200 samples per row.
CALM_M = dict(
    latent_size=128,
    vocab_size=128256,
    calm=dict(hidden_size=1024, noise_size=64, num_mlp_layers=4, intermediate_size=2752, num_attention_heads=16,
              num_key_value_heads=16, num_hidden_layers=1),
    ae=dict(hidden_size=512, intermediate_size=1280),
)  # fmt: skip

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 4e-2, torch.float16: 1e-2}


@dataclass
class Case:
    op: str
    shape: str
    kernel: Callable[[], object]
    reference: Callable[[], object]
    check: Callable[[], str | None]  # None when the kernel agrees with the reference, else what differs
    bytes: int
    flops: int


_MODELS: dict = {}


def calm_m_model(device, dtype):
    """One random CALM-M-shaped model per (device, dtype) (1 backbone layer: the kernels never use the backbone)."""
    key = (str(device), dtype)
    if key not in _MODELS:
        _MODELS.clear()  # one at a time: a CALM-M model is ~0.6 GB in float32
        _MODELS[key] = random_calm_model(0, **CALM_M).to(device, dtype)
    return _MODELS[key]


def _close(name: str, actual, expected, dtype) -> str | None:
    error = max_rel_error(actual, expected)
    return None if error <= TOLERANCE[dtype] else f"{name}: relative error {error:.2e} > {TOLERANCE[dtype]:.0e}"


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def noise_case(device, dtype, size):
    rows, samples = KERNEL_SIZES[size]["noise_rows"], KERNEL_SIZES[size]["samples"]
    seeds = torch.arange(rows, device=device) * 7919 + 2**33
    steps = torch.full((rows,), 11, device=device)
    expected = philox.uniform_noise_ref(seeds.cpu(), steps.cpu(), samples, 64)

    def check():
        same = torch.equal(philox.uniform_noise(seeds, steps, samples, 64).cpu(), expected)
        return None if same else "noise differs from the reference bits"

    return Case(
        "uniform_noise", f"{rows}x{samples}x64",
        lambda: philox.uniform_noise(seeds, steps, samples, 64),
        lambda: philox.uniform_noise_ref(seeds, steps, samples, 64),
        check, rows * samples * 64 * 4, 0,
    )  # fmt: skip


def energy_head_case(device, dtype, size):
    model = calm_m_model(device, dtype)
    head = ModelWeights.of(model).head  # the kernels read the weights' description
    rows, samples = KERNEL_SIZES[size]["head_rows"], KERNEL_SIZES[size]["samples"]
    hidden = torch.randn(rows, 1024, device=device, dtype=dtype)
    seeds, steps = torch.arange(rows, device=device) + 5, torch.zeros(rows, device=device, dtype=torch.int64)
    noise = philox.uniform_noise_ref(seeds.cpu(), steps.cpu(), samples, 64).to(device)
    per_sample = 64 * 1024 + 4 * 5 * 1024 * 1024 + 1024 * 1024 + 1024 * 128  # MACs: noise embd, blocks, final
    per_row = 1024 * 1024 * 5  # hidden_embd + the condition half of 4 first linears
    element = hidden.element_size()
    traffic = (
        _params(model.generative_head) * element + rows * samples * 1024 * element * 2 * 4 * 4
    )  # weights + activations in/out

    def check():
        return _close("latents", energy_head.energy_head(head, hidden, seeds, steps, samples),
                      energy_head.energy_head_ref(head, hidden, noise), dtype)  # fmt: skip

    return Case(
        "energy_head", f"R={rows} N={samples}",
        lambda: energy_head.energy_head(head, hidden, seeds, steps, samples),
        lambda: energy_head.energy_head_ref(head, hidden, noise),
        check, traffic, 2 * (rows * samples * per_sample + rows * per_row),
    )  # fmt: skip


def decode_argmax_case(device, dtype, size):
    model = calm_m_model(device, dtype)
    module, decoder = model.autoencoder.decoder, ModelWeights.of(model).decoder
    rows = KERNEL_SIZES[size]["decode_rows"]
    latents = torch.randn(rows, 128, device=device, dtype=dtype)
    mlp_macs = rows * (128 * 512 + 3 * 512 * 1280 + 512 * 2048 + 4 * 3 * 512 * 1280)
    flops = 2 * (mlp_macs + rows * 4 * 128256 * 512)

    def check():
        ids, best = ae_decode.decode_argmax(decoder, latents)
        logits = module(latents[:, None]).float()
        chosen = logits.gather(-1, ids[..., None])[..., 0]
        gap = float((logits.amax(-1) - chosen).max() / logits.abs().amax())
        if gap > TOLERANCE[dtype]:
            return f"chosen ids' logits are {gap:.2e} (relative) below the maximum"
        return _close("max logit", best, logits.amax(-1), dtype)

    return Case(
        "decode_argmax", f"M={rows} V=128256",
        lambda: ae_decode.decode_argmax(decoder, latents),
        lambda: ae_decode.decode_argmax_ref(decoder, latents),
        check, _params(module) * latents.element_size(), flops,
    )  # fmt: skip


def ae_encode_case(device, dtype, size):
    autoencoder = calm_m_model(device, dtype).autoencoder
    encoder = encoder_weights(autoencoder)
    rows = KERNEL_SIZES[size]["encode_rows"]
    ids = torch.randint(0, 128256, (rows, 4), device=device)
    macs = rows * (4 * 3 * 512 * 1280 + 2048 * 512 + 3 * 512 * 1280 + 512 * 256)
    element = torch.finfo(dtype).bits // 8
    traffic = (_params(autoencoder.encoder) - 128256 * 512 + rows * 4 * 512) * element

    def check():
        mean, log_std = ae_encode.ae_encode(encoder, ids)
        ref_mean, ref_log_std = ae_encode.ae_encode_ref(encoder, ids)
        return _close("mean", mean, ref_mean, dtype) or _close("log_std", log_std, ref_log_std, dtype)

    return Case(
        "ae_encode", f"M={rows}", lambda: ae_encode.ae_encode(encoder, ids),
        lambda: ae_encode.ae_encode_ref(encoder, ids), check, traffic, 2 * macs,
    )  # fmt: skip


def compress_case(device, dtype, size):
    model = calm_m_model(device, dtype)
    table = model.backbone.embed_tokens.weight
    rows = KERNEL_SIZES[size]["batch"]
    ids = torch.randint(0, 128256, (rows, 4), device=device)
    element = table.element_size()
    traffic = (_params(model.embed_proj) + rows * 4 * 1024) * element

    compression = ModelWeights.of(model).compression

    def check():
        return _close("compressed", ae_encode.compress(compression, table, ids),
                      ae_encode.compress_ref(compression, table, ids), dtype)  # fmt: skip

    return Case(
        "compress", f"M={rows}", lambda: ae_encode.compress(compression, table, ids),
        lambda: ae_encode.compress_ref(compression, table, ids), check, traffic,
        2 * rows * (4096 * 2048 + 2048 * 1024),
    )  # fmt: skip


def decode_attention_case(device, dtype, size):
    batch, context = KERNEL_SIZES[size]["batch"], KERNEL_SIZES[size]["context"]
    heads, dim = 16, 64
    q = torch.randn(batch, heads, dim, device=device, dtype=dtype)
    k = torch.randn(batch, heads, context, dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    slots = torch.arange(batch, device=device)
    lengths = torch.full((batch,), context, device=device)
    scale = dim**-0.5

    def check():
        return _close("attention", decode_attention.decode_attention(q, k, v, slots, lengths, scale),
                      decode_attention.decode_attention_ref(q, k, v, slots, lengths, scale), dtype)  # fmt: skip

    return Case(
        "decode_attention", f"B={batch} ctx={context} H={heads}",
        lambda: decode_attention.decode_attention(q, k, v, slots, lengths, scale),
        lambda: decode_attention.decode_attention_ref(q, k, v, slots, lengths, scale),
        check, 2 * k.numel() * k.element_size(), 4 * batch * heads * context * dim,
    )  # fmt: skip


def rms_norm_case(device, dtype, size):
    x = torch.randn(KERNEL_SIZES[size]["batch"], 1024, device=device, dtype=dtype)
    weight = torch.randn(1024, device=device, dtype=dtype)

    def check():
        return _close("rms_norm", rms_norm.rms_norm(x, weight, 1e-6), rms_norm.rms_norm_ref(x, weight, 1e-6), dtype)

    return Case(
        "rms_norm", f"{x.shape[0]}x1024", lambda: rms_norm.rms_norm(x, weight, 1e-6),
        lambda: rms_norm.rms_norm_ref(x, weight, 1e-6), check, 2 * x.numel() * x.element_size(), 4 * x.numel(),
    )  # fmt: skip


def swiglu_case(device, dtype, size):
    gate = torch.randn(KERNEL_SIZES[size]["batch"], 2752, device=device, dtype=dtype)
    up = torch.randn_like(gate)

    def check():
        return _close("swiglu", swiglu.swiglu(gate, up), swiglu.swiglu_ref(gate, up), dtype)

    return Case(
        "swiglu", f"{gate.shape[0]}x2752", lambda: swiglu.swiglu(gate, up), lambda: swiglu.swiglu_ref(gate, up),
        check, 3 * gate.numel() * gate.element_size(), 5 * gate.numel(),
    )  # fmt: skip


FACTORIES = {
    "uniform_noise": noise_case,
    "energy_head": energy_head_case,
    "decode_argmax": decode_argmax_case,
    "ae_encode": ae_encode_case,
    "compress": compress_case,
    "decode_attention": decode_attention_case,
    "rms_norm": rms_norm_case,
    "swiglu": swiglu_case,
}


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], object], device, repeats: int = 5) -> float:
    """Median wall time of `fn` after one warm-up call, synchronising the device around each call."""
    fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure_ceilings(device, dtype, big: bool = False) -> tuple[float, float]:
    """(bytes/s, FLOP/s) this machine achieves: a large copy, and a large matmul in `dtype` (no TF32 for fp32)."""
    elements = (256 if big else 32) * 2**20
    source = torch.empty(elements, device=device, dtype=torch.float32)
    target = torch.empty_like(source)
    copy_time = median_seconds(lambda: target.copy_(source), device, repeats=9)
    n = 8192 if big else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    matmul_time = median_seconds(lambda: a @ b, device, repeats=9)
    return 2 * source.numel() * 4 / copy_time, 2 * n**3 / matmul_time


def floors(case: Case, bandwidth: float, peak: float) -> tuple[float, float]:
    """(memory floor, compute floor) in seconds."""
    return case.bytes / bandwidth, case.flops / peak
