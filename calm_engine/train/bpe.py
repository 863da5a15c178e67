"""A byte-level BPE tokenizer trained on the corpus's training documents, saved as a `tokenizer.json`."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|pad|>", "<|bos|>", "<|eos|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)  # ids 0, 1, 2: the trainer assigns them first, in this order
TOKENIZER_FILE = "tokenizer.json"
DEFAULT_VOCAB_SIZE = 8192


@dataclass(frozen=True)
class SpecialTokenIds:
    pad: int
    bos: int
    eos: int


def train_bpe(
    texts: Iterable[str], out_dir: str | Path, vocab_size: int = DEFAULT_VOCAB_SIZE, min_frequency: int = 2
) -> SpecialTokenIds:
    """Train on `texts` (the training documents only, so held-out text stays unseen) and write out_dir/tokenizer.json.

    Byte-level: every byte has a token of its own and the decoder maps tokens back to bytes, so
    decode(encode(text)) == text for any text, whitespace runs and non-ASCII included.
    """
    minimum = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < minimum:
        raise ValueError(f"vocab_size must be an integer >= {minimum} (3 special tokens + 256 bytes), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    # No prefix space: the pre-tokenizer must not add characters, or decoding would not give the text back.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    ids = SpecialTokenIds(*(tokenizer.token_to_id(token) for token in SPECIAL_TOKENS))
    assert (ids.pad, ids.bos, ids.eos) == (0, 1, 2), ids
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / TOKENIZER_FILE))
    return ids
