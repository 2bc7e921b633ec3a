"""Incremental detokenization with stop strings.

Tokens arrive a few at a time; a multi-byte UTF-8 character may be split across tokens, and a
stop string may span tokens. The text is kept as:

    text = "....................|.............|......"
                                 ^ sent       ^ safe_end        ^ len(text)

`sent` is what the caller has already been given. Text past `safe_end` is held back because it
could be the start of a stop string (at most `max(len(stop)) - 1` characters). Decoding looks
at a small window of tokens (`prefix_offset:`) so each step costs O(window), not O(output):
a token's text is only emitted once decoding no longer ends in U+FFFD (an incomplete character).

Tokenizers backed by the `tokenizers` library do that bookkeeping in Rust (`DecodeStream`), one
call per token instead of two decodes; the Python window remains for the others and for the
final flush of an incomplete character.
"""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

# Tokenizers that add a leading space to a word need a few tokens of left context to decode
# the first generated token the way it appears in the whole text.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True,
                 stop: list[str] | None = None, include_stop_str_in_output: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = [s for s in (stop or []) if s]
        self.include_stop = include_stop_str_in_output
        self.ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        # A prompt ending mid-character leaves its last bytes out of the context, so output
        # starting with the rest of that character decodes as it would on its own.
        while self.ids and self._decode(self.ids).endswith("\ufffd"):
            self.ids.pop()
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        self.sent = 0
        self.stop_reason: str | None = None
        self._backend = getattr(tokenizer, "_tokenizer", None)
        self._stream: DecodeStream | None = None
        if isinstance(self._backend, Tokenizer) and not getattr(
                tokenizer, "clean_up_tokenization_spaces", False):
            self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
            for token_id in self.ids:  # the same left context the window starts with
                self._stream.step(self._backend, token_id)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_tokens(self, token_ids: list[int]) -> None:
        """Decode newly generated tokens; sets `stop_reason` when a stop string appears."""
        for token_id in token_ids:
            if self.stop_reason is not None:
                return
            self.ids.append(token_id)
            if self._stream is not None:
                new = self._stream.step(self._backend, token_id)
                if new:
                    self._append(new)
                    self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
                continue
            prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
            new_text = self._decode(self.ids[self.prefix_offset:])
            if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
                continue  # an incomplete character, or a token that decodes to nothing yet
            self._append(new_text[len(prefix_text):])
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)

    def flush(self) -> None:
        """At the end of a request: emit whatever is still pending, even if incomplete."""
        if self.stop_reason is None and self.read_offset < len(self.ids):
            prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
            new_text = self._decode(self.ids[self.prefix_offset:])
            if len(new_text) > len(prefix_text):
                self._append(new_text[len(prefix_text):])
            self.read_offset = len(self.ids)

    def _append(self, delta: str) -> None:
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
        self.text += delta
        for s in self.stop:
            at = self.text.find(s, start)
            if at != -1 and (self.stop_reason is None or at < self._stop_at):
                self.stop_reason, self._stop_at = s, at
        if self.stop_reason is not None:
            end = self._stop_at + (len(self.stop_reason) if self.include_stop else 0)
            self.text = self.text[:end]

    def take_delta(self, finished: bool) -> str:
        """The text not yet given to the caller, minus a possible stop-string start."""
        if finished or self.stop_reason is not None:
            end = len(self.text)
        else:
            hold = max((len(s) for s in self.stop), default=1) - 1
            end = max(self.sent, len(self.text) - hold)
        delta, self.sent = self.text[self.sent:end], end
        return delta
