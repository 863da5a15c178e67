"""The token-level baseline (TokenLlama, K = 1) through the engine: its step vs reference model, generation vs a plain
reference loop, sampler statistics, continuous batching, and its Hugging Face checkpoints."""

from __future__ import annotations

import json
import random

import pytest
import torch
from calm_engine.kernels import triton_available
from calm_engine.kernels.philox import uniform_noise_ref
from safetensors.torch import load_file, save_file

import calm_engine
from calm_engine import LLM, LLMEngine, SamplingParams
from calm_engine.engine.kv_cache import SlotKVCache
from calm_engine.engine.noise import counter
from calm_engine.engine.sampler import SamplingBatch
from calm_engine.model.checkpoint import CheckpointError
from calm_engine.model.config import ConfigError, TokenLlamaConfig
from calm_engine.model.llama import rotary_cos_sin
from calm_engine.model.token_llama import TokenLlama, save_token_llama
from tests.conftest import assert_rel_close
from tests.engine.batching import assert_each_equals_running_alone, run_with_arrivals_and_aborts
from tests.engine.steps import torch_step
from tests.model.test_modules import llama3_inverse_frequencies_float64
from tests.model_factory import random_token_llama
from tests.stats import empirical, total_variation, tv_threshold

SHAPES = {
    "gqa": dict(),
    "mha-bias": dict(num_attention_heads=2, num_key_value_heads=2, attention_bias=True, mlp_bias=True),
    "gelu-tied-rope-linear": dict(
        vocab_size=131, hidden_act="gelu", tie_word_embeddings=True, rope_scaling={"type": "linear", "factor": 2.0}
    ),
    # Llama 3.1's scaling; head_dim 8: one frequency kept, one blended, two scaled (tests/model/test_modules.py).
    "rope-llama3": dict(
        rope_scaling={
            "rope_type": "llama3",
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 8.0,
            "original_max_position_embeddings": 100,
        }
    ),
}
REL = 2e-5  # float32 results of differently ordered but equal sums


def make_runner(shape: str, dtype=torch.float32, slots: int = 5, capacity: int = 16):
    reference = random_token_llama(seed=len(shape), **SHAPES[shape]).to(dtype)
    fast = random_token_llama(seed=len(shape), **SHAPES[shape]).to(dtype)
    return reference, fast, torch_step(fast, SlotKVCache(fast.config, slots, capacity, fast.device, fast.dtype))


def sampling_batch(params: list[SamplingParams], seeds: list[int], steps: list[int]) -> SamplingBatch:
    """The SamplingBatch the engine builds for a T = 1 pool (the token step reads seeds, steps and 1/T only)."""
    return SamplingBatch(
        seeds=torch.tensor(seeds),
        steps=torch.tensor(steps),
        valid=torch.ones(len(params), 1, dtype=torch.bool),
        inv_floor=torch.tensor([p.inverse_floor for p in params]),
        inv_frac=torch.tensor([p.inverse_temperature - p.inverse_floor for p in params], dtype=torch.float64),
        pools=torch.zeros(len(params), dtype=torch.long),
        max_pools=0,
    )


def reference_generate(model: TokenLlama, prompt: list[int], seed: int, max_tokens: int, temperature: float = 1.0):
    """One request alone with the reference model API: cached hidden states, logits, Gumbel-max over the engine's
    Philox uniforms for (seed, noise.counter(step)). Pad ids are sampled and fed back but not reported."""
    vocab = model.config.vocab_size
    cache = model.new_cache(1)
    hidden = model.hidden_states(torch.tensor([prompt]), cache)[:, -1]
    out = []
    for step in range(max_tokens):
        u = uniform_noise_ref(torch.tensor([seed]), torch.tensor([counter(step)]), 1, vocab)[:, 0] + 0.5
        scores = model.logits(hidden).to(torch.promote_types(hidden.dtype, torch.float32)) / temperature
        token = int((scores - torch.log(-torch.log(u.to(scores.dtype)))).argmax(-1))
        out.append(token)
        hidden = model.hidden_states(torch.tensor([[token]]), cache)[:, -1]
    return [t for t in out if t != model.config.pad_token_id]


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_prefill_and_decode_match_reference(shape):
    """Prompts of 1, 7 and 3 tokens prefilled together into slots 3, 0, 4, then decoded token by token."""
    reference, model, runner = make_runner(shape)
    vocab = reference.config.vocab_size
    lengths, slots = [1, 7, 3], torch.tensor([3, 0, 4])
    full = [torch.randint(0, vocab, (1, n + 3)) for n in lengths]  # each prompt plus 3 tokens to decode
    for tensor in runner.cache.keys + runner.cache.values:
        tensor.fill_(1e3)  # unwritten positions must never count (finite poison, see test_torch_step.py)
    tails = [torch.randint(0, vocab, (1, 7 - n)) for n in lengths]  # right padding: any ids
    padded = torch.cat([torch.cat([f[:, :n], t], 1) for f, n, t in zip(full, lengths, tails, strict=True)])
    hidden = runner.prefill_hidden(padded, torch.tensor(lengths), slots)
    expected = torch.cat([reference.hidden_states(f[:, :n])[:, -1] for f, n in zip(full, lengths, strict=True)])
    assert_rel_close(hidden, expected, REL, "prefill hidden")
    for step in range(3):
        positions = torch.tensor(lengths) + step
        ids = torch.cat([f[:, n + step : n + step + 1] for f, n in zip(full, lengths, strict=True)])
        hidden = runner.decode_hidden(ids, positions, slots, attend=int(positions.max()) + 1)
        expected = torch.cat(
            [reference.hidden_states(f[:, : n + step + 1])[:, -1] for f, n in zip(full, lengths, strict=True)]
        )
        assert_rel_close(hidden, expected, REL, f"decode step {step} hidden")
    assert_rel_close(runner.logits(hidden), reference.logits(expected), REL, "logits")


def test_step_shares_the_model_weights():
    reference, model, runner = make_runner("gelu-tied-rope-linear")
    assert runner.chunk_size == 1 and runner.weights.lm_head.weight is model.backbone.embed_tokens.weight
    packed = runner.weights.backbone.layers[0].qkv.weight
    k_proj = model.backbone.layers[0].self_attn.k_proj.weight
    assert packed.untyped_storage().data_ptr() == k_proj.untyped_storage().data_ptr(), "weights stored twice"
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    assert torch.equal(model.hidden_states(ids), reference.hidden_states(ids))


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_decode_with_kernels_matches_torch():
    """The CUDA path's decode attention kernel (under the triton interpreter here) on the token step."""
    _, model, runner = make_runner("gqa")
    cache = SlotKVCache(model.config, 5, 16, model.device, torch.float32)
    fast = torch_step(model, cache, use_kernels=True)
    ids = torch.randint(0, model.config.vocab_size, (3, 7))
    for r in (runner, fast):
        r.prefill_hidden(ids, torch.tensor([7, 2, 5]), torch.tensor([1, 4, 0]))
    step = (torch.tensor([[3], [4], [5]]), torch.tensor([7, 2, 5]), torch.tensor([1, 4, 0]))
    assert_rel_close(fast.decode_hidden(*step, attend=8), runner.decode_hidden(*step, attend=8), 1e-4, "decode hidden")


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph-buffers"])
def test_generation_matches_the_reference_loop(graph):
    """T = 1 and T = 0.5 requests of different lengths batched through LLM (eagerly, or through the CUDA-graph
    runner's static buffers replayed eagerly on CPU) equal the plain reference loop token for token."""
    model = random_token_llama(seed=3)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16], [40], [3, 4]]
    settings = [(9, 1, 1.0), (12, 2, 1.0), (5, 3, 0.5), (1, 4, 0.5)]
    params = [SamplingParams(temperature=t, max_tokens=n, seed=s, ignore_eos=True) for n, s, t in settings]
    llm = LLM(model, max_batch_size=3, max_model_len=32, use_cuda_graph=graph)
    outputs = llm.generate(prompts, params)
    for prompt, p, output in zip(prompts, params, outputs, strict=True):
        assert output.token_ids == reference_generate(model, prompt, p.seed, p.max_tokens, p.temperature)
        assert output.finish_reason == "length" and output.prompt_token_ids == prompt


@pytest.mark.parametrize("temperature", [1.0, 0.5, 0.7])
def test_first_token_distribution_matches_softmax(temperature):
    """The first sampled token over many seeds against softmax(logits / T), exactly computed.

    The threshold comes from tests/stats.py (one sample of size N against the exact p, failure probability 1e-6);
    the test also checks that the T = 1 distribution would fail it at T < 1, so a sampler ignoring T cannot pass.
    """
    _, model, runner = make_runner("gqa", dtype=torch.float64)
    prompt = torch.tensor([[7, 8, 9, 10, 11]])
    hidden = runner.prefill_hidden(prompt, torch.tensor([5]), torch.tensor([0]))
    logits = model.logits(hidden)[0]
    exact = {i: float(p) for i, p in enumerate(torch.softmax(logits / temperature, -1))}
    rows = 20000
    params = [SamplingParams(temperature=temperature)] * rows
    batch = sampling_batch(params, seeds=list(range(1000, 1000 + rows)), steps=[0] * rows)
    result = runner.sample(hidden.expand(rows, -1), batch)
    ids = result.chunks
    assert ids.shape == (rows, 1) and not result.fell_back.any()
    threshold = tv_threshold(exact, rows)
    assert total_variation(empirical(ids[:, 0].tolist()), exact) < threshold
    if temperature < 1:
        plain = {i: float(p) for i, p in enumerate(torch.softmax(logits, -1))}
        assert total_variation(plain, exact) > 2 * threshold, "the test could not tell T from 1"


def test_continuous_batching_equals_running_alone():
    """30 requests of mixed lengths and temperatures join and leave a batch of 6 through the step API (with aborts);
    every completed request equals the same request run alone. float64, so that batch-size-dependent rounding
    cannot flip an argmax. num_samples and sampler vary too: a token model ignores them."""
    model = random_token_llama(seed=21).double()
    rng = random.Random(5)
    requests = {}
    for i in range(30):
        params = SamplingParams(
            temperature=rng.choice([1.0, 1.0, 0.5, 0.7]),
            max_tokens=rng.randint(1, 14),
            seed=rng.randint(0, 2**40),
            num_samples=rng.choice([6, 10]),
            sampler=rng.choice(["approximate", "exact"]),
            ignore_eos=rng.random() < 0.5,
        )
        prompt = [rng.randrange(3, model.config.vocab_size) for _ in range(rng.randint(1, 13))]
        requests[f"r{i}"] = (prompt, params)
    engine = LLMEngine(model, max_batch_size=6, max_model_len=32)
    finished, aborted = run_with_arrivals_and_aborts(engine, requests, rng, max_arrivals=4, abort_rate=0.1)
    assert len(aborted) >= 1
    assert_each_equals_running_alone(model, requests, finished, max_model_len=32)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_save_load_round_trip(tmp_path, tied):
    model = random_token_llama(seed=4, tie_word_embeddings=tied, attention_bias=True)
    save_token_llama(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    names = set(load_file(tmp_path / "model.safetensors"))
    assert {"model.embed_tokens.weight", "model.norm.weight", "model.layers.1.self_attn.q_proj.bias"} <= names
    assert ("lm_head.weight" in names) == (not tied)
    loaded = calm_engine.load(tmp_path)
    assert isinstance(loaded, TokenLlama) and loaded.config == model.config
    for (name, expected), (loaded_name, actual) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert name == loaded_name and torch.equal(actual, expected), name
    assert (loaded.lm_head.weight is loaded.backbone.embed_tokens.weight) == tied
    half = calm_engine.load(tmp_path, dtype="bfloat16")
    assert half.dtype == torch.bfloat16 and half.lm_head.weight.dtype == torch.bfloat16
    params = SamplingParams(max_tokens=6, seed=9, ignore_eos=True)
    from_path = LLM(str(tmp_path), max_batch_size=1, max_model_len=16).generate([[5, 6]], params)[0]
    assert from_path.token_ids == LLM(model, max_batch_size=1, max_model_len=16).generate([[5, 6]], params)[0].token_ids


def _rewrite(directory, change_weights=None, change_config=None):
    if change_weights:
        weights = load_file(directory / "model.safetensors")
        change_weights(weights)
        save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    if change_config:
        config = json.loads((directory / "config.json").read_text())
        change_config(config)
        (directory / "config.json").write_text(json.dumps(config))


def _drop(key):
    return lambda w: w.pop(key)


def _reshape(key):
    return lambda w: w.__setitem__(key, w[key][:-1])


def _add(key):
    return lambda w: w.__setitem__(key, torch.zeros(3))


@pytest.mark.parametrize(
    "change_weights, change_config, error, message",
    [
        (_drop("model.layers.1.mlp.up_proj.weight"), None, CheckpointError, r"missing tensor model\.layers\.1\.mlp"),
        (_reshape("model.norm.weight"), None, CheckpointError, r"shape mismatch for model\.norm\.weight"),
        (_drop("lm_head.weight"), None, CheckpointError, r"missing tensor lm_head\.weight"),
        (_add("model.extra.weight"), None, CheckpointError, r"unexpected tensor model\.extra\.weight"),
        (None, lambda c: c.update(tie_word_embeddings=True), CheckpointError, r"lm_head\.weight differs"),
        (None, lambda c: c.update(num_key_value_heads=3), ConfigError, "num_key_value_heads"),
        (None, lambda c: c.update(head_dim=16), ConfigError, "head_dim"),
        (None, lambda c: c.update(rope_scaling={"type": "dynamic", "factor": 2.0}), ConfigError, "dynamic"),
        (None, lambda c: c.update(sliding_window=4), ConfigError, "sliding_window"),
    ],
    ids=["missing", "shape", "lm-head", "unexpected", "tied-but-different", "kv-heads", "head-dim", "rope", "unknown"],
)
def test_load_errors_name_the_problem(tmp_path, change_weights, change_config, error, message):
    save_token_llama(random_token_llama(seed=5), tmp_path)
    _rewrite(tmp_path, change_weights, change_config)
    with pytest.raises(error, match=message):
        calm_engine.load(tmp_path)


def test_load_accepts_hugging_face_extras(tmp_path):
    """A config with the implied head_dim and null num_key_value_heads, and stale rotary buffers in the weights."""
    model = random_token_llama(seed=6, num_key_value_heads=4)
    save_token_llama(model, tmp_path)
    _rewrite(
        tmp_path,
        lambda w: w.__setitem__("model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(4)),
        lambda c: c.update(head_dim=8, num_key_value_heads=None, torch_dtype="float32"),
    )
    loaded = calm_engine.load(tmp_path)
    assert loaded.config == model.config and loaded.config.num_key_value_heads == 4
    with pytest.raises(CheckpointError, match="ae_path"):
        calm_engine.load(tmp_path, ae_path=tmp_path)


def test_config_properties_the_engine_reads():
    config = TokenLlamaConfig(vocab_size=50, hidden_size=48, num_attention_heads=6, max_position_embeddings=99)
    assert (config.patch_size, config.head_dim, config.max_chunks, config.num_key_value_heads) == (1, 8, 99, 6)
    assert config.rope_scaling is None and config.eos_token_ids == (2,)
    assert TokenLlamaConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="model_type"):
        TokenLlamaConfig.from_dict({**config.to_dict(), "model_type": "mistral"})


def test_llama3_rope_checkpoint_loads_and_generates_as_the_reference(tmp_path):
    """A Llama-3.1-style checkpoint (rope_type llama3) loads, its rotary angles are the formula's, and the engine
    generates what the reference loop does; the scaling changes the model (it is not silently ignored)."""
    model = random_token_llama(seed=9, **SHAPES["rope-llama3"])
    save_token_llama(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["rope_scaling"]["rope_type"] == "llama3"
    loaded = calm_engine.load(tmp_path)
    head_dim, theta = loaded.config.head_dim, loaded.config.rope_theta
    expected = llama3_inverse_frequencies_float64(head_dim, theta, SHAPES["rope-llama3"]["rope_scaling"])
    positions = torch.arange(60)[None]
    cos, _ = rotary_cos_sin(positions, head_dim, theta, loaded.config.rope_scaling, torch.float64)
    angles = positions[0, :, None].double() * expected
    assert_rel_close(cos[0, :, : head_dim // 2], angles.cos(), 1e-5, "cos")
    prompt = [5, 9, 13, 2, 40]
    params = SamplingParams(max_tokens=12, seed=4, ignore_eos=True)
    output = LLM(loaded, max_batch_size=2).generate([prompt], params)[0]
    assert output.token_ids == reference_generate(loaded, prompt, 4, 12)
    unscaled = random_token_llama(seed=9)
    ids = torch.randint(0, 97, (1, 60))
    assert not torch.allclose(unscaled.hidden_states(ids)[:, -1], loaded.hidden_states(ids)[:, -1], rtol=1e-3)
