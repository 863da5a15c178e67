"""Bad input, one case at a time, through the CLI and the API.

Every case asserts the message (one line naming the problem; the CLI adds no traceback and exits nonzero) and that
the same engine then still generates the seeded reference output, computed once when the module's engine is new.
CLI cases run `calm_engine.cli.main` in-process on that engine (its LLM factory is patched to hand it out); the
ones that need real argv bytes, stdin bytes or a real SIGINT run in a subprocess whose driver checks its own engine
the same way.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import calm_engine
import calm_engine.cli as cli
from calm_engine import LLM, LLMEngine, SamplingParams
from calm_engine.cli import main
from calm_engine.model.checkpoint import DEFAULT_CALM, CheckpointError, save_calm
from tests.model_factory import random_calm_model

PROMPT = "The history of the city"
# T < 1 exercises the sample pool and the likelihood-free sampler, T = 1 the fast path (the C++ step where built).
REFERENCE_PARAMS = (
    SamplingParams(temperature=0.5, num_samples=64, max_tokens=12, seed=2024),
    SamplingParams(temperature=1.0, max_tokens=12, seed=7),
)
SLOTS = 4


@dataclass
class Shared:
    llm: LLM
    reference: list[list[int]]

    def generate(self) -> list[list[int]]:
        return [self.llm.generate(PROMPT, p, use_tqdm=False)[0].token_ids for p in REFERENCE_PARAMS]

    def assert_unharmed(self) -> None:
        """No request left behind, every slot free, and the seeded outputs of the fresh engine again."""
        engine = self.llm.engine
        assert not engine.has_unfinished_requests() and not engine.requests
        assert sorted(engine.scheduler.free_slots) == list(range(SLOTS))
        assert self.generate() == self.reference


@pytest.fixture(scope="module")
def shared() -> Shared:
    llm = LLM(max_batch_size=SLOTS)
    state = Shared(llm, [])
    state.reference = state.generate()  # before any bad input reaches the engine
    assert all(len(ids) > 4 for ids in state.reference)
    return state


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints and files that are wrong in one way each."""
    root = tmp_path_factory.mktemp("bad_input")
    nan = root / "nan_calm"
    save_calm(random_calm_model(seed=3), nan)
    weights = load_file(nan / "model.safetensors")
    weights["transformer.layers.1.mlp.up_proj.weight"][0, :3] = float("nan")
    save_file(weights, nan / "model.safetensors", metadata={"format": "pt"})
    bad_config = root / "bad_config"
    bad_config.mkdir()
    (bad_config / "config.json").write_text('{"hidden_size": 64,')
    docs = root / "docs.jsonl"
    docs.write_text(json.dumps({"text": "To be, or not to be."}) + "\n")
    bad_docs = root / "bad_docs.jsonl"
    bad_docs.write_text(json.dumps({"text": "fine"}) + "\n{not json\n")
    return {
        "nan": nan,
        "bad_config": bad_config,
        "autoencoder": DEFAULT_CALM / "autoencoder",  # the shipped config-only folder
        "file": DEFAULT_CALM / "config.json",
        "missing": root / "missing",
        "docs": docs,
        "bad_docs": bad_docs,
    }


def _one_line(message: str) -> str:
    assert message.count("\n") == 0, f"not one line: {message!r}"
    return message


# ---- the API ---------------------------------------------------------------------------------------------------

P = SamplingParams
API_CASES = {
    # prompts
    "prompts None": (lambda llm, _: llm.generate(None), TypeError, r"prompts must be a str.*got None"),
    "prompts bytes": (lambda llm, _: llm.generate(b"hello"), TypeError, r"prompts is bytes \(b'hello'\): decode"),
    "prompt bytes in a list": (lambda llm, _: llm.generate([b"hi", "ok"]), TypeError, r"prompt is bytes"),
    "prompt None in a list": (lambda llm, _: llm.generate(["ok", None]), TypeError, r"a prompt must be .*got None"),
    "prompt int": (lambda llm, _: llm.generate(5), TypeError, r"prompts must be .*got 5"),
    "lone surrogate": (lambda llm, _: llm.generate("ab\ud800"), ValueError, r"'\\ud800' at index 2 is a lone surr"),
    "empty prompt": (lambda llm, _: llm.generate([[]]), ValueError, r"the prompt is empty"),
    "id outside the vocabulary": (lambda llm, _: llm.generate([1, 8192]), ValueError, r"8192 is not an id .*8192\)"),
    "negative id": (lambda llm, _: llm.generate([[5, -1]]), ValueError, r"token -1 is not an id"),
    "float id": (lambda llm, _: llm.generate([[5, 2.5]]), ValueError, r"token 2\.5 is not an id"),
    "string ids": (lambda llm, _: llm.generate([["a", "b"]]), ValueError, r"token 'a' is not an id"),
    "3-D tensor": (lambda llm, _: llm.generate(torch.ones(1, 2, 3, dtype=torch.long)), ValueError, r"1-D .* 2-D"),
    "2-D tensor to add_request": (
        lambda llm, _: llm.engine.add_request("x", np.ones((2, 4), dtype=np.int64)),
        ValueError,
        r"must be 1-D, got shape \[2, 4\]",
    ),
    "prompt over max_model_len": (lambda llm, _: llm.generate("word " * 600), ValueError, r"longer than max_model"),
    # sampling parameters
    "temperature 0": (lambda llm, _: P(temperature=0), ValueError, r"in \(0, 1\], got 0: .*no greedy"),
    "temperature negative": (lambda llm, _: P(temperature=-0.5), ValueError, r"in \(0, 1\], got -0\.5"),
    "temperature NaN": (lambda llm, _: P(temperature=math.nan), ValueError, r"in \(0, 1\], got nan"),
    "temperature above 1": (lambda llm, _: P(temperature=1.5), ValueError, r"in \(0, 1\], got 1\.5: .*above 1"),
    "temperature string": (lambda llm, _: P(temperature="0.5"), ValueError, r"got '0\.5' \(a str, not a number\)"),
    "stop None": (lambda llm, _: P(stop=None), ValueError, r"stop must be a string or a list of strings.*got None"),
    "stop bytes": (lambda llm, _: P(stop=b"."), ValueError, r"stop must be a string .*got b'\.'"),
    "stop empty string": (lambda llm, _: P(stop=["ok", ""]), ValueError, r"non-empty strings, got ''"),
    "stop_token_ids int": (lambda llm, _: P(stop_token_ids=5), ValueError, r"single number 5: write \[5\]"),
    "stop_token_ids None": (lambda llm, _: P(stop_token_ids=None), ValueError, r"list of token ids .*got None"),
    "stop_token_ids negative": (lambda llm, _: P(stop_token_ids=[-3]), ValueError, r"stop_token_ids .* got -3"),
    "seed negative": (lambda llm, _: P(seed=-1), ValueError, r"seed must be an integer >= 0, got -1"),
    "seed too large": (lambda llm, _: P(seed=2**64), ValueError, r"below 2\*\*63, got 18446744073709551616"),
    "seed float": (lambda llm, _: P(seed=1.5), ValueError, r"seed must be an integer >= 0, got 1\.5"),
    "max_tokens 0": (lambda llm, _: P(max_tokens=0), ValueError, r"max_tokens must be an integer >= 1, got 0"),
    "num_samples 0": (lambda llm, _: P(num_samples=0), ValueError, r"num_samples must be an integer >= 1, got 0"),
    "num_samples below 1/T": (lambda llm, _: P(temperature=0.25, num_samples=3), ValueError, r"below n=floor\(1/T\)=4"),
    "sampler unknown": (lambda llm, _: P(sampler="greedy"), ValueError, r"sampler must be one of .*'greedy'"),
    "exact_max_pools 0": (lambda llm, _: P(exact_max_pools=0), ValueError, r"exact_max_pools .* got 0"),
    "exact_max_pools above the counters": (
        lambda llm, _: llm.generate("x", P(temperature=0.5, sampler="exact", exact_max_pools=33)),
        ValueError,
        r"exact_max_pools must be at most 32, got 33",
    ),
    "ignore_eos not a bool": (lambda llm, _: P(ignore_eos="yes"), ValueError, r"ignore_eos must be True or False"),
    "params a dict": (lambda llm, _: llm.generate("x", {"temperature": 0.5}), TypeError, r"must be a SamplingParams"),
    "params count": (lambda llm, _: llm.generate(["a", "b"], [P(), P(), P()]), ValueError, r"3 SamplingParams for 2"),
    # memory
    "sample pool of one request": (
        lambda llm, _: llm.generate("x", P(temperature=0.5, num_samples=1_000_000)),
        ValueError,
        r"num_samples=1000000 draws 1,000,000 head samples per step, about 8\.\d GiB .*sample_pool_memory=2\.0 GiB",
    ),
    "sample pool of a batch": (
        lambda llm, _: llm.generate(["a"] * 4, P(temperature=0.5, num_samples=70_000)),
        ValueError,
        r"4 requests that would run together draws 4 x 70,000 .*max_batch_size.*sample_pool_memory",
    ),
    # the step API
    "request id reused": (
        lambda llm, _: [llm.engine.add_request("dup", "a"), llm.engine.add_request("dup", "b")],
        ValueError,
        r"request_id 'dup' is already in use",
    ),
    "request id empty": (lambda llm, _: llm.engine.add_request("", "a"), ValueError, r"non-empty string, got ''"),
    # building engines and loading checkpoints (the shared engine must not notice)
    "device unknown": (lambda llm, _: LLM(device="banana"), ValueError, r"'cpu' or 'cuda'.*got 'banana'"),
    "device cuda:99": (lambda llm, _: LLM(device="cuda:99"), ValueError, r"'cuda:99'"),
    "dtype unknown": (lambda llm, _: LLM(dtype="float64"), ValueError, r"dtype must be one of .*'float64'"),
    "padding unknown": (lambda llm, _: LLMEngine(llm.model, prompt_padding="middle"), ValueError, r"'middle'"),
    "pool budget 0": (lambda llm, _: LLMEngine(llm.model, sample_pool_memory=0), ValueError, r"sample_pool_mem.*0"),
    "checkpoint with NaN": (
        lambda llm, paths: calm_engine.load(paths["nan"]),
        CheckpointError,
        r"tensor transformer\.layers\.1\.mlp\.up_proj\.weight holds 3 NaN and 0 infinite values",
    ),
    "autoencoder as a model": (
        lambda llm, paths: LLM(paths["autoencoder"]),
        CheckpointError,
        r"is an autoencoder checkpoint .*not a language model: calm_engine\.load_autoencoder",
    ),
    "config-only autoencoder": (
        lambda llm, paths: calm_engine.load_autoencoder(paths["autoencoder"]),
        CheckpointError,
        r"holds an autoencoder config\.json but no weights.*ae_model\.\*; pass that checkpoint's directory \(here",
    ),
    "checkpoint is a file": (lambda llm, paths: calm_engine.load(paths["file"]), CheckpointError, r"is a file; give"),
    "checkpoint missing": (
        lambda llm, paths: LLM(paths["missing"]),
        CheckpointError,
        r"directory not found: .*missing",
    ),
    "config not JSON": (
        lambda llm, paths: calm_engine.load(paths["bad_config"]),
        ValueError,
        r"config\.json: not valid",
    ),
}


@pytest.mark.parametrize("case", API_CASES)
def test_api_refuses_bad_input_and_the_engine_carries_on(case, shared, paths):
    call, error, pattern = API_CASES[case]
    with pytest.raises(error) as caught:
        call(shared.llm, paths)
    assert re.search(pattern, _one_line(str(caught.value))), str(caught.value)
    if case == "request id reused":  # the first of the two was valid and stays queued: the caller's to abort
        assert shared.llm.engine.abort("dup")
    shared.assert_unharmed()


@pytest.mark.parametrize("exception", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_generate_aborts_its_requests(exception, shared, monkeypatch):
    """Ctrl-C (or any error) in the middle of LLM.generate: its requests are aborted, later calls work."""
    engine, steps = shared.llm.engine, []
    real_step = engine.step

    def step():
        steps.append(1)
        if len(steps) == 3:
            raise exception("interrupted in a step")
        return real_step()

    monkeypatch.setattr(engine, "step", step)
    with pytest.raises(exception, match="interrupted in a step"):
        shared.llm.generate([PROMPT] * 8, SamplingParams(max_tokens=64, seed=1, ignore_eos=True))
    monkeypatch.undo()
    shared.assert_unharmed()


# ---- the CLI, in-process on the shared engine --------------------------------------------------------------------


@pytest.fixture
def run_cli(shared, monkeypatch, capsys):
    """main(argv) with the shared engine behind `calm generate` (other --model values load for real)."""

    def llm_factory(model=None, **options):
        return shared.llm if model is None else LLM(model, **options)

    monkeypatch.setattr(cli, "LLM", llm_factory)

    def run(argv: list[str], stdin: bytes | None = None) -> tuple[int, str, str]:
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
        try:
            rc = main(argv)
        except SystemExit as exit_:  # argparse's usage errors
            rc = exit_.code
        out, err = capsys.readouterr()
        return rc, out, err

    return run


CUDA_PATTERN = r"device 'cuda:99': only \d+ CUDA device" if torch.cuda.is_available() else r"sees no CUDA GPU"
CLI_CASES = {
    "temperature 0": (["generate", "--temperature", "0", "x"], r"temperature must be in \(0, 1\], got 0\.0"),
    "temperature negative": (["generate", "--temperature", "-1", "x"], r"in \(0, 1\], got -1\.0"),
    "temperature NaN": (["generate", "--temperature", "nan", "x"], r"in \(0, 1\], got nan"),
    "temperature 2": (["generate", "--temperature", "2", "x"], r"in \(0, 1\], got 2\.0"),
    "temperature not a number": (["generate", "--temperature", "hot", "x"], r"invalid float value: 'hot'"),
    "max-tokens 0": (["generate", "--max-tokens", "0", "x"], r"max_tokens must be an integer >= 1, got 0"),
    "max-tokens not a number": (["generate", "--max-tokens", "many", "x"], r"--max-tokens: invalid int value"),
    "num-samples 0": (["generate", "--num-samples", "0", "x"], r"num_samples must be an integer >= 1, got 0"),
    "num-samples below 1/T": (["generate", "--temperature", "0.25", "--num-samples", "3", "x"], r"below n=floor"),
    "num-samples over the pool budget": (["generate", "--num-samples", "1000000", "x"], r"sample_pool_memory=2\.0 GiB"),
    "seed negative": (["generate", "--seed", "-1", "x"], r"--seed -1: .*\[0, 2\*\*63 - 1\]"),
    "seed + i too large": (["generate", "--seed", str(2**63 - 1), "a", "b"], r"--seed 9223372036854775807: prompt i"),
    "batch 0": (["generate", "--batch", "0", "x"], r"--batch must be at least 1, got 0"),
    "device banana": (["generate", "--device", "banana", "x"], r"'cpu' or 'cuda'.*got 'banana'"),
    "device cuda": (["generate", "--device", "cuda:99", "x"], CUDA_PATTERN),
    "dtype unknown": (["generate", "--dtype", "float64", "x"], r"invalid choice: 'float64'"),
    "model missing": (["generate", "--model", "{missing}", "x"], r"directory not found: .*missing"),
    "model is a file": (["generate", "--model", "{file}", "x"], r"config\.json is a file; give the checkpoint"),
    "model is an autoencoder": (["generate", "--model", "{autoencoder}", "x"], r"is an autoencoder checkpoint"),
    "model with NaN": (["generate", "--model", "{nan}", "x"], r"up_proj\.weight holds 3 NaN"),
    "model config not JSON": (["generate", "--model", "{bad_config}", "x"], r"bad_config/config\.json: not valid"),
    "lone surrogate argument": (["generate", "ok", "a\ud800"], r"prompt argument 2 holds a lone surrogate \(U\+D800"),
    "undecodable argument": (["generate", "caf\udce9"], r"prompt argument 1 is not valid UTF-8 \(byte 0xe9 at byte 3"),
    "inspect a file": (["inspect", "{file}"], r"config\.json is a file; give the checkpoint directory"),
    "inspect a bad config": (["inspect", "{bad_config}"], r"bad_config/config\.json: not valid JSON"),
    "inspect missing": (["inspect", "{missing}"], r"directory not found: .*missing"),
    "inspect NaN weights": (["inspect", "{nan}"], r"nan_calm: tensor transformer\.layers\.1\.mlp\.up_proj\.weight"),
    "brierlm device": (["eval", "brierlm", "--data", "{docs}", "--device", "banana"], r"got 'banana'"),
    "brierlm data missing": (["eval", "brierlm", "--data", "{missing}"], r"missing"),
    "brierlm bad line": (["eval", "brierlm", "--data", "{bad_docs}"], r"bad_docs\.jsonl: line 2 is not valid JSON"),
    "brierlm max-documents 0": (["eval", "brierlm", "--data", "{docs}", "--max-documents", "0"], r"at least 1, got 0"),
    "unknown command": (["frobnicate"], r"invalid choice: 'frobnicate'"),
}


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_refuses_bad_input_and_the_engine_carries_on(case, run_cli, shared, paths):
    argv, pattern = CLI_CASES[case]
    rc, out, err = run_cli([arg.format(**paths) for arg in argv])
    assert rc == 2 and "Traceback" not in err, err
    assert re.search(r"^calm( \w+)*: error: ", _one_line(err.rstrip("\n"))) and re.search(pattern, err), err
    shared.assert_unharmed()


@pytest.mark.parametrize(
    "stdin, pattern",
    [
        (b"fine\n\xff\xfe bad\n", r"stdin line 2 is not valid UTF-8 \(byte 0xff at byte 0\)"),
        (b"", r"no prompt: give prompts as arguments or one per line on stdin"),
        (b"\n  \n", r"no prompt"),
    ],
    ids=["not UTF-8", "empty", "blank lines"],
)
def test_cli_refuses_bad_stdin_and_the_engine_carries_on(stdin, pattern, run_cli, shared):
    rc, out, err = run_cli(["generate"], stdin=stdin)
    assert rc == 2 and re.search(pattern, _one_line(err.rstrip("\n"))), err
    shared.assert_unharmed()


def test_cli_ctrl_c_exits_130_with_one_line(run_cli, shared, monkeypatch):
    engine, steps = shared.llm.engine, []
    real_step = engine.step

    def step():
        steps.append(1)
        if len(steps) == 2:
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(engine, "step", step)
    rc, out, err = run_cli(["generate", "--seed", "0", PROMPT])
    monkeypatch.setattr(engine, "step", real_step)
    assert rc == 130 and err == "calm generate: interrupted\n"
    assert out.startswith(PROMPT) and out.endswith("\n")  # the streamed line is ended
    shared.assert_unharmed()


# ---- the CLI in a subprocess: real argv bytes, stdin bytes, SIGINT ----------------------------------------------

# Builds one engine, records its seeded reference outputs, runs `calm` on the command line's arguments with that engine
# behind `calm generate`, then generates the reference again and writes what it saw to $CALM_TEST_RESULT.
DRIVER = """
import json, os, sys
import calm_engine.cli as cli
from calm_engine import LLM, SamplingParams
params = [SamplingParams(**p) for p in json.loads(os.environ["CALM_TEST_PARAMS"])]
llm = LLM(max_batch_size=4)
def generate():
    return [llm.generate(os.environ["CALM_TEST_PROMPT"], p, use_tqdm=False)[0].token_ids for p in params]
reference = generate()
cli.LLM = lambda model=None, **options: llm
rc = cli.main(sys.argv[1:])
result = {"rc": rc, "same": generate() == reference, "unfinished": llm.engine.has_unfinished_requests()}
with open(os.environ["CALM_TEST_RESULT"], "w") as f:
    json.dump(result, f)
"""


def _driver(tmp_path: Path, args: list, **popen) -> tuple[subprocess.Popen, Path]:
    result = tmp_path / "result.json"
    params = [
        {"temperature": p.temperature, "num_samples": p.num_samples, "max_tokens": p.max_tokens, "seed": p.seed}
        for p in REFERENCE_PARAMS
    ]
    env = {
        **os.environ,
        "CALM_TEST_RESULT": str(result),
        "CALM_TEST_PARAMS": json.dumps(params),
        "CALM_TEST_PROMPT": PROMPT,
    }
    command = [sys.executable, "-c", DRIVER, *args]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)
    return process, result


def _check_subprocess(process, result: Path, rc: int, pattern: str, stdin: bytes | None = None) -> None:
    out, err = process.communicate(stdin, timeout=300)
    err = err.decode()
    assert "Traceback" not in err and re.search(pattern, _one_line(err.rstrip("\n"))), err
    seen = json.loads(result.read_text())
    assert seen == {"rc": rc, "same": True, "unfinished": False}


def test_subprocess_undecodable_argv(tmp_path):
    process, result = _driver(tmp_path, ["generate", b"caf\xe9 au lait"], stdin=subprocess.DEVNULL)
    _check_subprocess(process, result, 2, r"^calm generate: error: prompt argument 1 is not valid UTF-8 \(byte 0xe9")


def test_subprocess_undecodable_stdin(tmp_path):
    process, result = _driver(tmp_path, ["generate"], stdin=subprocess.PIPE)
    _check_subprocess(process, result, 2, r"^calm generate: error: stdin line 1 is not valid UTF-8", b"\xc3\x28\n")


def test_subprocess_sigint_exits_130_with_one_line(tmp_path):
    """A real Ctrl-C while `calm generate` streams: one line on stderr, status 130, the engine usable afterwards."""
    args = ["generate", "--temperature", "0.5", "--num-samples", "2000", "--max-tokens", "400", "--seed", "1", PROMPT]
    process, result = _driver(tmp_path, args, stdin=subprocess.DEVNULL)
    assert process.stdout.read(len(PROMPT)).decode() == PROMPT  # streaming has begun (~100 steps to go)
    process.send_signal(signal.SIGINT)
    _check_subprocess(process, result, 130, r"^calm generate: interrupted$")
