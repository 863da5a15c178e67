"""Reading and writing checkpoints in the official layout.

A CALM checkpoint directory holds `config.json` and its weights as `model.safetensors`, `pytorch_model.bin`, or
shards listed by `model.safetensors.index.json` / `pytorch_model.bin.index.json`. The official state dict names
the backbone `transformer.*`, the energy head `mlp_generator.*` (and again, sharing storage, `generative_head.*`),
the input compression `embed_proj.*`, and carries the autoencoder as `ae_model.*`, whose
`decoder.lm_head_weight` is tied to `encoder.embed_tokens.weight`. Pickled files are read with
`torch.load(weights_only=True)` only.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from pathlib import Path

import torch

from calm_engine.model.autoencoder import Autoencoder
from calm_engine.model.calm import CalmModel
from calm_engine.model.config import AutoencoderConfig, CalmConfig
from calm_engine.model.token_llama import TokenLlama, is_token_llama_checkpoint, load_token_llama
from calm_engine.model.weight_files import (
    CheckpointError,
    cast_weights,
    check_weights,
    existing_dir,
    has_weights,
    raise_problems,
    read_weights,
    resolve_device,
    resolve_dtype,
    tokenizer_for,
    write_weights,
)

LM_HEAD_KEY = "decoder.lm_head_weight"
EMBEDDING_KEY = "encoder.embed_tokens.weight"
# Official state-dict prefix -> ours. Both generator prefixes name the same module.
OFFICIAL_PREFIXES = {"transformer.": "backbone.", "mlp_generator.": "generative_head."}
DUPLICATE_HEAD_PREFIX = "generative_head."
AE_PREFIX = "ae_model."
# The small CALM model trained by this project and shipped as package data (see its MODEL_CARD.md): what `load()`
# returns when no path is given, so that the engine works offline.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "default_model"
DEFAULT_CALM = DEFAULT_MODEL_DIR / "calm"
DEFAULT_TOKEN_BASELINE = DEFAULT_MODEL_DIR / "token_baseline"


# ---------------------------------------------------------------------------------------------------------------
# Public entry points


def load(
    path: str | Path | None = None,
    *,
    ae_path: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    tokenizer: str | Path | None = None,
) -> CalmModel | TokenLlama:
    """Load an official-layout CALM checkpoint directory as an inference-ready CalmModel (eval, no grads), or a
    Hugging Face `LlamaForCausalLM` one (the token-level baseline) as a TokenLlama (model/token_llama.py).

    The autoencoder comes from the checkpoint's own `ae_model.*` weights when present, else from `ae_path`, else
    from the config's `ae_path` (tried relative to the checkpoint's parent, the checkpoint, the working directory).
    Its config comes from `ae_path` or the config's `ae_path` when either holds a config.json, else it is read off
    the weight shapes. The tokenizer comes from `tokenizer` (a directory) or the checkpoint directory, if any.
    Without a path it loads the shipped default model (DEFAULT_CALM).
    """
    if path is None:
        path = default_model_path()
    directory = existing_dir(path, "checkpoint")
    dtype, device = resolve_dtype(dtype), resolve_device(device)

    if is_autoencoder_checkpoint(directory):
        raise CheckpointError(
            f"{directory} is an autoencoder checkpoint (its config.json names the architecture 'Autoencoder'), not a "
            "language model: calm_engine.load_autoencoder reads it; to generate, give the CALM checkpoint that uses it"
        )
    if is_token_llama_checkpoint(directory):
        if ae_path is not None:
            raise CheckpointError(f"{directory} is a token-level Llama checkpoint; ae_path is for CALM checkpoints")
        return load_token_llama(directory, device=device, dtype=dtype, tokenizer=tokenizer)
    config = CalmConfig.from_file(directory)
    weights = read_weights(directory)
    calm_weights = _from_official_names({k: v for k, v in weights.items() if not k.startswith(AE_PREFIX)})
    ae_config, ae_weights, ae_label = _autoencoder_parts(directory, config, weights, ae_path)

    with torch.device("meta"):
        model = CalmModel(config, ae_config)
    problems = check_weights(model.state_dict(), calm_weights, skip_prefix="autoencoder.", name=_official_name)
    problems += check_weights(model.autoencoder.state_dict(), ae_weights, optional={LM_HEAD_KEY}, label=ae_label)
    raise_problems(directory, problems)
    model.load_state_dict(cast_weights(calm_weights, dtype, device), strict=False, assign=True)
    _assign_autoencoder(model.autoencoder, ae_weights, dtype, device)
    assert not any(t.is_meta for t in model.state_dict().values()), "a parameter was left unloaded"
    model.tokenizer = tokenizer_for(directory, tokenizer, config.pad_token_id)
    return model.eval().requires_grad_(False)


def _autoencoder_parts(
    directory: Path, config: CalmConfig, weights: dict[str, torch.Tensor], ae_path: str | Path | None
) -> tuple[AutoencoderConfig, dict[str, torch.Tensor], str]:
    """A CALM checkpoint's autoencoder: (config, weights by autoencoder names, the label its errors carry)."""
    ae_weights = {k[len(AE_PREFIX) :]: v for k, v in weights.items() if k.startswith(AE_PREFIX)}
    ae_dir = _find_autoencoder_dir(directory, config, ae_path)
    if ae_weights:
        if ae_path is not None:
            warnings.warn(
                f"{directory} carries its own autoencoder weights (ae_model.*); ae_path={str(ae_path)!r} is used "
                "for the autoencoder config only",
                stacklevel=3,
            )
        ae_config = AutoencoderConfig.from_file(ae_dir) if ae_dir else _infer_autoencoder_config(ae_weights, config)
        ae_label = AE_PREFIX
    elif ae_dir is not None:
        ae_config = AutoencoderConfig.from_file(ae_dir)
        ae_weights = read_weights(ae_dir)
        ae_label = f"{ae_dir}: "
    else:
        raise CheckpointError(
            f"{directory} has no autoencoder weights (ae_model.*) and its ae_path {config.ae_path!r} was not found "
            f"(tried {', '.join(str(p) for p in _ae_path_candidates(directory, config.ae_path))}); pass ae_path="
        )
    config.check_autoencoder(ae_config, source=str(directory / "config.json"))
    return ae_config, ae_weights, ae_label


def default_model_path(which: str = "calm") -> Path:
    """The shipped default CALM model ("calm") or its token-level baseline ("token_baseline")."""
    directory = {"calm": DEFAULT_CALM, "token_baseline": DEFAULT_TOKEN_BASELINE}.get(which)
    if directory is None:
        raise ValueError(f"which must be 'calm' or 'token_baseline', got {which!r}")
    if not (directory / "config.json").is_file():
        raise CheckpointError(
            f"the default model is not installed ({directory} has no config.json): reinstall calm-engine, or pass a "
            "checkpoint path"
        )
    return directory


def load_autoencoder(
    path: str | Path | None = None, *, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32
) -> Autoencoder:
    """Load an autoencoder: a standalone checkpoint directory (config.json + weights), or the one a CALM checkpoint
    directory embeds (ae_model.*, found as `load` finds it). Without a path, the shipped default model's."""
    directory = existing_dir(default_model_path() if path is None else path, "autoencoder checkpoint")
    dtype, device = resolve_dtype(dtype), resolve_device(device)
    if is_autoencoder_checkpoint(directory):
        config = AutoencoderConfig.from_file(directory)
        if not has_weights(directory):
            raise CheckpointError(
                f"{directory} holds an autoencoder config.json but no weights: a CALM checkpoint that points at it "
                f"(ae_path) embeds them as ae_model.*; pass that checkpoint's directory{_calm_parent_hint(directory)}"
            )
        weights, label = read_weights(directory), ""
    else:
        from calm_engine.model.token_llama import is_token_llama_checkpoint

        if is_token_llama_checkpoint(directory):
            raise CheckpointError(f"{directory} is a token-level Llama checkpoint: it has no autoencoder")
        calm_config = CalmConfig.from_file(directory)
        config, weights, label = _autoencoder_parts(directory, calm_config, read_weights(directory), None)
    with torch.device("meta"):
        autoencoder = Autoencoder(config)
    raise_problems(directory, check_weights(autoencoder.state_dict(), weights, optional={LM_HEAD_KEY}, label=label))
    _assign_autoencoder(autoencoder, weights, dtype, device)
    return autoencoder.eval().requires_grad_(False)


def is_autoencoder_checkpoint(directory: Path) -> bool:
    """Whether the directory's config.json names the official Autoencoder architecture. An unreadable config.json
    is left to the loaders, whose errors say what is wrong with it."""
    try:
        config = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    architectures = config.get("architectures") if isinstance(config, dict) else None
    return isinstance(architectures, list) and AutoencoderConfig.ARCHITECTURE in architectures


def _calm_parent_hint(directory: Path) -> str:
    parent = directory.resolve().parent
    if (parent / "config.json").is_file() and has_weights(parent) and not is_autoencoder_checkpoint(parent):
        return f" (here probably {parent})"
    return ""


def save_autoencoder(autoencoder: Autoencoder, directory: str | Path, *, safetensors: bool = True) -> None:
    """Write config.json + weights the way the official training does (the tied lm_head stored too)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    autoencoder.config.save(directory)
    write_weights(autoencoder.state_dict(), directory, safetensors)


def save_calm(
    model: CalmModel,
    directory: str | Path,
    *,
    safetensors: bool = True,
    ae_path: str | None = "autoencoder",
    write_autoencoder: bool = True,
) -> None:
    """Write a CALM checkpoint in the official layout, the autoencoder embedded under `ae_model.*`.

    The config's ae_path is set to `ae_path`; when it is relative and `write_autoencoder` is set, the autoencoder
    checkpoint is also written there inside `directory`, so that the folder is self-contained (its config is not
    recoverable from the weights alone) and the official code, run from the folder, finds it too.
    The pickle copy stores the generator twice (`mlp_generator.*` and `generative_head.*`, one storage) as the
    official `save_pretrained` does; the safetensors copy, which cannot alias, stores `mlp_generator.*` only.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dataclasses.replace(model.config, ae_path=ae_path).save(directory)
    if ae_path is not None and write_autoencoder and not Path(ae_path).is_absolute():
        save_autoencoder(model.autoencoder, directory / ae_path, safetensors=safetensors)
    state = _to_official_names(model.state_dict())
    if not safetensors:
        for key in [k for k in state if _our_name(k).startswith(DUPLICATE_HEAD_PREFIX)]:
            state[_our_name(key)] = state[key]
    write_weights(state, directory, safetensors)


# ---------------------------------------------------------------------------------------------------------------
# Weight files


# ---------------------------------------------------------------------------------------------------------------
# Names, shapes, assignment


def _from_official_names(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename official keys to ours and fold the generator's duplicate copy, which must equal the first."""
    renamed, duplicates = {}, {}
    for key, tensor in weights.items():
        if key.startswith(DUPLICATE_HEAD_PREFIX):
            duplicates[key] = tensor
        else:
            renamed[_our_name(key)] = tensor
    differing = []
    for key, tensor in duplicates.items():
        if key not in renamed:
            renamed[key] = tensor  # a checkpoint with generative_head.* only
        elif renamed[key].shape != tensor.shape or not torch.equal(renamed[key], tensor):
            differing.append(key)
    if differing:
        raise CheckpointError(
            f"the checkpoint stores the generator twice (mlp_generator.* and generative_head.*) with different "
            f"values for: {differing}"
        )
    return renamed


def _our_name(key: str) -> str:
    for official, ours in OFFICIAL_PREFIXES.items():
        if key.startswith(official):
            return ours + key[len(official) :]
    return key


def _official_name(key: str) -> str:
    for official, ours in (*OFFICIAL_PREFIXES.items(), (AE_PREFIX, "autoencoder.")):
        if key.startswith(ours):
            return official + key[len(ours) :]
    return key


def _to_official_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {_official_name(key): tensor for key, tensor in state.items()}


def _assign_autoencoder(
    autoencoder: Autoencoder, weights: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device
) -> None:
    """Assign the autoencoder's weights; keep the output projection tied unless the checkpoint stores another one."""
    lm_head = weights.get(LM_HEAD_KEY)
    embedding = weights[EMBEDDING_KEY]
    untied = lm_head is not None and lm_head.data_ptr() != embedding.data_ptr() and not torch.equal(lm_head, embedding)
    rest = {k: v for k, v in weights.items() if k != LM_HEAD_KEY}
    missing, unexpected = autoencoder.load_state_dict(cast_weights(rest, dtype, device), strict=False, assign=True)
    assert missing == [LM_HEAD_KEY] and not unexpected, (missing, unexpected)
    if untied:
        autoencoder.decoder.lm_head_weight = torch.nn.Parameter(lm_head.to(device=device, dtype=dtype))
    else:
        autoencoder.tie_weights()


def _infer_autoencoder_config(weights: dict[str, torch.Tensor], config: CalmConfig) -> AutoencoderConfig:
    """The autoencoder config read off its weight shapes, for checkpoints whose ae_path leads nowhere."""

    def count(prefix: str) -> int:
        pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
        return len({m.group(1) for k in weights if (m := pattern.match(k))})

    try:
        vocab, hidden = weights[EMBEDDING_KEY].shape
        gate = weights.get("encoder.encoder_layers.0.mlp.gate_proj.weight")
        inferred = AutoencoderConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=gate.shape[0] if gate is not None else AutoencoderConfig.intermediate_size,
            latent_size=weights["encoder.hidden_to_latent.weight"].shape[0] // 2,
            patch_size=weights["encoder.squeeze_layer.weight"].shape[1] // hidden,
            num_encoder_layers=count("encoder.encoder_layers."),
            num_decoder_layers=count("decoder.decoder_layers."),
            mlp_bias="encoder.encoder_layers.0.mlp.gate_proj.bias" in weights,
            pad_token_id=config.pad_token_id,
            bos_token_id=config.bos_token_id,
            eos_token_id=config.eos_token_id,
        )
        inferred.validate("autoencoder config inferred from ae_model.* weights")
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"cannot infer the autoencoder config from the ae_model.* weights: {error}") from None
    warnings.warn(
        "no autoencoder config.json found (ae_path); using one read off the ae_model.* weight shapes with "
        f"rms_norm_eps={inferred.rms_norm_eps} and hidden_act={inferred.hidden_act!r}; pass ae_path= to override",
        stacklevel=3,
    )
    return inferred


# ---------------------------------------------------------------------------------------------------------------
# Paths and options


def _ae_path_candidates(directory: Path, ae_path: str | None) -> list[Path]:
    if not ae_path:
        return []
    path = Path(ae_path)
    if path.is_absolute():
        return [path]
    return [directory.parent / path, directory / path, Path.cwd() / path]


def _find_autoencoder_dir(directory: Path, config: CalmConfig, ae_path: str | Path | None) -> Path | None:
    """The explicit ae_path (which must exist), else the first existing candidate for the config's ae_path."""
    if ae_path is not None:
        explicit = Path(ae_path)
        if not (explicit / "config.json").is_file():
            raise CheckpointError(f"ae_path {explicit} is not an autoencoder checkpoint directory (no config.json)")
        return explicit
    for candidate in _ae_path_candidates(directory, config.ae_path):
        if (candidate / "config.json").is_file():
            return candidate
    return None
