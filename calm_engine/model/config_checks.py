"""Checks of config.json values, each error naming the offending field (used by config.py's configs)."""

from __future__ import annotations

import math
from typing import Any


class ConfigError(ValueError):
    """A config.json value is missing, malformed or unsupported."""


def field_error(source: str, name: str, problem: str, value: Any) -> ConfigError:
    return ConfigError(f"{source}: field '{name}' {problem}, got {value!r}")


def check_int(source: str, name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise field_error(source, name, f"must be an integer >= {minimum}", value)


def check_positive_float(source: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise field_error(source, name, "must be a positive finite number", value)


def check_token_id(source: str, name: str, value: Any, vocab_size: int) -> None:
    if value is None:
        return
    ids = value if isinstance(value, (list, tuple)) else [value]
    for token_id in ids:
        if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < vocab_size:
            raise field_error(source, name, f"must be null or a token id in [0, vocab_size={vocab_size})", value)


def check_choice(source: str, name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise field_error(source, name, f"must be one of {list(choices)}", value)


def check_bool(source: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise field_error(source, name, "must be true or false", value)


# The keys of each supported rope_scaling type besides type / rope_type.
ROPE_SCALING_KEYS = {
    "linear": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
}


def check_rope_scaling(source: str, rope_scaling: Any, supported: tuple[str, ...]) -> None:
    """The scalings a KV-cached engine can reproduce, of the types this kind of config accepts.

    CALM configs take 'linear' only: the official CALMConfig (transformers 4.43) accepts 'linear' and 'dynamic' with
    exactly the keys {type, factor}, and 'dynamic' is refused here. Token-level Llama configs also take 'llama3'
    (Llama 3.1's frequency-dependent scaling, model/llama.py rope_inverse_frequencies)."""
    if rope_scaling is None:
        return
    if not isinstance(rope_scaling, dict):
        raise field_error(source, "rope_scaling", "must be null or an object {type, factor, ...}", rope_scaling)
    kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
    if kind == "dynamic":
        raise field_error(
            source,
            "rope_scaling",
            "type 'dynamic' is not supported (its frequencies depend on the longest sequence the process has seen, "
            f"which a cached multi-request engine cannot reproduce); supported: null or type {' or '.join(supported)}",
            rope_scaling,
        )
    if kind == "llama3" and kind not in supported:
        raise field_error(
            source,
            "rope_scaling",
            "type 'llama3' is supported for token-level Llama checkpoints only (the official CALMConfig accepts "
            "'linear' alone of the types an engine can reproduce); supported here: 'linear'",
            rope_scaling,
        )
    if kind not in supported:
        names = " or ".join(repr(t) for t in supported)
        raise field_error(source, "rope_scaling", f"type must be {names} (the scalings implemented)", rope_scaling)
    if "type" in rope_scaling and "rope_type" in rope_scaling and rope_scaling["type"] != rope_scaling["rope_type"]:
        raise field_error(source, "rope_scaling", "has 'type' and 'rope_type' that differ", rope_scaling)
    keys = set(rope_scaling) - {"type", "rope_type"}
    extra, missing = keys - ROPE_SCALING_KEYS[kind], ROPE_SCALING_KEYS[kind] - keys
    if extra:
        raise field_error(source, "rope_scaling", f"has unknown key(s) {sorted(extra)} for type {kind!r}", rope_scaling)
    if missing:
        raise field_error(source, "rope_scaling", f"type {kind!r} needs the key(s) {sorted(missing)}", rope_scaling)

    def number(name: str) -> float | None:
        value = rope_scaling[name]
        return None if isinstance(value, bool) or not isinstance(value, (int, float)) else value

    factor = number("factor")
    if kind == "linear":
        if factor is None or not factor > 1.0:
            raise field_error(source, "rope_scaling", "factor must be a number > 1", rope_scaling)
        return
    if factor is None or not math.isfinite(factor) or factor < 1.0:
        raise field_error(source, "rope_scaling", "factor must be a number >= 1", rope_scaling)
    low, high = number("low_freq_factor"), number("high_freq_factor")
    if low is None or high is None or not (0 < low < high and math.isfinite(high)):
        raise field_error(
            source,
            "rope_scaling",
            "low_freq_factor and high_freq_factor must be numbers with 0 < low < high",
            rope_scaling,
        )
    original = rope_scaling["original_max_position_embeddings"]
    if isinstance(original, bool) or not isinstance(original, int) or original < 1:
        raise field_error(
            source, "rope_scaling", "original_max_position_embeddings must be an integer >= 1", rope_scaling
        )
