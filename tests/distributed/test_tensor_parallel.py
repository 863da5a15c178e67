"""Tensor parallelism on CPU with gloo and 2 processes: the official ids with recorded noise, seeded generations equal
to one process, sizes refused before any process starts, and a dead or silent worker named within a bound."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from calm_engine import LLM, SamplingParams
from calm_engine.cli import main
from calm_engine.distributed.tensor_parallel import check_sizes, combine_argmax, vocab_range
from calm_engine.distributed.workers import TensorParallelError
from calm_engine.engine.config import EngineConfig
from calm_engine.engine.noise import COUNTERS_PER_STEP
from calm_engine.engine.weights import ModelWeights
from tests.conformance.conftest import _calm, _fixture
from tests.conformance.test_engine_conformance import GENERATE_CASES
from tests.conftest import REPO_ROOT
from tests.distributed.torchrun import torchrun

FAULT_BOUND_S = 15.0  # a dead worker is named at the next step (liveness check) or by gloo's connection error


class RecordedNoise:
    """Picklable (the workers draw the same noise): request `seed` at step t gets noise[t, seed]."""

    def __init__(self, noise: torch.Tensor):
        self.noise = noise

    def __call__(self, seeds, counters, samples, dim):
        assert samples == 1 and bool((counters % COUNTERS_PER_STEP == 0).all()), "T = 1 draws only"
        return self.noise[counters // COUNTERS_PER_STEP, seeds][:, None, :dim]


def test_official_ids_with_recorded_noise_at_tp2():
    """The three generate cases of the conformance fixture through one TP = 2 engine: each case's rows get their own
    seeds (an offset per case) into one table of every case's recorded noise."""
    fixture, model = _fixture(), _calm("bin")
    cases = [(name, fixture.input(name, 0), fixture.input(name, 1)) for name in GENERATE_CASES]
    steps = max(noise.shape[0] for _, _, noise in cases)
    table = torch.cat([torch.nn.functional.pad(n, (0, 0, 0, 0, 0, steps - n.shape[0])) for _, _, n in cases], dim=1)
    k, pad = model.config.chunk_size, model.config.pad_token_id
    with LLM(model, max_batch_size=8, noise=RecordedNoise(table), tensor_parallel_size=2) as llm:
        first_seed = 0
        for name, prompts, _ in cases:
            expected = fixture.output(name, "output_ids")
            padded_prompt = prompts.shape[1] + (-prompts.shape[1] % k)
            eos = fixture.case(name).get("eos_token_id_override")
            params = [
                SamplingParams(max_tokens=expected.shape[1] - padded_prompt, seed=first_seed + row, keep_eos_chunk=True,
                               stop_token_ids=() if eos is None else (eos,))
                for row in range(prompts.shape[0])
            ]  # fmt: skip
            first_seed += prompts.shape[0]
            outputs = llm.generate([p.tolist() for p in prompts], params, use_tqdm=False)
            for row, output in enumerate(outputs):
                ids = [t for t in output.prompt_token_ids if t != pad] + output.token_ids
                assert ids + [pad] * (expected.shape[1] - len(ids)) == expected[row].tolist(), f"{name} row {row}"


def test_seeded_generations_of_the_default_model_equal_tp1():
    prompts = ["def add(a, b):", "import os", "class Stack:", "for i in"]
    params = [
        SamplingParams(temperature=temperature, max_tokens=24, seed=10 + i, num_samples=32)
        for temperature in (1.0, 0.5) for i in range(len(prompts))
    ]  # fmt: skip
    one = [o.token_ids for o in LLM(step_backend="torch").generate(prompts * 2, params, use_tqdm=False)]
    with LLM(tensor_parallel_size=2, max_batch_size=4) as llm:  # 8 requests through 4 slots: continuous batching
        assert "tensor parallel x2" in llm.engine.describe()
        two = [o.token_ids for o in llm.generate(prompts * 2, params, use_tqdm=False)]
        llm.engine.add_request("aborted", "import sys", SamplingParams(max_tokens=64, seed=3))
        llm.engine.step()
        assert llm.engine.abort("aborted") and not llm.engine.has_unfinished_requests()
        again = llm.generate(prompts[:1], params[:1], use_tqdm=False)[0].token_ids
    assert two == one and again == one[0]
    assert all(len(ids) > 0 for ids in two)


@pytest.mark.parametrize("fault", ["killed", "stopped"])
def test_a_dead_or_silent_worker_is_named_within_the_bound(fault):
    timeout = 3.0  # a stopped worker is caught by the collective's timeout
    llm = LLM(_calm("bin"), tensor_parallel_size=2, parallel_timeout_s=timeout)
    worker = llm.engine.backends.torch.group.processes[0]
    try:
        assert llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=8, seed=1), use_tqdm=False)[0].token_ids
        os.kill(worker.pid, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(TensorParallelError, match="exit code -9" if fault == "killed" else "failed"):
            llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=8, seed=1), use_tqdm=False)
        assert time.monotonic() - started < FAULT_BOUND_S
        with pytest.raises(TensorParallelError, match="close"):
            llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=8, seed=1), use_tqdm=False)
        assert not llm.engine.has_unfinished_requests()  # the failed call aborted its requests
    finally:
        if worker.is_alive():
            os.kill(worker.pid, signal.SIGKILL)
        llm.close()
    assert not worker.is_alive() and not multiprocessing.active_children()


ORPHAN_SCRIPT = """
import sys
from calm_engine import LLM
if __name__ == "__main__":
    llm = LLM(sys.argv[1], tensor_parallel_size=2)
    print(llm.engine.backends.torch.group.processes[0].pid, flush=True)
    sys.stdin.read()
"""


def test_workers_exit_when_the_parent_is_killed(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(ORPHAN_SCRIPT)
    model_dir = str(_fixture().checkpoint_dir("bin", "calm"))
    parent = subprocess.Popen([sys.executable, str(script), model_dir], cwd=REPO_ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        worker_pid = int(parent.stdout.readline())
    finally:
        parent.kill()
        parent.wait(timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(worker_pid):
        time.sleep(0.1)
    assert not _alive(worker_pid), "the worker outlived its parent"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_bad_sizes_are_refused_before_any_process_starts():
    model = _calm("bin")  # 4 heads, 4 key-value heads
    with pytest.raises(ValueError, match="does not divide the model's 4 attention heads"):
        LLM(model, tensor_parallel_size=3)
    if torch.cuda.device_count() < 2:
        with pytest.raises(ValueError, match="needs one GPU per rank"):
            check_sizes(ModelWeights.of(model), 2, torch.device("cuda"))
    assert not multiprocessing.active_children()
    with pytest.raises(ValueError, match="step_backend='native' runs in one process only"):
        EngineConfig(tensor_parallel_size=2, step_backend="native")
    with pytest.raises(ValueError, match="CUDA graphs run in one process only"):
        EngineConfig(tensor_parallel_size=2, use_cuda_graph=True)
    with pytest.raises(ValueError, match="tensor_parallel_size must be an integer >= 1"):
        EngineConfig(tensor_parallel_size=0)


def test_vocabulary_ranges_cover_the_vocabulary_in_rank_order():
    for vocab, size in [(512, 2), (513, 2), (7, 3), (5, 4)]:
        ranges = [vocab_range(vocab, rank, size) for rank in range(size)]
        assert ranges[0][0] == 0 and ranges[-1][1] == vocab
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
        assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1


def test_sharded_argmax_equals_the_whole_vocabulary_argmax_ties_included():
    """Logits with many ties (few distinct values), split into 2 or 3 ranges: each rank's (first index, max) pair,
    combined, gives torch.argmax over the whole row (its first maximum)."""
    logits = torch.randint(0, 4, (64, 37)).float()
    for size in (2, 3):
        ranges = [vocab_range(37, rank, size) for rank in range(size)]
        pairs = [logits[:, a:b].max(-1) for a, b in ranges]
        ids = torch.stack([p.indices + a for p, (a, _) in zip(pairs, ranges, strict=True)])
        ids, values = combine_argmax(ids, torch.stack([p.values for p in pairs]))
        assert torch.equal(ids, logits.argmax(-1)) and torch.equal(values, logits.max(-1).values)


def test_torchrun_tensor_parallel_generate_equals_one_process(tmp_path):
    """Under torchrun the ranks join its group: rank 0 schedules and writes, rank 1 serves its steps and exits."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["def add(a, b):", "import os", "x = ["]))
    argv = ["generate", "--input", str(prompts), "--max-tokens", "16", "--seed", "3", "--temperature", "0.5",
            "--num-samples", "16", "--device", "cpu"]  # fmt: skip
    assert main([*argv, "--output", str(tmp_path / "one.jsonl")]) == 0
    torchrun(2, *argv, "--tensor-parallel-size", "2", "--output", str(tmp_path / "two.jsonl"))
    assert (tmp_path / "two.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()
