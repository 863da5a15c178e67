"""Tokenizers found in a checkpoint directory: a Hugging Face `tokenizer.json` or a tiktoken-format `tokenizer.model`.

Both expose `encode(text) -> list[int]`, `decode(ids) -> str` and `vocab_size`. Text that spells a special token
(e.g. "<|end_of_text|>") encodes to that token, as Hugging Face tokenizers do. Decoding is byte-exact: no
"clean-up" of spaces before punctuation (transformers' `clean_up_tokenization_spaces` would alter the text).

`token_bytes()` gives each id's bytes where decoding is byte-level (decode(ids) is the UTF-8 decoding, invalid bytes
replaced, of their concatenation), so that a stream can be decoded incrementally without calling decode per step.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

# The pre-tokenization split of the Llama-3 tokenizer (tiktoken format), which the official CALM checkpoints use.
LLAMA3_SPLIT_PATTERN = "|".join(
    [
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)",
        r"[^\r\n\p{L}\p{N}]?\p{L}+",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)
PAD_TOKEN = "[PAD]"  # the official training adds it after the tokenizer's own ids when the tokenizer has no pad token


class TokenizerError(ValueError):
    """A tokenizer file is missing, malformed or of an unsupported kind."""


class HuggingFaceTokenizer:
    """A `tokenizer.json` through the `tokenizers` library."""

    def __init__(self, path: Path, pad_token_id: int | None = None):
        from tokenizers import Tokenizer

        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # the library raises a bare Exception subclass for any parse problem
            raise TokenizerError(f"cannot read tokenizer {path}: {error}") from None
        if pad_token_id is not None and self._tokenizer.id_to_token(pad_token_id) is None:
            self._tokenizer.add_special_tokens([PAD_TOKEN])
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self) -> list[bytes] | None:
        """Each id's bytes if the decoder is byte-level (GPT-2 style: every byte spelled as one character) and each
        id decodes alone to its bytes' text; else None."""
        from tokenizers import decoders

        if not isinstance(self._tokenizer.decoder, decoders.ByteLevel):
            return None
        byte_of = {char: byte for byte, char in enumerate(byte_level_alphabet())}
        table = []
        for token_id in range(self.vocab_size):
            token = self._tokenizer.id_to_token(token_id)
            if token is None or any(char not in byte_of for char in token):
                return None
            table.append(bytes(byte_of[char] for char in token))
        return table if _decodes_alone(self, table) else None


class TiktokenTokenizer:
    """A tiktoken BPE file (`tokenizer.model`: one "base64-token rank" per line), as the Llama-3 tokenizer ships.

    Special tokens come from `tokenizer_config.json`'s `added_tokens_decoder` beside it; the pad id of the model
    config becomes "[PAD]" when the tokenizer has no token there (the official training appends it).
    """

    def __init__(self, path: Path, pad_token_id: int | None = None):
        import tiktoken

        ranks = _read_tiktoken_ranks(path)
        specials = _read_special_tokens(path.parent / "tokenizer_config.json")
        size = max(len(ranks), max(specials.values(), default=-1) + 1)
        if pad_token_id is not None and pad_token_id >= size:
            if pad_token_id != size:
                raise TokenizerError(
                    f"pad_token_id {pad_token_id} is not the next id after the tokenizer's {size} tokens"
                )
            specials[PAD_TOKEN] = pad_token_id
        self._encoding = tiktoken.Encoding(
            name=path.parent.name or "tiktoken",
            pat_str=LLAMA3_SPLIT_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=specials,
        )
        self.vocab_size = self._encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        return self._encoding.encode(text, allowed_special="all")

    def decode(self, ids: list[int]) -> str:
        return self._encoding.decode(list(ids))

    def token_bytes(self) -> list[bytes] | None:
        """Each id's bytes (tiktoken decodes by concatenating them); None if some id below vocab_size has none."""
        try:
            table = [self._encoding.decode_single_token_bytes(token_id) for token_id in range(self.vocab_size)]
        except KeyError:
            return None
        return table if _decodes_alone(self, table) else None


def byte_level_alphabet() -> list[str]:
    """The character that spells each byte 0..255 in byte-level BPE vocabularies (GPT-2's scheme): printable Latin-1
    bytes stand for themselves, the others take the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1)]
    printable += range(ord("\u00ae"), ord("\u00ff") + 1)
    kept = set(printable)
    alphabet, extra = [], 0
    for byte in range(256):
        if byte in kept:
            alphabet.append(chr(byte))
        else:
            alphabet.append(chr(256 + extra))
            extra += 1
    return alphabet


def _decodes_alone(tokenizer, table: list[bytes]) -> bool:
    """Every id decoded alone gives the text of its bytes: a check that the table describes this decoder."""
    return all(tokenizer.decode([i]) == data.decode("utf-8", "replace") for i, data in enumerate(table))


def _read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    with open(path, "rb") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise TokenizerError(
                    f"{path}: line {number} is not 'base64-token rank' (SentencePiece .model files are not "
                    "supported; provide a tokenizer.json)"
                ) from None
    if not ranks:
        raise TokenizerError(f"{path}: no tokens")
    return ranks


def _read_special_tokens(config_path: Path) -> dict[str, int]:
    if not config_path.is_file():
        return {}
    try:
        added = json.loads(config_path.read_text()).get("added_tokens_decoder", {})
        return {entry["content"]: int(token_id) for token_id, entry in added.items()}
    except (json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as error:
        raise TokenizerError(f"{config_path}: malformed added_tokens_decoder ({error})") from None


def find_tokenizer(directory: str | Path, pad_token_id: int | None = None):
    """The tokenizer in `directory` (tokenizer.json preferred over tokenizer.model), or None when it has neither."""
    directory = Path(directory)
    if (directory / "tokenizer.json").is_file():
        return HuggingFaceTokenizer(directory / "tokenizer.json", pad_token_id)
    if (directory / "tokenizer.model").is_file():
        return TiktokenTokenizer(directory / "tokenizer.model", pad_token_id)
    return None


def load_tokenizer(directory: str | Path, pad_token_id: int | None = None):
    """Like find_tokenizer, but a directory without a tokenizer is an error."""
    tokenizer = find_tokenizer(directory, pad_token_id)
    if tokenizer is None:
        raise TokenizerError(f"no tokenizer.json or tokenizer.model in {directory}")
    return tokenizer
