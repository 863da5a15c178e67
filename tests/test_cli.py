"""The `calm` command line."""

from __future__ import annotations

import re
import subprocess
import sys

from calm_engine.cli import main
from calm_engine.model.token_llama import save_token_llama
from tests.conftest import shared_path
from tests.model_factory import random_token_llama


def test_inspect_calm_checkpoint(capsys):
    assert main(["inspect", str(shared_path("conformance", "calm"))]) == 0
    out = capsys.readouterr().out
    assert "patch_size" in out and "rope_theta" in out and "autoencoder config:" in out
    table = out.split("parameters:")[1].split("dtype:")[0]
    counts = {m[1]: int(m[2].replace(",", "")) for m in re.finditer(r"^  (\S.*?)\s+([\d,]+)$", table, re.M)}
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total") > 0
    assert counts["backbone.layers"] > 0 and counts["generative_head"] > 0
    assert "dtype: float32 (stored: float32)" in out
    assert "tokenizer: none" in out


def test_inspect_autoencoder_in_bf16(capsys):
    assert main(["inspect", str(shared_path("conformance", "autoencoder_safetensors")), "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("autoencoder checkpoint") and "dtype: bfloat16 (stored: float32)" in out


def test_inspect_token_llama_checkpoint(tmp_path, capsys):
    save_token_llama(random_token_llama(seed=1, tie_word_embeddings=True), tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("token-level Llama checkpoint") and "autoencoder" not in out
    table = out.split("parameters:")[1].split("dtype:")[0]
    counts = {m[1]: int(m[2].replace(",", "")) for m in re.finditer(r"^  (\S.*?)\s+([\d,]+)$", table, re.M)}
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total") > 0
    assert counts["lm_head (tied to the embedding)"] == 0


def test_inspect_errors_exit_2(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "directory not found" in capsys.readouterr().err


def test_console_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "calm_engine.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "inspect" in result.stdout
