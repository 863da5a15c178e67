"""What the built distribution installs: the one top-level package calm_engine, the Triton kernels inside it.

A top-level `kernels` would collide with the PyPI package of that name (Hugging Face's kernel hub, which transformers
can use): installing both would break one of them. setuptools' build_py and egg_info run here without compiling
anything (the C++ extension is build_ext's), so this is fast.
"""

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _setup(*args: str) -> None:
    subprocess.run([sys.executable, "setup.py", "-q", *args], cwd=REPO_ROOT, check=True, capture_output=True)


def test_the_distribution_has_one_top_level_package(tmp_path):
    _setup("build_py", "--build-lib", str(tmp_path / "lib"))
    built = sorted(p.name for p in (tmp_path / "lib").iterdir())
    assert built == ["calm_engine"], built
    kernels = tmp_path / "lib" / "calm_engine" / "kernels"
    assert (kernels / "__init__.py").is_file() and (kernels / "energy_head.py").is_file()

    _setup("egg_info", "--egg-base", str(tmp_path))
    (egg_info,) = tmp_path.glob("*.egg-info")
    assert (egg_info / "top_level.txt").read_text().split() == ["calm_engine"]
