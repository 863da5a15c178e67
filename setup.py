"""calm-engine: install with `pip install -e .` (install the CPU torch wheel first on CPU machines; see README)."""

from setuptools import find_packages, setup

setup(
    name="calm-engine",
    version="0.1.0",
    description="Inference engine for Continuous Autoregressive Language Models (CALM)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["calm_engine", "calm_engine.*", "kernels", "kernels.*"]),
    install_requires=[
        "torch>=2.4",
        "numpy<2.4",  # the version range triton 3.6.0's interpreter (CPU kernel tests) is used with
        # Fused kernels (kernels/); wheels exist for Linux only, elsewhere the PyTorch references run.
        "triton==3.6.0; platform_system == 'Linux'",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "tiktoken>=0.7",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4"],
        # No wheel on PyPI and it cannot build without CUDA: never a hard requirement.
        "flash": ["flash-attn>=2.5"],
    },
    entry_points={"console_scripts": ["calm=calm_engine.cli:main"]},
)
