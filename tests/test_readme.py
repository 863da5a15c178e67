"""Every ```python block of the README runs as written on the shipped default model, each in a fresh namespace.

The Serving section's blocks talk to a live server: tests/serve/test_readme_serving.py starts one and runs them."""

from __future__ import annotations

import re

import pytest

from tests.conftest import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()
SERVING = README.split("## Serving (`calm serve`)", 1)[1].split("\n## ", 1)[0]
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.replace(SERVING, ""), re.S | re.M)


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs_as_written(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing a snippet might write lands in the repository
    namespace = {"__name__": f"readme_block_{index}"}
    exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), namespace)
    # What the blocks' comments promise.
    if "encode_text" in BLOCKS[index]:
        assert namespace["text"] == "some text"
        assert namespace["latents"].shape == (1, namespace["model"].config.latent_size)
    if "llm.generate" in BLOCKS[index]:
        outputs = namespace["outputs"]
        assert outputs[1].prompt_token_ids == [1, 326, 6168, 296] and all(o.finished for o in outputs)
    if "engine.abort" in BLOCKS[index]:
        assert not namespace["engine"].has_unfinished_requests()
