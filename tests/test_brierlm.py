"""BrierLM: the batched estimators against plain per-position computations, the token estimator's mean against the
exact Brier-n by enumeration, the branch attention against full forward passes, blocks, the score, the CLI."""

from __future__ import annotations

import argparse
import itertools
import json
import math

import pytest
import torch

from calm_engine.brier_estimates import calm_brier_estimates, calm_start_positions, rollout_steps, token_brier_estimates
from calm_engine.brierlm import BrierLMConfig, brierlm_score, evaluate_brierlm, split_blocks, tokenize_documents
from calm_engine.brierlm_cli import add_brierlm_arguments, run_brierlm
from calm_engine.model.branches import BranchedContinuations
from calm_engine.model.checkpoint import save_calm
from tests.conftest import assert_rel_close
from tests.model_factory import context_sensitive_model, random_calm_model, random_token_llama

# With full-range noise the context-sensitive model's two samples rarely agree; these scales give a mix of outcomes
# in which every roll-out step's noise changes some estimates.
NOISE_SCALE = 0.3
ROLLOUT_NOISE_SCALE = 0.2


def own_generation(model, rows: int, chunks: int, seed: int) -> torch.Tensor:
    """Token ids the model itself produces with zero noise after a random first chunk, so that its samples often
    match the targets and every term of the estimator is exercised."""
    k = model.config.chunk_size
    ids = torch.randint(3, model.config.vocab_size, (rows, k), generator=torch.Generator().manual_seed(seed))
    for _ in range(chunks - 1):
        hidden = model.hidden_states(ids)[:, -1]
        latent = model.sample_latent(hidden, torch.zeros(rows, model.config.noise_size))
        ids = torch.cat([ids, model.autoencoder.decode_ids(latent[:, None])], dim=1)
    return ids


def plain_calm_estimates(model, ids: torch.Tensor, noise: torch.Tensor, rollout_noise: torch.Tensor) -> list[list]:
    """One row's Brier-1..4 per start position, each sample from a full forward pass over its whole context.

    ids [n*K] (unpadded), noise [2, n-1, noise], rollout_noise [s-1, 2, P, noise]; every roll-out runs in full.
    """
    k = model.config.chunk_size
    steps = rollout_steps(k)

    def sample_pair(context: torch.Tensor, pair_noise: torch.Tensor) -> tuple[list, list]:
        hidden = model.hidden_states(context[None])[0, -1]
        latents = model.sample_latent(hidden.expand(2, -1), pair_noise)
        first, second = model.autoencoder.decode_ids(latents[:, None]).tolist()
        return first, second

    chunks = ids.shape[0] // k
    teacher_forced = [sample_pair(ids[: (t + 1) * k], noise[:, t]) for t in range(chunks - 1)]
    rows = []
    for t in range(calm_start_positions(chunks, k)):
        target = ids[(t + 1) * k : (t + 1 + steps) * k].tolist()
        first = sum((teacher_forced[t + j][0] for j in range(steps)), [])
        second = sum((teacher_forced[t + j][1] for j in range(steps)), [])
        rolled_1, rolled_2 = teacher_forced[t]
        context, fed = ids[: (t + 1) * k], rolled_1
        for j in range(1, steps):
            context = torch.cat([context, torch.tensor(fed)])
            fed, other = sample_pair(context, rollout_noise[j - 1, :, t])
            rolled_1, rolled_2 = rolled_1 + fed, rolled_2 + other
        rows.append(
            [
                (first[:n] == target[:n]) + (second[:n] == target[:n]) - (rolled_1[:n] == rolled_2[:n])
                for n in range(1, 5)
            ]
        )
    return rows


@pytest.mark.parametrize("patch_size", [4, 3, 2, 1])
def test_calm_estimates_match_a_plain_per_position_loop(patch_size):
    """Batched over padded rows, roll-outs through BranchedContinuations, against full forward passes per position."""
    model = context_sensitive_model(seed=1, patch_size=patch_size)
    k, noise_size = patch_size, model.config.noise_size
    chunks = 10
    ids = own_generation(model, 3, chunks, seed=patch_size)
    lengths = torch.tensor([chunks, chunks - 3, chunks - 1]) * k
    for row, length in enumerate(lengths.tolist()):
        ids[row, length:] = 0  # right padding
    steps = rollout_steps(k)
    positions = calm_start_positions(chunks, k)
    generator = torch.Generator().manual_seed(5)
    noise = (torch.rand(2, 3, chunks - 1, noise_size, generator=generator) - 0.5) * NOISE_SCALE
    rollout_shape = (max(steps - 1, 1), 2, 3, positions, noise_size)
    rollout_noise = (torch.rand(rollout_shape, generator=generator) - 0.5) * ROLLOUT_NOISE_SCALE
    estimates, valid = calm_brier_estimates(
        model, ids, lengths, noise=noise, rollout_noise=rollout_noise if steps > 1 else None
    )
    assert estimates.shape == (3, positions, 4)
    expected_valid = [calm_start_positions(length // k, k) for length in lengths.tolist()]
    assert valid.sum(1).tolist() == expected_valid
    assert not valid[:, expected_valid[0] :].any()
    outcomes = set()
    for row, length in enumerate(lengths.tolist()):
        expected = plain_calm_estimates(model, ids[row, :length], noise[:, row], rollout_noise[:, :, row])
        got = estimates[row, : len(expected)].tolist()
        assert got == expected, f"row {row}: batched {got} != plain {expected}"
        outcomes.update(value for position in expected for value in position)
    # With K < 4 an estimate can be 2: both teacher-forced windows hit the target while the roll-outs differ.
    assert {-1, 0, 1} <= outcomes, f"the inputs exercise too little of the estimator: outcomes {outcomes}"


@pytest.mark.parametrize("kind", ["calm_k2", "token_rope_scaled"])
def test_branched_continuations_equal_full_forward_passes(kind):
    if kind == "calm_k2":
        model = context_sensitive_model(seed=2, patch_size=2)
        embed = model.compress
    else:
        model = random_token_llama(seed=2, rope_scaling={"type": "linear", "factor": 2.0})

        def embed(ids):
            return model.backbone.embed_tokens(ids)

    k, vocab = model.config.chunk_size, model.config.vocab_size
    batch, chunks, start, stop, steps = 2, 9, 2, 7, 3
    block = torch.randint(0, vocab, (batch, chunks * k))
    inputs = torch.randint(0, vocab, (steps, batch, stop - start, k))
    cache = model.new_cache(batch, chunks)
    model.hidden_states(block, cache)
    branches = BranchedContinuations(model.backbone, cache, start, stop, steps)
    for j in range(steps):
        got = branches.extend(embed(inputs[j].reshape(batch, -1)))
        for row, p in itertools.product(range(batch), range(start, stop)):
            context = torch.cat([block[row, : (p + 1) * k], inputs[: j + 1, row, p - start].reshape(-1)])
            expected = model.hidden_states(context[None])[0, -1]
            assert_rel_close(got[row, p - start], expected, 1e-5, f"step {j + 1} row {row} branch {p}")


def exact_token_brier(model, context: list[int], target: list[int]) -> tuple[list[float], list[float]]:
    """Exact Brier-n (n = 1..4) of the n tokens after `context`, by enumerating every continuation of up to three
    tokens with a full forward pass each; and the variance of the estimator's Monte-Carlo term for each n,
    X_n = 1{x1, x2 agree on n-1 tokens} * sum_v p(v | x1's prefix)^2, from E[X^2] - E[X]^2."""
    vocab = model.config.vocab_size

    def next_probs(prefixes: list[tuple]) -> torch.Tensor:
        ids = torch.tensor([context + list(prefix) for prefix in prefixes])
        return model.logits(model.hidden_states(ids)[:, -1]).double().softmax(-1)

    briers, variances = [], []
    prefix_probs = {(): 1.0}
    for n in range(1, 5):
        prefixes = list(prefix_probs)
        probs = next_probs(prefixes)
        collision = [float((p**2).sum()) for p in probs]
        mean = sum(prefix_probs[c] ** 2 * s for c, s in zip(prefixes, collision, strict=True))
        square = sum(prefix_probs[c] ** 2 * s**2 for c, s in zip(prefixes, collision, strict=True))
        accuracy = math.prod(float(next_probs([tuple(target[:m])])[0, target[m]]) for m in range(n))
        briers.append(2 * accuracy - mean)
        variances.append(square - mean**2)
        prefix_probs = {
            c + (v,): prefix_probs[c] * float(probs[i, v]) for i, c in enumerate(prefixes) for v in range(vocab)
        }
    return briers, variances


def test_token_estimator_mean_matches_exact_brier():
    """Over R independent replicas the mean estimate must lie within a Bernstein bound of the exact Brier-n.

    Per start position and n the estimate is 2 P(y) (exact) minus X in [0, 1], so |X - E X| <= 1 and, with
    Var X = sigma^2 computed exactly by enumeration, Bernstein's inequality gives
    P(|mean - E| >= eps) <= 2 exp(-R eps^2 / (2 sigma^2 + 2 eps / 3)). Solving for eps at failure probability
    delta / checks (union bound over every position and n, delta = 1e-6 in all) gives the bound used here.
    """
    model = random_token_llama(seed=3, vocab_size=5)
    rows = [[1, 3, 4, 0, 2, 3, 3, 4], [1, 4, 4, 2, 0, 3, 1, 0]]
    lengths = [8, 7]  # the second row is padded by one token
    replicas = 4000
    ids = torch.tensor(rows).repeat(replicas, 1)
    generator = torch.Generator().manual_seed(11)
    estimates, valid = token_brier_estimates(model, ids, torch.tensor(lengths).repeat(replicas), generator=generator)
    checks = sum(length - 4 for length in lengths) * 4
    log_term = math.log(2 * checks / 1e-6)
    assert valid[: len(rows)].sum(1).tolist() == [length - 4 for length in lengths]
    for row, (tokens, length) in enumerate(zip(rows, lengths, strict=True)):
        mean = estimates[row :: len(rows)].double().mean(0)
        for t in range(length - 4):
            briers, variances = exact_token_brier(model, tokens[: t + 1], tokens[t + 1 : t + 5])
            for n in range(4):
                a = 2 * log_term / 3
                bound = (a + math.sqrt(a * a + 8 * replicas * log_term * variances[n])) / (2 * replicas)
                error = abs(float(mean[t, n]) - briers[n])
                assert error <= bound, (
                    f"row {row} position {t} Brier-{n + 1}: |{mean[t, n]:.4f} - {briers[n]:.4f}| > {bound:.4f}"
                )


def test_brierlm_score_clamps_the_product_at_zero():
    assert brierlm_score([0.1, 0.2, 0.4, 0.8]) == pytest.approx(100 * (0.1 * 0.2 * 0.4 * 0.8) ** 0.25)
    assert brierlm_score([0.3, -0.01, 0.2, 0.1]) == 0.0
    assert brierlm_score([-0.5, -0.5, 0.5, 0.5]) == pytest.approx(50.0)  # an even number of negatives
    with pytest.raises(ValueError, match="Brier-1..4"):
        brierlm_score([0.1, 0.2])


def test_blocks_follow_the_official_concatenation():
    documents = [[1, 5, 6], [1, 7, 8, 9, 10], [1, 11], [1, 12, 13, 14]]  # 14 tokens
    blocks, owners = split_blocks(documents, 4, per_document=False, min_tokens=2, multiple=1)
    assert blocks == [[1, 5, 6, 1], [7, 8, 9, 10], [1, 11, 1, 12]]  # the remainder [13, 14] is dropped
    assert [list(o) for o in owners] == [[0, 1], [1], [2, 3]]
    documents[2] = [1]
    blocks, owners = split_blocks(documents, 4, per_document=True, min_tokens=2, multiple=2)
    assert blocks == [[1, 5], [1, 7, 8, 9], [1, 12, 13, 14]]  # cut to a multiple of 2, kept from 2 tokens on
    assert [list(o) for o in owners] == [[0], [1], [3]]


class WordTokenizer:
    """Words -> ids 3.. by position in a fixed list (a stand-in for a real tokenizer)."""

    WORDS = [f"w{i}" for i in range(90)]

    def encode(self, text: str) -> list[int]:
        return [3 + self.WORDS.index(word) for word in text.split()]


def test_tokenize_documents_prepends_bos():
    texts = ["w1 w2", "w5"]
    assert tokenize_documents(texts, WordTokenizer(), 1) == [[1, 4, 5], [1, 8]]
    assert tokenize_documents(texts, WordTokenizer(), None) == [[4, 5], [8]]


def random_texts(count: int, seed: int) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, 150, (count,), generator=generator).tolist()
    return [" ".join(f"w{int(i)}" for i in torch.randint(0, 90, (n,), generator=generator)) for n in lengths]


def test_padded_batches_score_the_same_positions_as_single_blocks():
    """With the head's output independent of the noise, x1 = x2 and each estimate is 2 * 1{x = y} - 1 whatever the
    generator draws: batching blocks of unequal length must then change nothing, padded positions included."""
    model = random_calm_model(seed=4)
    model.generative_head.final_layer.linears[2].weight.zero_()  # the latent no longer depends on the noise
    model.tokenizer = WordTokenizer()
    texts = random_texts(7, seed=4)
    single = evaluate_brierlm(model, texts, BrierLMConfig(block_size=64, batch_size=1, per_document=True))
    batched = evaluate_brierlm(model, texts, BrierLMConfig(block_size=64, batch_size=3, per_document=True))
    blocks, _ = split_blocks(tokenize_documents(texts, model.tokenizer, 1), 64, True, 8, 4)
    assert single.positions == batched.positions == sum(len(b) // 4 - 1 for b in blocks)
    for n in range(1, 5):
        assert getattr(single, f"brier{n}") == pytest.approx(getattr(batched, f"brier{n}"), abs=1e-12)
    assert single.documents == 7 and single.blocks == len(blocks) and single.tokens == sum(map(len, blocks))


def test_bad_input_is_named():
    model = random_calm_model(seed=0)
    ids = torch.randint(0, 97, (2, 16))
    with pytest.raises(ValueError, match="noise must have shape"):
        calm_brier_estimates(model, ids, noise=torch.zeros(2, 2, 4, 5))
    with pytest.raises(ValueError, match="multiples of K=4"):
        calm_brier_estimates(model, ids, torch.tensor([16, 6]))
    with pytest.raises(ValueError, match="at least 2 chunks"):
        calm_brier_estimates(model, ids[:, :4])
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        BrierLMConfig(batch_size=0)
    with pytest.raises(ValueError, match="no tokenizer"):
        evaluate_brierlm(model, ["w1"])
    model.tokenizer = WordTokenizer()
    with pytest.raises(ValueError, match="block size 30 is not a multiple"):
        evaluate_brierlm(model, ["w1"], BrierLMConfig(block_size=30))
    with pytest.raises(ValueError, match="make no block of 256 tokens"):
        evaluate_brierlm(model, ["w1 w2"])
    token_model = random_token_llama(seed=0)
    with pytest.raises(ValueError, match="at least 5 tokens"):
        token_brier_estimates(token_model, torch.randint(0, 97, (1, 4)))


def write_word_tokenizer(directory) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{word: 3 + i for i, word in enumerate(WordTokenizer.WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(directory / "tokenizer.json"))


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="calm eval brierlm")
    add_brierlm_arguments(parser)
    return parser.parse_args(argv)


def calm_checkpoint_and_documents(tmp_path, documents: int):
    """A random CALM checkpoint with the word tokenizer, and a jsonl file of `documents` random texts."""
    model_dir = tmp_path / "calm"
    save_calm(random_calm_model(seed=6), model_dir)
    write_word_tokenizer(model_dir)
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for text in random_texts(documents, seed=6)))
    return model_dir, data


def test_cli_prints_the_table_and_writes_json(tmp_path, capsys):
    model_dir, data = calm_checkpoint_and_documents(tmp_path, 5)
    output = tmp_path / "result.json"
    argv = [str(model_dir), "--data", str(data), "--block-size", "8192", "--max-documents", "4", "--device", "cpu"]
    assert run_brierlm(parse([*argv, "--output", str(output)])) == 0
    printed = capsys.readouterr()
    assert "block size 8192 capped at the model's context: 256 tokens" in printed.out
    assert "BrierLM" in printed.out and "Brier-4" in printed.out
    assert "brierlm: blocks" in printed.err and "documents" in printed.err
    result = json.loads(output.read_text())
    assert result["documents"] == 4 and result["block_size"] == 256 and result["requested_block_size"] == 8192
    assert result["model"] == str(model_dir)
    assert result["brierlm"] == pytest.approx(brierlm_score([result[f"brier{n}"] for n in range(1, 5)]))
    assert result["positions"] == result["blocks"] * (256 // 4 - 1)

    assert run_brierlm(parse([*argv[:3], "--block-size", "30"])) == 2
    assert "not a multiple of the model's chunk size K=4" in capsys.readouterr().err
    data.write_text('{"text": "w1"}\nnot json\n')
    assert run_brierlm(parse(argv)) == 2
    assert "line 2 is not valid JSON" in capsys.readouterr().err
