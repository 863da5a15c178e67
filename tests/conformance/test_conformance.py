"""Conformance with the official implementation, driven by the fixture's cases.json.

Runs unchanged on any fixture directory (CALM_CONFORMANCE_DIR, default ../shared/conformance): nothing here knows
the fixture's sizes. Float outputs must match to a relative error of 1e-4 (max abs difference over max abs value;
the fixtures record the reference's own float32-vs-float64 error at about 1e-6); argmax ids must be identical.
"""

from __future__ import annotations

import pytest
import torch

from calm_engine.brier_estimates import MAX_NGRAM, calm_brier_estimates, calm_start_positions, rollout_steps
from tests.conftest import assert_rel_close

REL_TOL = 1e-4

# The engine's parts of the generate and sampler cases are checked in test_engine_conformance.py; the energy loss
# of the brier case is a training quantity and is not checked.
CHECKED = {
    "ae_encode",
    "ae_decode",
    "ae_roundtrip",
    "lm_prefill",
    "lm_decode",
    "head_sample",
    "generate_t1",
    "generate_t1_eos",
    "generate_t1_unaligned",
    "temperature_sampling_t05",
    "brier",
}


def require(fixture, name: str) -> dict:
    if name not in fixture.cases:
        pytest.skip(f"fixture {fixture.root} has no case {name!r}")
    return fixture.case(name)


def test_every_case_is_known(fixture):
    """A case this suite does not know means the suite is incomplete for this fixture."""
    unknown = sorted(set(fixture.cases) - CHECKED)
    assert not unknown, f"cases without a check: {unknown}"


def test_ae_encode(fixture, autoencoder):
    require(fixture, "ae_encode")
    mean, log_std = autoencoder.encode(fixture.input("ae_encode", 0))
    assert_rel_close(mean, fixture.output("ae_encode", "mean"), REL_TOL, "mean")
    assert_rel_close(log_std, fixture.output("ae_encode", "log_std"), REL_TOL, "log_std")


def test_ae_decode(fixture, autoencoder):
    require(fixture, "ae_decode")
    logits = autoencoder.decode(fixture.input("ae_decode", 0))
    assert_rel_close(logits, fixture.output("ae_decode", "logits"), REL_TOL, "logits")
    assert torch.equal(logits.argmax(-1), fixture.output("ae_decode", "ids"))
    assert torch.equal(autoencoder.decode_ids(fixture.input("ae_decode", 0)), fixture.output("ae_decode", "ids"))


def test_ae_roundtrip(fixture, autoencoder):
    require(fixture, "ae_roundtrip")
    mean, _ = autoencoder.encode(fixture.input("ae_roundtrip", 0))
    assert torch.equal(autoencoder.decode_ids(mean), fixture.output("ae_roundtrip", "ids"))


def test_lm_prefill(fixture, model):
    require(fixture, "lm_prefill")
    ids = fixture.input("lm_prefill", 0)
    assert_rel_close(model.compress(ids), fixture.output("lm_prefill", "inputs_embeds"), REL_TOL, "inputs_embeds")
    assert_rel_close(model.hidden_states(ids), fixture.output("lm_prefill", "hidden"), REL_TOL, "hidden")


def test_lm_decode(fixture, model):
    """The first chunks in one call, then one chunk per call through the KV cache."""
    case = require(fixture, "lm_decode")
    ids = fixture.input("lm_decode", 0)
    expected_prefill = fixture.output("lm_decode", "hidden_prefill")
    expected_steps = fixture.output("lm_decode", "hidden_steps")
    k = model.config.chunk_size
    prefill_chunks = case.get("prefill_chunks", expected_prefill.shape[1])
    cache = model.new_cache(ids.shape[0], capacity=ids.shape[1] // k)
    hidden_prefill = model.hidden_states(ids[:, : prefill_chunks * k], cache)
    steps = [
        model.hidden_states(ids[:, c * k : (c + 1) * k], cache)[:, 0] for c in range(prefill_chunks, ids.shape[1] // k)
    ]
    assert_rel_close(hidden_prefill, expected_prefill, REL_TOL, "hidden_prefill")
    assert_rel_close(torch.stack(steps), expected_steps, REL_TOL, "hidden_steps")


def test_head_sample(fixture, model):
    require(fixture, "head_sample")
    latent = model.sample_latent(fixture.input("head_sample", 0), fixture.input("head_sample", 1))
    assert_rel_close(latent, fixture.output("head_sample", "latent"), REL_TOL, "latent")
    logits = model.autoencoder.decode(latent[:, None])
    assert_rel_close(logits, fixture.output("head_sample", "patch_logits"), REL_TOL, "patch_logits")
    assert torch.equal(logits.argmax(-1), fixture.output("head_sample", "patch_ids"))


@pytest.mark.parametrize("name", ["generate_t1", "generate_t1_eos", "generate_t1_unaligned"])
def test_generate_steps(fixture, model, name):
    """Replay the reference generate() step by step through the KV cache with the recorded noise.

    The prompt is right-padded with the pad id to a multiple of K, as the reference does. Each step samples a
    latent from the last hidden state, decodes the next K ids, replaces them by pads for rows already finished,
    marks rows whose new chunk holds eos as finished, and feeds the chunk back.
    """
    case = require(fixture, name)
    prompt = fixture.input(name, 0)
    noise = fixture.input(name, 1)
    expected_patches = fixture.output(name, "step_patches")
    expected_hidden = fixture.tensors.get(f"{name}.step_hidden")
    expected_latents = fixture.tensors.get(f"{name}.step_latents")
    k, pad = model.config.chunk_size, model.config.pad_token_id
    eos = case.get("eos_token_id_override", case.get("eos_token_id", model.config.eos_token_id))
    if prompt.shape[1] % k:
        prompt = torch.cat([prompt, prompt.new_full((prompt.shape[0], -prompt.shape[1] % k), pad)], dim=1)
    steps = expected_patches.shape[0]
    cache = model.new_cache(prompt.shape[0], capacity=prompt.shape[1] // k + steps)
    hidden = model.hidden_states(prompt, cache)[:, -1]
    unfinished = torch.ones(prompt.shape[0], dtype=torch.bool)
    for step in range(steps):
        if expected_hidden is not None:
            assert_rel_close(hidden, expected_hidden[step], REL_TOL, f"step {step} hidden")
        latent = model.sample_latent(hidden, noise[step])
        if expected_latents is not None:
            assert_rel_close(latent, expected_latents[step], REL_TOL, f"step {step} latent")
        patch = model.autoencoder.decode_ids(latent[:, None])
        assert torch.equal(patch, expected_patches[step]), (
            f"step {step}: {patch.tolist()} != {expected_patches[step].tolist()}"
        )
        fed = torch.where(unfinished[:, None], patch, torch.full_like(patch, pad))
        unfinished &= ~(fed == eos).any(-1)
        if step + 1 < steps:
            hidden = model.hidden_states(fed, cache)[:, -1]


def test_temperature_sampling_pool(fixture, model):
    """The candidate pool: N head samples per row with the recorded noise, decoded by argmax."""
    require(fixture, "temperature_sampling_t05")
    hidden = fixture.input("temperature_sampling_t05", 0)
    noise = fixture.input("temperature_sampling_t05", 1)
    rows, samples, _ = noise.shape
    latents = model.sample_latent(hidden[:, None].expand(rows, samples, -1), noise)
    pool = model.autoencoder.decode_ids(latents.reshape(rows * samples, 1, -1)).reshape(rows, samples, -1)
    assert torch.equal(pool, fixture.output("temperature_sampling_t05", "pool_ids"))


def test_brier_samples_and_targets(fixture, model):
    """The inputs of the reference's Brier estimate: the targets' posterior and the first two head samples."""
    require(fixture, "brier")
    ids = fixture.input("brier", 0)
    noise = fixture.tensors["brier.rand_noise.0"]
    k = model.config.chunk_size
    mean, log_std = model.autoencoder.encode(ids[:, k:].reshape(1, -1))  # the reference flattens the batch
    assert_rel_close(mean, fixture.output("brier", "target_mean"), REL_TOL, "target_mean")
    assert_rel_close(log_std, fixture.output("brier", "target_log_std"), REL_TOL, "target_log_std")
    hidden = model.hidden_states(ids)[:, :-1].reshape(-1, model.config.hidden_size)  # positions predicting a target
    latents = model.sample_latent(hidden[None].expand(2, -1, -1), noise[:2].reshape(2, hidden.shape[0], -1))
    assert_rel_close(latents, fixture.output("brier", "first_two_latents"), REL_TOL, "first_two_latents")


def test_brier_values(fixture, model):
    """Brier-1..4 of the reference's eval_brier from the recorded noise.

    The teacher-forced samples use rows 0 and 1 of rand_noise.0 [samples, targets, noise]. With K < 4 the reference
    rolls forward (one torch.rand call of [2, 1, 1, noise] per step) only from start positions whose two samples
    agree on the whole chunk, in position order; the other positions' roll-out noise is never used.
    """
    case = require(fixture, "brier")
    if "brier.values" not in fixture.tensors:
        pytest.skip(f"fixture {fixture.root} records no brier values")
    ids = fixture.input("brier", 0)
    k, noise_size = model.config.chunk_size, model.config.noise_size
    chunks, steps = ids.shape[1] // k, rollout_steps(k)
    noise = fixture.tensors["brier.rand_noise.0"][:2].reshape(2, 1, chunks - 1, noise_size)
    rollout_noise = None
    if steps > 1:
        if steps != 2:
            pytest.fail(f"this test replays roll-outs of one step (K = 2 or 3), not K={k}")
        positions = calm_start_positions(chunks, k)
        hidden = model.hidden_states(ids[:, :-k])[0, :positions]
        latents = model.sample_latent(hidden.expand(2, -1, -1), noise[:, 0, :positions])
        first, second = (model.autoencoder.decode_ids(latents[i, :, None]) for i in range(2))
        starts = (first == second).all(-1).nonzero()[:, 0].tolist()
        calls = [fixture.tensors[f"brier.rand_noise.{c}"] for c in range(1, len(case["rand_calls"]))]
        assert len(calls) == len(starts), f"{len(calls)} recorded roll-outs, but the samples agree at {starts}"
        assert starts == case.get("rollout_start_positions", starts)
        rollout_noise = torch.zeros(1, 2, 1, positions, noise_size)
        for start, call in zip(starts, calls, strict=True):
            rollout_noise[0, :, 0, start] = call.reshape(2, noise_size)
    estimates, valid = calm_brier_estimates(model, ids, noise=noise, rollout_noise=rollout_noise)
    assert valid.all()
    values = estimates[0].mean(0)
    expected = fixture.output("brier", "values")
    assert values.shape == (MAX_NGRAM,)
    assert torch.allclose(values, expected, rtol=0, atol=1e-6), f"brier1..4 {values.tolist()} != {expected.tolist()}"
