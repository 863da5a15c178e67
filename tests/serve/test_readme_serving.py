"""The README's serving section, run as written: its `calm serve` command starts the server (on a free port instead
of 8000), then its curl command and its openai-client example run against it."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from tests.serve.conftest import ServerProcess

README_PORT = "8000"


def serving_blocks() -> dict[str, list[str]]:
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("## Serving (`calm serve`)", 1)[1].split("\n## ", 1)[0]
    blocks: dict[str, list[str]] = {}
    for language, body in re.findall(r"```(\w+)\n(.*?)```", section, re.S):
        blocks.setdefault(language, []).append(body)
    return blocks


@pytest.fixture(scope="module")
def readme_server():
    command = next(
        line.split("#")[0] for b in serving_blocks()["bash"] for line in b.splitlines() if line.startswith("calm serve")
    )
    args = shlex.split(command)[2:]
    args = ["0" if previous == "--port" else a for previous, a in zip(["", *args[:-1]], args, strict=True)]
    assert README_PORT not in args
    process = ServerProcess(*args)
    yield process
    assert process.stop() == 0


def local(text: str, server: ServerProcess) -> str:
    assert f"127.0.0.1:{README_PORT}" in text
    return text.replace(f"http://127.0.0.1:{README_PORT}", server.url)


def test_readme_curl_example(readme_server):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    block = next(b for b in serving_blocks()["bash"] if b.startswith("curl"))
    result = subprocess.run(["bash", "-c", local(block, readme_server)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    response = json.loads(result.stdout)
    assert response["object"] == "text_completion" and response["choices"][0]["text"]
    assert response["usage"]["completion_tokens"] > 0


def test_readme_openai_example(readme_server):
    (block,) = serving_blocks()["python"]
    result = subprocess.run(
        [sys.executable, "-c", local(block, readme_server)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip()) > 10
