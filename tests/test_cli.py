"""The `calm` command line."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import calm_engine
from calm_engine import SamplingParams
from calm_engine.cli import build_parser, main
from calm_engine.model.checkpoint import DEFAULT_CALM, default_model_path, save_autoencoder
from calm_engine.model.token_llama import save_token_llama
from tests.conftest import REPO_ROOT, shared_path
from tests.model_factory import random_calm_model, random_token_llama


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


def test_version_is_single_sourced(capsys):
    import ast
    import importlib.metadata

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"calm-engine {calm_engine.__version__}\n"
    assert importlib.metadata.version("calm-engine") == calm_engine.__version__
    # setup.py writes no version of its own: it reads calm_engine/__init__.py.
    setup_source = (REPO_ROOT / "setup.py").read_text()
    assert "version=package_version()" in setup_source and calm_engine.__version__ not in setup_source
    function = next(n for n in ast.parse(setup_source).body if getattr(n, "name", None) == "package_version")
    namespace = {"Path": Path, "re": re, "__file__": str(REPO_ROOT / "setup.py")}
    exec(compile(ast.Module([function], []), "setup.py", "exec"), namespace)
    assert namespace["package_version"]() == calm_engine.__version__


def test_generate_help_shows_the_defaults_and_why_the_temperatures_differ(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--max-tokens MAX_TOKENS tokens generated per prompt (default 64)" in help_text
    assert "--device DEVICE cpu or cuda (default: cuda when available, else cpu)" in help_text
    assert SamplingParams().temperature == 1.0 and build_parser().parse_args(["generate"]).temperature == 0.5
    assert "(default 0.5, sharper text to read" in help_text and "SamplingParams defaults to 1" in help_text


class FakeTerminal(io.StringIO):
    """A text stream that says it is a terminal (what tqdm and the stdin hint look at)."""

    def isatty(self) -> bool:
        return True


def test_generate_hints_when_it_waits_on_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", FakeTerminal(""))
    assert main(["generate"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "calm generate: reading prompts from stdin, one per line; end with Ctrl-D",
        "calm generate: error: no prompt: give prompts as arguments or one per line on stdin",
    ]


@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "pipe"])
def test_no_stream_shows_a_progress_bar_on_a_terminal_only(terminal, monkeypatch, capsys):
    stderr = FakeTerminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    argv = ["generate", "--no-stream", "--device", "cpu", "--max-tokens", "8", "--seed", "3", "--temperature", "1"]
    assert main([*argv, "To be"]) == 0
    assert capsys.readouterr().out.startswith("To be")
    bar = stderr.getvalue()
    if terminal:
        assert "generate: 100%" in bar and "1/1" in bar and "tok/s" in bar
    else:
        assert bar == ""


def test_inspect_says_why_the_autoencoder_projection_is_tied(tmp_path, capsys):
    """The default model's autoencoder config says tie_word_embeddings false, yet its projection is the embedding
    (the official Autoencoder always ties it): the table says so, and an untied checkpoint is shown untied."""
    assert main(["inspect", str(DEFAULT_CALM)]) == 0
    out = capsys.readouterr().out
    assert "  tie_word_embeddings        false" in out.split("autoencoder config:")[1]
    assert "autoencoder.decoder (output projection tied, see note)" in out
    assert "ties\n      them whatever its config's tie_word_embeddings says (here false)" in out

    autoencoder = random_calm_model(seed=4).autoencoder
    autoencoder.decoder.lm_head_weight = torch.nn.Parameter(autoencoder.encoder.embed_tokens.weight.clone() + 1)
    save_autoencoder(autoencoder, tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "  decoder  " in out and "tied" not in out and "note:" not in out


def test_brierlm_help_agrees_with_the_readme(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "brierlm", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "instead of the official protocol (all documents concatenated" in help_text
    readme = " ".join((REPO_ROOT / "README.md").read_text().split())
    assert "The protocol is the official one: every document tokenized with bos, all concatenated" in readme
    assert "`--per-document` instead cuts each document into its own blocks" in readme


def test_brierlm_json_names_the_default_model(tmp_path, capsys):
    data = tmp_path / "docs.jsonl"
    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 4
    data.write_text(json.dumps({"text": text}) + "\n")
    output = tmp_path / "result.json"
    argv = ["eval", "brierlm", "--data", str(data), "--block-size", "64", "--device", "cpu", "--output", str(output)]
    assert main(argv) == 0
    capsys.readouterr()
    assert json.loads(output.read_text())["model"] == str(default_model_path())


def test_generate_verbose_prints_what_the_engine_resolved(capsys):
    code = main(["generate", "Once", "--max-tokens", "4", "--seed", "0", "--device", "cpu", "--no-stream", "--verbose"])
    assert code in (0, None)
    err = capsys.readouterr().err
    assert "calm-engine: CALM (K=4), float32 on cpu" in err and "backends: torch" in err
