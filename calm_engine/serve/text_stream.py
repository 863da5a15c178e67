"""ChoiceText: one choice's text as its ids stream in, sent only once it can no longer change.

Two things can change text already decoded: a byte-level token may end inside a UTF-8 character (the decoder shows
U+FFFD until the rest arrives), and a stop string may begin in this step's text and end in a later one (the engine
then cuts the text before it). So the streamed text is held back while it ends inside a character, and by the
longest tail that is a prefix of a stop string. What was sent is always a prefix of the engine's final text.

Decoding is incremental, O(K) a step rather than O(length): with the tokenizer's byte table (`token_bytes()`, for
byte-level tokenizers such as those of the CALM checkpoints) each step's bytes go through an incremental UTF-8
decoder, which holds back an unfinished character; otherwise each step decodes a small window of ids, with the
ids before them as context (some decoders treat the first token of a sequence differently).
"""

from __future__ import annotations

import codecs
import logging
from collections.abc import Iterable, Sequence

logger = logging.getLogger("calm_engine.serve")

REPLACEMENT = "\ufffd"


class ByteDecoder:
    """Text from a byte table: exactly tokenizer.decode (checked by token_bytes and tests/serve), at a fraction of the
    cost of calling it each step (a streamed event is decoded for every step of every stream)."""

    def __init__(self, table: list[bytes]):
        self._table = table
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def add(self, ids: list[int]) -> str:
        """The text of `ids` that is complete, and any held back before them that they complete."""
        table = self._table
        return self._utf8.decode(b"".join([table[t] for t in ids]))

    def rest(self) -> str:
        """What is held back, decoded as the tokenizer would at the end (an unfinished character as U+FFFD)."""
        return self._utf8.decode(b"", True)


class WindowDecoder:
    """Text from tokenizer.decode over the ids since the last complete decode, with the ids before them as context."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._context = 0  # ids from here on are decoded each step
        self._done = 0  # ids before this are decoded into text already returned

    def add(self, ids: list[int]) -> str:
        self._ids.extend(ids)
        if len(self._ids) == self._done:
            return ""
        before = self._tokenizer.decode(self._ids[self._context : self._done])
        after = self._tokenizer.decode(self._ids[self._context :])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""
        self._context, self._done = self._done, len(self._ids)
        return after[len(before) :]

    def rest(self) -> str:
        return self._tokenizer.decode(self._ids[self._done :]) if len(self._ids) > self._done else ""


class ChoiceText:
    """token_bytes: the tokenizer's byte table, or None to decode with the tokenizer itself."""

    def __init__(
        self, tokenizer, stop: Sequence[str] = (), skip_ids: Iterable[int] = (), token_bytes: list[bytes] | None = None
    ):
        self._decoder = WindowDecoder(tokenizer) if token_bytes is None else ByteDecoder(token_bytes)
        self._stop = tuple(stop)
        self._skip = frozenset(skip_ids)  # end-of-sequence ids: the engine's final text leaves them out too
        self.text = ""  # decoded so far, complete characters only
        self.sent = 0  # characters of `text` already handed out

    def add(self, new_ids: Iterable[int]) -> str:
        """Take a step's new ids; returns the text that is now safe to send."""
        skip = self._skip
        self.text += self._decoder.add([t for t in new_ids if t not in skip])
        if not self._stop:
            return self._release(len(self.text))
        return self._release(len(self.text) - self._stop_prefix_length())

    def finish(self, final_text: str | None) -> str:
        """The rest of the text once the engine finished the choice: its final text, or (aborted) all decoded."""
        if final_text is None:
            final_text = self.text + self._decoder.rest()
        if not final_text.startswith(self.text[: self.sent]):
            # Cannot happen with the byte-level tokenizers of CALM checkpoints; never resend or garble what was sent.
            logger.warning("streamed text is not a prefix of the final text; the stream may differ from it")
            return ""
        rest = final_text[self.sent :]
        self.text, self.sent = final_text, len(final_text)
        return rest

    def _stop_prefix_length(self) -> int:
        """The longest tail of the text that is a proper prefix of a stop string (it may yet complete one)."""
        longest = 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def _release(self, end: int) -> str:
        if end <= self.sent:
            return ""
        delta = self.text[self.sent : end]
        self.sent = end
        return delta
