"""Configs: the official config.json files parse, round-trip, and every bad value is an error naming its field."""

from __future__ import annotations

import json

import pytest

from calm_engine.model.config import AutoencoderConfig, CalmConfig, ConfigError, TokenLlamaConfig
from tests.conftest import shared_path


def official_calm_dict() -> dict:
    return json.loads(shared_path("conformance", "calm", "config.json").read_text())


def official_ae_dict() -> dict:
    return json.loads(shared_path("conformance", "autoencoder", "config.json").read_text())


def test_official_configs_parse_and_round_trip():
    calm = CalmConfig.from_file(shared_path("conformance", "calm"))
    ae = AutoencoderConfig.from_file(shared_path("conformance", "autoencoder", "config.json"))
    assert (calm.chunk_size, calm.hidden_size, calm.noise_size, calm.ae_path) == (4, 64, 16, "autoencoder")
    assert (ae.num_encoder_layers, ae.latent_size, ae.rms_norm_eps) == (2, 16, 1e-6)
    calm.check_autoencoder(ae)
    assert CalmConfig.from_dict(calm.to_dict()) == calm
    assert AutoencoderConfig.from_dict(ae.to_dict()) == ae
    # Every field the official files carry is read (none is silently dropped).
    for data, config in ((official_calm_dict(), calm), (official_ae_dict(), ae)):
        for key, value in data.items():
            if hasattr(config, key):
                assert getattr(config, key) == value, key


def test_missing_fields_take_the_official_defaults():
    config = CalmConfig.from_dict({"num_key_value_heads": None, "num_attention_heads": 12})
    assert config.num_key_value_heads == 12 and config.noise_size == 64 and config.num_mlp_layers == 4
    assert AutoencoderConfig.from_dict({}).latent_size == 128


def test_eos_list_is_accepted():
    config = CalmConfig.from_dict({**official_calm_dict(), "eos_token_id": [2, 5]})
    assert config.eos_token_ids == (2, 5)
    assert CalmConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_encoder_layers", 3, "must be even"),
        ("num_decoder_layers", -2, "integer >= 0"),
        ("latent_size", 0, "integer >= 1"),
        ("hidden_size", 64.0, "integer"),
        ("rms_norm_eps", 0, "positive"),
        ("hidden_act", "swish2", "must be one of"),
        ("mlp_bias", "no", "true or false"),
        ("pad_token_id", 512, "vocab_size=512"),
        ("architectures", ["EnergyTransformer"], "must contain 'Autoencoder'"),
    ],
)
def test_bad_autoencoder_field(field, value, message):
    with pytest.raises(ConfigError, match=f"'{field}'.*{message}"):
        AutoencoderConfig.from_dict({**official_ae_dict(), field: value}, source="ae.json")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("rope_scaling", {"type": "dynamic", "factor": 2.0}, "'dynamic' is not supported"),
        ("rope_scaling", {"type": "yarn", "factor": 2.0}, "must be 'linear'"),
        ("rope_scaling", {"type": "linear", "factor": 0.5}, "factor must be a number > 1"),
        ("rope_scaling", {"type": "linear", "factor": 2.0, "low": 1}, "unknown key"),
        ("rope_scaling", "linear", "must be null or an object"),
        ("num_attention_heads", 5, "must divide hidden_size=64"),
        ("num_attention_heads", 64, "even head size"),
        ("num_key_value_heads", 3, "must divide num_attention_heads=4"),
        ("rope_theta", -1.0, "positive"),
        ("num_hidden_layers", True, "integer"),
        ("eos_token_id", 100000, "vocab_size"),
        ("model_type", "flow", "only the energy generative head"),
        ("ae_path", 7, "string or null"),
    ],
)
def test_bad_calm_field(field, value, message):
    with pytest.raises(ConfigError, match=f"'{field}'.*{message}"):
        CalmConfig.from_dict({**official_calm_dict(), field: value}, source="calm.json")


def test_unknown_field_is_named():
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['num_hiden_layers'\]"):
        CalmConfig.from_dict({**official_calm_dict(), "num_hiden_layers": 4})
    # Hugging Face bookkeeping keys are not model fields and are ignored.
    CalmConfig.from_dict({**official_calm_dict(), "_name_or_path": "x", "torch_dtype": "bfloat16"})


def test_autoencoder_mismatch_is_named():
    calm = CalmConfig.from_dict(official_calm_dict())
    ae = AutoencoderConfig.from_dict({**official_ae_dict(), "latent_size": 32})
    with pytest.raises(ConfigError, match="'latent_size' is 16 but the autoencoder's is 32"):
        calm.check_autoencoder(ae)


def test_unreadable_config_files(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        CalmConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        CalmConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        CalmConfig.from_file(tmp_path)


LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def test_calm_configs_refuse_llama3_rope_scaling_as_the_official_config_does():
    with pytest.raises(ConfigError, match="'llama3' is supported for token-level Llama checkpoints only"):
        CalmConfig.from_dict({**official_calm_dict(), "rope_scaling": LLAMA3}, source="calm.json")


def test_token_configs_take_llama3_rope_scaling():
    data = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 100}
    config = TokenLlamaConfig.from_dict({**data, "rope_scaling": LLAMA3})
    assert config.rope_scaling == LLAMA3 and TokenLlamaConfig.from_dict(config.to_dict()) == config
    TokenLlamaConfig.from_dict({**data, "rope_scaling": {**LLAMA3, "type": "llama3"}})  # both spellings, as HF writes


@pytest.mark.parametrize(
    "change, message",
    [
        ({"factor": 0.5}, "factor must be a number >= 1"),
        ({"low_freq_factor": 4.0}, "0 < low < high"),
        ({"high_freq_factor": "4"}, "0 < low < high"),
        ({"high_freq_factor": None}, r"type 'llama3' needs the key\(s\) \['high_freq_factor'\]"),
        ({"original_max_position_embeddings": 8192.0}, "original_max_position_embeddings must be an integer"),
        ({"original_max_position_embeddings": None, "beta_fast": 32}, r"unknown key\(s\) \['beta_fast'\]"),
        ({"type": "linear"}, "'type' and 'rope_type' that differ"),
        ({"rope_type": "yarn"}, r"type must be 'linear' or 'llama3'"),
        ({"rope_type": "dynamic"}, "'dynamic' is not supported"),
    ],
)
def test_bad_llama3_rope_scaling_is_named(change, message):
    scaling = {k: v for k, v in {**LLAMA3, **change}.items() if v is not None}
    data = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 100}
    with pytest.raises(ConfigError, match=f"'rope_scaling'.*{message}"):
        TokenLlamaConfig.from_dict({**data, "rope_scaling": scaling}, source="llama.json")
