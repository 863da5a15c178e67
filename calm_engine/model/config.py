"""Typed configs for the CALM model and its autoencoder, read from the official `config.json` files, and for the
token-level Llama baseline, read from a Hugging Face `LlamaForCausalLM` config.json.

Field names and defaults follow the official `CALMConfig` / `AutoencoderConfig` and transformers' `LlamaConfig`, so a
config.json that omits a field means what it means to the reference. Every value is validated here; errors name the
offending field.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from calm_engine.model.config_checks import (
    ConfigError,
    check_bool,
    check_choice,
    check_int,
    check_positive_float,
    check_rope_scaling,
    check_token_id,
    field_error,
)

ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "relu")

# Bookkeeping keys the Hugging Face config writer may put into any config.json; they carry nothing the model needs.
HF_BOOKKEEPING_KEYS = frozenset(
    """_name_or_path _commit_hash _attn_implementation _attn_implementation_internal transformers_version
    torch_dtype use_bfloat16 return_dict output_hidden_states output_attentions torchscript tf_legacy_loss
    pruned_heads chunk_size_feed_forward is_encoder_decoder is_decoder cross_attention_hidden_size
    add_cross_attention tie_encoder_decoder finetuning_task id2label label2id num_labels tokenizer_class prefix
    sep_token_id decoder_start_token_id task_specific_params problem_type auto_map max_length min_length do_sample
    early_stopping num_beams num_beam_groups diversity_penalty temperature top_k top_p typical_p
    repetition_penalty length_penalty no_repeat_ngram_size encoder_no_repeat_ngram_size bad_words_ids
    num_return_sequences output_scores return_dict_in_generate forced_bos_token_id forced_eos_token_id
    remove_invalid_values exponential_decay_length_penalty suppress_tokens begin_suppress_tokens""".split()
)


class _JsonConfig:
    """Reading, writing and key checking shared by both configs."""

    ARCHITECTURE: str = ""

    @classmethod
    def from_dict(cls, data: dict, source: str = "config"):
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names - HF_BOOKKEEPING_KEYS - {"architectures", "model_type"})
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {unknown}; this engine does not know what they change")
        architectures = data.get("architectures")
        if architectures is not None and cls.ARCHITECTURE not in architectures:
            raise ConfigError(
                f"{source}: field 'architectures' must contain {cls.ARCHITECTURE!r}, got {architectures!r}"
            )
        values = {k: v for k, v in data.items() if k in names}
        if isinstance(values.get("eos_token_id"), list):
            values["eos_token_id"] = tuple(values["eos_token_id"])
        config = cls(**values)
        config.validate(source)
        return config

    @classmethod
    def from_file(cls, path: str | Path):
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json at {path}")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"{path}: not valid JSON ({error})") from None
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        if isinstance(data.get("eos_token_id"), tuple):
            data["eos_token_id"] = list(data["eos_token_id"])
        data["architectures"] = [self.ARCHITECTURE]
        return data

    def save(self, directory: str | Path) -> None:
        Path(directory, "config.json").write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def validate(self, source: str) -> None:
        raise NotImplementedError

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self.eos_token_id
        return () if eos is None else tuple(eos) if isinstance(eos, tuple) else (eos,)


@dataclass(frozen=True)
class AutoencoderConfig(_JsonConfig):
    """The chunk autoencoder: K tokens <-> one latent vector of size `latent_size`."""

    ARCHITECTURE = "Autoencoder"

    vocab_size: int = 32000
    patch_size: int = 4
    latent_size: int = 128
    hidden_size: int = 512
    intermediate_size: int = 1280
    num_encoder_layers: int = 2
    num_decoder_layers: int = 2
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    mlp_bias: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    # Used only by training or by nothing at all; kept so that a config round-trips unchanged.
    ae_dropout: float = 0.15
    kl_clamp: float = 0.5
    kl_weight: float = 1e-3
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    pretraining_tp: int = 1
    tie_word_embeddings: bool = False

    @property
    def chunk_size(self) -> int:
        """K, the tokens of one chunk (the file format's `patch_size`)."""
        return self.patch_size

    def validate(self, source: str = "autoencoder config") -> None:
        for name in ("vocab_size", "patch_size", "latent_size", "hidden_size", "intermediate_size"):
            check_int(source, name, getattr(self, name), 1)
        for name in ("num_encoder_layers", "num_decoder_layers"):
            value = getattr(self, name)
            check_int(source, name, value, 0)
            if value % 2:
                raise field_error(
                    source, name, "must be even (the layers are split into two equal stages around the squeeze)", value
                )
        check_choice(source, "hidden_act", self.hidden_act, ACTIVATIONS)
        check_positive_float(source, "rms_norm_eps", self.rms_norm_eps)
        check_bool(source, "mlp_bias", self.mlp_bias)
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            check_token_id(source, name, getattr(self, name), self.vocab_size)


class _BackboneConfig(_JsonConfig):
    """What the Llama backbone and the engine read off a config, shared by CalmConfig and TokenLlamaConfig."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_chunks(self) -> int:
        """The longest context in chunks (positions count chunks, not tokens; a token model's chunk is one token)."""
        return self.max_position_embeddings

    # rope_scaling types this config accepts (see check_rope_scaling).
    ROPE_TYPES: tuple[str, ...] = ("linear",)

    def _validate_backbone(self, source: str) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        ):
            check_int(source, name, getattr(self, name), 1)
        if self.hidden_size % self.num_attention_heads:
            raise field_error(
                source, "num_attention_heads", f"must divide hidden_size={self.hidden_size}", self.num_attention_heads
            )
        if self.head_dim % 2:
            raise field_error(
                source,
                "num_attention_heads",
                f"must give an even head size for rotary embeddings "
                f"(hidden_size={self.hidden_size} / heads = {self.hidden_size / self.num_attention_heads})",
                self.num_attention_heads,
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise field_error(
                source,
                "num_key_value_heads",
                f"must divide num_attention_heads={self.num_attention_heads}",
                self.num_key_value_heads,
            )
        check_choice(source, "hidden_act", self.hidden_act, ACTIVATIONS)
        check_positive_float(source, "rms_norm_eps", self.rms_norm_eps)
        check_positive_float(source, "rope_theta", self.rope_theta)
        check_rope_scaling(source, self.rope_scaling, self.ROPE_TYPES)
        check_bool(source, "attention_bias", self.attention_bias)
        check_bool(source, "mlp_bias", self.mlp_bias)
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            check_token_id(source, name, getattr(self, name), self.vocab_size)


@dataclass(frozen=True)
class CalmConfig(_BackboneConfig):
    """The CALM language model: Llama backbone over chunks, input compression, energy generative head."""

    ARCHITECTURE = "EnergyTransformer"

    ae_path: str | None = None
    patch_size: int = 4
    latent_size: int = 128
    noise_size: int = 64
    num_mlp_layers: int = 4
    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_key_value_heads: int | None = 12
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    # Used only by training or by nothing at all at inference; kept so that a config round-trips unchanged.
    num_samples: int = 8
    beta: float = 1.0
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    pretraining_tp: int = 1
    use_cache: bool = True
    tie_word_embeddings: bool = False

    @property
    def chunk_size(self) -> int:
        """K, the tokens of one chunk (the file format's `patch_size`)."""
        return self.patch_size

    @classmethod
    def from_dict(cls, data: dict, source: str = "config"):
        model_type = data.get("model_type", "energy") if isinstance(data, dict) else "energy"
        if model_type != "energy":
            raise ConfigError(
                f"{source}: field 'model_type' must be 'energy' (only the energy generative head is supported), "
                f"got {model_type!r}"
            )
        if isinstance(data, dict) and data.get("num_key_value_heads", 0) is None:
            data = {**data, "num_key_value_heads": data.get("num_attention_heads", 12)}
        return super().from_dict(data, source)

    def validate(self, source: str = "CALM config") -> None:
        for name in ("patch_size", "latent_size", "noise_size"):
            check_int(source, name, getattr(self, name), 1)
        check_int(source, "num_mlp_layers", self.num_mlp_layers, 0)
        self._validate_backbone(source)
        if self.ae_path is not None and not isinstance(self.ae_path, str):
            raise field_error(source, "ae_path", "must be a string or null", self.ae_path)

    def check_autoencoder(self, ae: AutoencoderConfig, source: str = "CALM config") -> None:
        """The CALM model and its autoencoder must agree on the shared sizes."""
        for name in ("vocab_size", "patch_size", "latent_size"):
            if getattr(self, name) != getattr(ae, name):
                raise ConfigError(
                    f"{source}: field '{name}' is {getattr(self, name)} but the autoencoder's is {getattr(ae, name)}"
                )


@dataclass(frozen=True)
class TokenLlamaConfig(_BackboneConfig):
    """The token-level baseline: a Llama backbone plus an LM head, one token per position (K = 1).

    The fields of transformers' `LlamaConfig` with its defaults (num_key_value_heads null means one per attention
    head). The engine reads `chunk_size`, which is 1 here.
    """

    ARCHITECTURE = "LlamaForCausalLM"
    MODEL_TYPE = "llama"
    ROPE_TYPES = ("linear", "llama3")

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    # Used only by training or by nothing at all at inference; kept so that a config round-trips unchanged.
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    pretraining_tp: int = 1
    use_cache: bool = True

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)

    @property
    def chunk_size(self) -> int:
        return 1

    @classmethod
    def from_dict(cls, data: dict, source: str = "config"):
        if isinstance(data, dict):
            model_type = data.get("model_type", cls.MODEL_TYPE)
            if model_type != cls.MODEL_TYPE:
                raise ConfigError(f"{source}: field 'model_type' must be {cls.MODEL_TYPE!r}, got {model_type!r}")
            if "head_dim" in data:  # newer transformers write it; only the implied value is supported
                data = dict(data)
                head_dim = data.pop("head_dim")
                heads = data.get("num_attention_heads", cls.num_attention_heads)
                hidden = data.get("hidden_size", cls.hidden_size)
                if isinstance(heads, int) and isinstance(hidden, int) and heads > 0 and head_dim != hidden // heads:
                    raise field_error(source, "head_dim", "must be hidden_size / num_attention_heads", head_dim)
        return super().from_dict(data, source)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "model_type": self.MODEL_TYPE}

    def validate(self, source: str = "token Llama config") -> None:
        self._validate_backbone(source)
        check_bool(source, "tie_word_embeddings", self.tie_word_embeddings)
