"""Data parallelism: BrierLM and a prompt file sharded over ranks give what one process gives, to the last bit.

Each block's samples are keyed by (seed, block index) (brierlm.block_generator) and each prompt's by its own seed,
so the sharding cannot change them. The torchrun tests run the README's commands with 2 processes on gloo.
"""

from __future__ import annotations

import json

import pytest

from calm_engine.brierlm import BrierLMConfig, evaluate_brierlm
from calm_engine.cli import main
from calm_engine.distributed.group import Shard
from tests.conftest import REPO_ROOT
from tests.distributed.torchrun import torchrun
from tests.model_factory import random_calm_model, random_token_llama
from tests.test_brierlm import WordTokenizer, calm_checkpoint_and_documents, random_texts

BRIERS = ("brier1", "brier2", "brier3", "brier4", "positions", "blocks")


@pytest.mark.parametrize("kind", ["calm", "calm_k2", "token"])
def test_block_randomness_does_not_depend_on_batching_or_shards(kind):
    """Batch size 1 vs 3 and every shard of 3 evaluated apart: the same per-block draws, so the same value."""
    if kind == "token":
        model = random_token_llama(seed=5)
    else:
        model = random_calm_model(seed=5, patch_size=2 if kind == "calm_k2" else 4)
    model.tokenizer = WordTokenizer()
    texts = random_texts(6, seed=5)
    config = BrierLMConfig(block_size=32, per_document=True, seed=3)
    single = evaluate_brierlm(model, texts, config)
    batched = evaluate_brierlm(model, texts, BrierLMConfig(block_size=32, per_document=True, seed=3, batch_size=3))
    assert single.blocks >= 6 and single.positions > 0
    for name in BRIERS:  # CALM estimates are sums of indicators: exact; a token model's rounding varies by batch
        assert getattr(batched, name) == pytest.approx(getattr(single, name), abs=1e-6 if kind == "token" else 0)
    other_seed = evaluate_brierlm(model, texts, BrierLMConfig(block_size=32, per_document=True, seed=4))
    assert (other_seed.brier1, other_seed.brier2) != (single.brier1, single.brier2)


def test_torchrun_brierlm_equals_one_process(tmp_path, capsys):
    model_dir, data = calm_checkpoint_and_documents(tmp_path, 9)
    argv = ["eval", "brierlm", str(model_dir), "--data", str(data), "--block-size", "64", "--device", "cpu"]
    assert main([*argv, "--output", str(tmp_path / "one.json")]) == 0
    capsys.readouterr()
    run = torchrun(2, *argv, "--output", str(tmp_path / "two.json"))
    one, two = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    assert one["blocks"] >= 4
    assert {k: two[k] for k in (*BRIERS, "brierlm")} == {k: one[k] for k in (*BRIERS, "brierlm")}
    assert run.stdout.count(f"BrierLM on {data}:") == 1  # rank 0 prints, rank 1 does not


def test_torchrun_prompt_file_equals_one_process(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    lines = [{"prompt": p} for p in ["def add(a, b):", "import os", "class Stack:", "for i in range(10):", "x = ["]]
    lines[2]["seed"] = 77  # a line's own seed wins over --seed + index
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    argv = ["generate", "--input", str(prompts), "--max-tokens", "12", "--seed", "5", "--device", "cpu"]
    # T = 0.5 (the exact sampler); T = 1 shards the same way (the tensor-parallel torchrun test runs it).
    args = [*argv, "--temperature", "0.5", "--num-samples", "16"]
    assert main([*args, "--output", str(tmp_path / "one.jsonl")]) == 0
    torchrun(2, *args, "--output", str(tmp_path / "two.jsonl"))
    one, two = ([json.loads(x) for x in (tmp_path / n).read_text().splitlines()] for n in ("one.jsonl", "two.jsonl"))
    assert [r["index"] for r in two] == list(range(len(lines)))
    assert [r["prompt"] for r in two] == [line["prompt"] for line in lines]
    assert [r["seed"] for r in two] == [5, 6, 77, 8, 9]
    assert two == one


def test_shard_takes_every_nth_item():
    assert Shard(1, 3).take(list(range(8))) == [1, 4, 7]
    assert Shard().take([4, 5]) == [4, 5] and Shard().gather("x") == ["x"]


def test_the_readme_gives_the_tested_commands():
    """The README's multi-process commands are the ones these tests (and test_tensor_parallel's) run via torchrun."""
    readme = (REPO_ROOT / "README.md").read_text()
    for command in [
        "torchrun --nproc-per-node 2 -m calm_engine.cli eval brierlm --data",
        "torchrun --nproc-per-node 2 -m calm_engine.cli generate --input prompts.jsonl --output out.jsonl --seed 0",
        "torchrun --nproc-per-node 2 -m calm_engine.cli generate --tensor-parallel-size 2 --input prompts.jsonl",
    ]:
        assert command in readme, command


def test_prompts_from_arguments_are_refused_under_torchrun(monkeypatch, capsys):
    """Every rank would generate and print every prompt: the prompts must come as a file to shard."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["generate", "import os", "--max-tokens", "4"]) == 2
    assert "under torchrun give the prompts as --input FILE --output FILE" in capsys.readouterr().err
