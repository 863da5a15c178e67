"""Checkpoint loading and saving in the official layout, and every way a checkpoint can be wrong."""

from __future__ import annotations

import json
import pickle
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import calm_engine
from calm_engine.model.checkpoint import DEFAULT_CALM, CheckpointError, read_weights, save_autoencoder, save_calm
from calm_engine.model.token_llama import save_token_llama
from tests.conftest import assert_rel_close, shared_path
from tests.model_factory import random_calm_model, random_token_llama


def same_outputs(a, b, rel: float = 1e-6) -> None:
    """Two models compute the same function on fresh random inputs."""
    config = a.config
    ids = torch.randint(0, config.vocab_size, (2, 3 * config.chunk_size))
    assert_rel_close(a.hidden_states(ids), b.hidden_states(ids), rel, "hidden")
    hidden = torch.randn(5, config.hidden_size)
    noise = torch.rand(5, config.noise_size) - 0.5
    assert_rel_close(a.sample_latent(hidden, noise), b.sample_latent(hidden, noise), rel, "latent")
    mean_a, _ = a.autoencoder.encode(ids)
    mean_b, _ = b.autoencoder.encode(ids)
    assert_rel_close(mean_a, mean_b, rel, "mean")
    assert_rel_close(a.autoencoder.decode(mean_a), b.autoencoder.decode(mean_a), rel, "logits")


@pytest.fixture
def saved(tmp_path):
    """A random GQA model with K=2 saved as an official pickled checkpoint (autoencoder embedded)."""
    model = random_calm_model(seed=3, patch_size=2, calm={"num_key_value_heads": 1, "rope_theta": 5e5})
    save_calm(model, tmp_path / "calm", safetensors=False, ae_path="autoencoder")
    return model, tmp_path / "calm"


@pytest.mark.parametrize("safetensors", [False, True])
def test_save_load_round_trip(tmp_path, safetensors):
    model = random_calm_model(seed=1, calm={"attention_bias": True, "mlp_bias": True}, ae={"mlp_bias": True})
    save_calm(model, tmp_path, safetensors=safetensors)
    loaded = calm_engine.load(tmp_path)
    same_outputs(model, loaded, rel=0)
    assert loaded.autoencoder.weights_tied
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training


def test_official_key_layout(saved):
    """What save_calm writes is what the official save_pretrained writes (the fixture's key list)."""
    _, path = saved
    keys = set(read_weights(path))
    assert {"ae_model.decoder.lm_head_weight", "ae_model.encoder.embed_tokens.weight"} <= keys
    assert any(k.startswith("transformer.layers.0.self_attn.q_proj") for k in keys)
    heads = {k.removeprefix("mlp_generator.") for k in keys if k.startswith("mlp_generator.")}
    assert heads and heads == {k.removeprefix("generative_head.") for k in keys if k.startswith("generative_head.")}
    assert {"embed_proj.0.weight", "embed_proj.2.weight", "embed_proj.3.weight"} <= keys
    official = json.loads(shared_path("conformance", "cases.json").read_text())["meta"]["checkpoint_layout"]
    fixture_keys = {k for k, _, _ in official["calm/pytorch_model.bin"]["keys"]}
    strip_layers = lambda ks: {".".join(p for p in k.split(".") if not p.isdigit()) for k in ks}  # noqa: E731
    assert strip_layers(keys) == strip_layers(fixture_keys)


def test_safetensors_carry_the_metadata_transformers_requires(tmp_path):
    save_calm(random_calm_model(seed=2), tmp_path)
    for path in (tmp_path / "model.safetensors", tmp_path / "autoencoder" / "model.safetensors"):
        with safe_open(path, "pt") as file:
            assert file.metadata() == {"format": "pt"}


def test_pickle_shares_storage_like_the_official_files(saved):
    _, path = saved
    weights = torch.load(path / "pytorch_model.bin", weights_only=True)
    assert (
        weights["ae_model.decoder.lm_head_weight"].data_ptr()
        == weights["ae_model.encoder.embed_tokens.weight"].data_ptr()
    )
    assert (
        weights["mlp_generator.noise_embd.weight"].data_ptr() == weights["generative_head.noise_embd.weight"].data_ptr()
    )


@pytest.mark.parametrize("safetensors", [True, False])
def test_sharded_checkpoint(tmp_path, saved, safetensors):
    model, path = saved
    weights = read_weights(path)
    keys = sorted(weights)
    suffix = "safetensors" if safetensors else "bin"
    shards = {f"model-00001-of-00002.{suffix}": keys[::2], f"model-00002-of-00002.{suffix}": keys[1::2]}
    out = tmp_path / "sharded"
    shutil.copytree(path, out, ignore=shutil.ignore_patterns("pytorch_model.bin"))
    for name, shard_keys in shards.items():
        shard = {k: weights[k].clone() for k in shard_keys}
        if safetensors:
            save_file(shard, out / name)
        else:
            torch.save(shard, out / name)
    weight_map = {k: name for name, ks in shards.items() for k in ks}
    index = "model.safetensors.index.json" if safetensors else "pytorch_model.bin.index.json"
    (out / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    same_outputs(model, calm_engine.load(out), rel=0)
    (out / f"model-00002-of-00002.{suffix}").unlink()
    with pytest.raises(CheckpointError, match=f"lists shard model-00002-of-00002.{suffix}, which is missing"):
        calm_engine.load(out)


def edit_safetensors(src, dst, edit):
    """Copy a checkpoint dir as safetensors, with `edit(weights)` applied."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("pytorch_model.bin", "model.safetensors"))
    weights = {k: v.clone() for k, v in read_weights(src).items()}
    edit(weights)
    save_file(weights, dst / "model.safetensors")
    return dst


def test_missing_unexpected_and_misshapen_tensors_in_one_error(tmp_path, saved):
    _, path = saved

    def damage(weights):
        del weights["transformer.layers.1.mlp.up_proj.weight"]
        del weights["ae_model.decoder.norm.weight"]
        weights["transformer.layers.0.extra.weight"] = torch.zeros(3)
        weights["embed_proj.0.weight"] = torch.zeros(5, 5)

    broken = edit_safetensors(path, tmp_path / "broken", damage)
    with pytest.raises(CheckpointError) as error:
        calm_engine.load(broken)
    message = str(error.value)
    assert "missing tensor transformer.layers.1.mlp.up_proj.weight" in message
    assert "missing tensor ae_model.decoder.norm.weight" in message
    assert "unexpected tensor transformer.layers.0.extra.weight" in message
    assert "shape mismatch for embed_proj.0.weight: checkpoint [5, 5]" in message


def test_differing_generator_copies(tmp_path, saved):
    _, path = saved

    def damage(weights):
        weights["generative_head.final_layer.linears.2.bias"] += 1

    with pytest.raises(CheckpointError, match=r"generator twice .*final_layer.linears.2.bias"):
        calm_engine.load(edit_safetensors(path, tmp_path / "broken", damage))


def test_untied_output_projection_is_kept(tmp_path, saved):
    model, path = saved

    def untie(weights):
        weights["ae_model.decoder.lm_head_weight"] = weights["ae_model.decoder.lm_head_weight"] * 2

    loaded = calm_engine.load(edit_safetensors(path, tmp_path / "untied", untie))
    assert not loaded.autoencoder.weights_tied
    latents = torch.randn(1, 2, model.config.latent_size)
    assert_rel_close(loaded.autoencoder.decode(latents), 2 * model.autoencoder.decode(latents), 1e-6)


@pytest.mark.parametrize("weights_file", ["pytorch_model.bin", "model.safetensors"])
def test_truncated_file(tmp_path, weights_file):
    src = shared_path("conformance", "calm" if weights_file.endswith("bin") else "calm_safetensors")
    dst = tmp_path / "calm"
    shutil.copytree(src, dst)
    data = (dst / weights_file).read_bytes()
    (dst / weights_file).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        calm_engine.load(dst, ae_path=shared_path("conformance", "autoencoder"))


def test_corrupt_header(tmp_path):
    dst = tmp_path / "calm"
    shutil.copytree(shared_path("conformance", "calm_safetensors"), dst)
    data = bytearray((dst / "model.safetensors").read_bytes())
    data[8:16] = b"\xff" * 8
    (dst / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        calm_engine.load(dst)


class _Payload:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_pickle_with_code_is_refused_and_not_run(tmp_path, monkeypatch, saved):
    _, path = saved
    monkeypatch.chdir(tmp_path)
    dst = tmp_path / "evil"
    shutil.copytree(path, dst)
    weights = torch.load(dst / "pytorch_model.bin", weights_only=True)
    weights["payload"] = _Payload()
    with open(dst / "pytorch_model.bin", "wb") as file:
        torch.save(weights, file, pickle_module=pickle)
    with pytest.raises(CheckpointError, match=r"weights_only=True"):
        calm_engine.load(dst)
    assert not (tmp_path / "PWNED").exists()


def test_no_weights_and_no_directory(tmp_path):
    with pytest.raises(CheckpointError, match="directory not found"):
        calm_engine.load(tmp_path / "nowhere")
    shutil.copy(shared_path("conformance", "calm", "config.json"), tmp_path)
    with pytest.raises(CheckpointError, match="no weights in"):
        calm_engine.load(tmp_path)


def test_bad_config_field_fails_the_load(tmp_path, saved):
    _, path = saved
    dst = tmp_path / "bad"
    shutil.copytree(path, dst)
    config = json.loads((dst / "config.json").read_text())
    config["num_key_value_heads"] = 3
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'num_key_value_heads'"):
        calm_engine.load(dst)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, "bf16"])
def test_dtypes(saved, dtype):
    model, path = saved
    loaded = calm_engine.load(path, dtype=dtype)
    expected = torch.bfloat16 if dtype == "bf16" else dtype
    assert {p.dtype for p in loaded.parameters()} == {expected}
    ids = torch.randint(0, model.config.vocab_size, (2, 4 * model.config.chunk_size))
    # Half precision through a few layers: a few percent of the largest value.
    assert_rel_close(loaded.hidden_states(ids).float(), model.hidden_states(ids), 5e-2, "hidden")


def test_bad_dtype(saved):
    with pytest.raises(ValueError, match="dtype must be"):
        calm_engine.load(saved[1], dtype=torch.int8)
    with pytest.raises(ValueError, match="dtype must be one of"):
        calm_engine.load(saved[1], dtype="float64")


def test_autoencoder_from_ae_path_when_not_embedded(tmp_path):
    model = random_calm_model(seed=5)
    save_autoencoder(model.autoencoder, tmp_path / "ae", safetensors=False)
    save_calm(model, tmp_path / "calm", safetensors=True, ae_path="ae", write_autoencoder=False)
    weights = {k: v for k, v in read_weights(tmp_path / "calm").items() if not k.startswith("ae_model.")}
    save_file(weights, tmp_path / "calm" / "model.safetensors")
    same_outputs(model, calm_engine.load(tmp_path / "calm"), rel=0)  # relative ae_path, beside the checkpoint
    (tmp_path / "ae").rename(tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match=r"no autoencoder weights .* 'ae' was not found .*pass ae_path="):
        calm_engine.load(tmp_path / "calm")
    same_outputs(model, calm_engine.load(tmp_path / "calm", ae_path=tmp_path / "elsewhere"), rel=0)


def test_embedded_autoencoder_with_a_useless_ae_path(tmp_path):
    """Released configs point ae_path at the authors' server: the embedded weights must suffice."""
    model = random_calm_model(seed=6, ae={"num_encoder_layers": 4, "mlp_bias": True})
    save_calm(model, tmp_path / "calm", safetensors=True, ae_path="/mnt/authors/server/autoencoder")
    with pytest.warns(UserWarning, match="read off the ae_model"):
        loaded = calm_engine.load(tmp_path / "calm")
    assert loaded.autoencoder.config.num_encoder_layers == 4 and loaded.autoencoder.config.mlp_bias
    same_outputs(model, loaded, rel=0)


def test_explicit_ae_path_with_embedded_weights_supplies_the_config(tmp_path):
    model = random_calm_model(seed=7, ae={"rms_norm_eps": 1e-2})
    save_autoencoder(model.autoencoder, tmp_path / "ae")
    save_calm(model, tmp_path / "calm", ae_path="/nowhere")
    with pytest.warns(UserWarning, match="used for the autoencoder config only"):
        loaded = calm_engine.load(tmp_path / "calm", ae_path=tmp_path / "ae")
    assert loaded.autoencoder.config.rms_norm_eps == 1e-2
    same_outputs(model, loaded, rel=0)
    with pytest.raises(CheckpointError, match="not an autoencoder checkpoint directory"):
        calm_engine.load(tmp_path / "calm", ae_path=tmp_path / "nothing")


def test_autoencoder_checkpoint_round_trip(tmp_path):
    model = random_calm_model(seed=8)
    save_autoencoder(model.autoencoder, tmp_path, safetensors=True)
    assert "decoder.lm_head_weight" in load_file(tmp_path / "model.safetensors")
    loaded = calm_engine.load_autoencoder(tmp_path)
    ids = torch.randint(0, model.config.vocab_size, (3, 2 * model.config.chunk_size))
    assert torch.equal(loaded.encode(ids)[0], model.autoencoder.encode(ids)[0])
    assert loaded.weights_tied


def test_autoencoder_that_does_not_fit_the_model(tmp_path):
    model = random_calm_model(seed=9)
    other = random_calm_model(seed=9, latent_size=model.config.latent_size + 2)
    save_autoencoder(other.autoencoder, tmp_path / "ae")
    save_calm(model, tmp_path / "calm", ae_path="ae", write_autoencoder=False)
    weights = {k: v for k, v in read_weights(tmp_path / "calm").items() if not k.startswith("ae_model.")}
    save_file(weights, tmp_path / "calm" / "model.safetensors")
    with pytest.raises(ValueError, match="'latent_size' is 8 but the autoencoder's is 10"):
        calm_engine.load(tmp_path / "calm", ae_path=tmp_path / "ae")


@pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "pickle"])
def test_nan_and_inf_weights_are_refused_by_name(tmp_path, saved, safetensors):
    """Non-finite weights would generate an empty continuation with no error: the load names every such tensor."""
    model, path = saved
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    weights = {k: v.clone() for k, v in read_weights(path).items()}
    weights["transformer.layers.0.self_attn.q_proj.weight"][1, :2] = float("nan")
    weights["ae_model.decoder.norm.weight"][0] = float("-inf")
    (broken / "pytorch_model.bin").unlink()
    if safetensors:
        save_file(weights, broken / "model.safetensors")
    else:
        torch.save(weights, broken / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as error:
        calm_engine.load(broken)
    message = str(error.value)
    assert "2 problems with the weights" in message
    assert "tensor transformer.layers.0.self_attn.q_proj.weight holds 2 NaN and 0 infinite values" in message
    assert "tensor ae_model.decoder.norm.weight holds 0 NaN and 1 infinite values" in message


def test_non_finite_standalone_autoencoder_and_token_llama(tmp_path):
    autoencoder = random_calm_model(seed=5).autoencoder
    autoencoder.encoder.hidden_to_latent.bias.data[3] = float("inf")
    save_autoencoder(autoencoder, tmp_path / "ae")
    with pytest.raises(CheckpointError, match=r"ae: tensor encoder\.hidden_to_latent\.bias holds 0 NaN and 1 inf"):
        calm_engine.load_autoencoder(tmp_path / "ae")
    llama = random_token_llama(seed=5)
    llama.lm_head.weight.data[0, 0] = float("nan")
    save_token_llama(llama, tmp_path / "llama")
    with pytest.raises(CheckpointError, match=r"llama: tensor lm_head\.weight holds 1 NaN"):
        calm_engine.load(tmp_path / "llama")


def test_load_autoencoder_reads_the_one_a_calm_checkpoint_embeds(tmp_path, saved):
    model, path = saved
    ids = torch.randint(0, model.config.vocab_size, (2, 3 * model.config.chunk_size))
    embedded = calm_engine.load_autoencoder(path)
    assert torch.equal(embedded.encode(ids)[0], model.autoencoder.encode(ids)[0])
    default = calm_engine.load_autoencoder()  # the default model's, from its ae_model.* weights
    default_model = calm_engine.load()
    ids = torch.randint(0, default.config.vocab_size, (1, 8))
    assert torch.equal(default.encode(ids)[0], default_model.autoencoder.encode(ids)[0])
    with pytest.raises(CheckpointError, match=rf"no weights: .* \(here probably {re.escape(str(DEFAULT_CALM))}\)"):
        calm_engine.load_autoencoder(DEFAULT_CALM / "autoencoder")
    save_token_llama(random_token_llama(seed=1), tmp_path / "llama")
    with pytest.raises(CheckpointError, match="token-level Llama checkpoint: it has no autoencoder"):
        calm_engine.load_autoencoder(tmp_path / "llama")


def test_an_autoencoder_is_not_a_language_model(tmp_path):
    save_autoencoder(random_calm_model(seed=2).autoencoder, tmp_path)
    with pytest.raises(CheckpointError, match="is an autoencoder checkpoint .* not a language model"):
        calm_engine.load(tmp_path)


@pytest.mark.parametrize(
    "device, message",
    [
        ("banana", r"device must be 'cpu' or 'cuda' \(optionally 'cuda:N'\), got 'banana'"),
        ("meta", r"got 'meta'"),
        ("cuda:99", r"'cuda:99'" + ("" if torch.cuda.is_available() else r" asks for CUDA, but this torch")),
    ],
)
def test_bad_devices_are_named(saved, device, message):
    _, path = saved
    with pytest.raises(ValueError, match=message):
        calm_engine.load(path, device=device)
