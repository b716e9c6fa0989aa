"""Incremental detokenization with stop strings.

Only complete UTF-8 characters are released, and text that might be the start
of a stop string is held back until it is known not to be one, so a stop
string never reaches the caller.
"""

from __future__ import annotations

from typing import NamedTuple


class TextDelta(NamedTuple):
    text: str  # new text for the caller, possibly empty
    stopped: bool  # a stop string was found; the output ends before it


class IncrementalDetokenizer:
    """Turns one request's output token ids into text deltas. Mutates itself on ``add``."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), skip_token_ids: tuple[int, ...] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop = stop
        self._max_stop_len = max((len(s) for s in stop), default=0)
        self._skip = set(skip_token_ids)
        self._token_ids: list[int] = []
        self._text = ""
        self._emitted = 0
        self.stopped = False

    @property
    def text(self) -> str:
        """Text released so far."""
        return self._text[: self._emitted]

    def add(self, token_id: int) -> TextDelta:
        """Append one token and return the text that became safe to release."""
        if self.stopped:
            return TextDelta("", True)
        if token_id not in self._skip:
            self._token_ids.append(token_id)
        text = self._tokenizer.decode(self._token_ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            # The last token ends inside a multi-byte character: wait for the rest.
            return TextDelta("", False)
        self._text = text

        stop_at = self._find_stop()
        if stop_at is not None:
            self.stopped = True
            return self._release(stop_at, stopped=True)
        return self._release(len(text) - self._held_back(), stopped=False)

    def flush(self) -> str:
        """Release whatever is held back at the end of generation (no stop string came)."""
        if self.stopped:
            return ""
        return self._release(len(self._text), stopped=False).text

    def _find_stop(self) -> int | None:
        search_from = max(0, self._emitted - self._max_stop_len)
        positions = [self._text.find(s, search_from) for s in self._stop]
        positions = [p for p in positions if p >= 0]
        return min(positions) if positions else None

    def _held_back(self) -> int:
        """Length of the longest text suffix that is a proper prefix of a stop string."""
        for length in range(min(self._max_stop_len - 1, len(self._text)), 0, -1):
            suffix = self._text[-length:]
            if any(s.startswith(suffix) for s in self._stop):
                return length
        return 0

    def _release(self, end: int, stopped: bool) -> TextDelta:
        end = max(end, self._emitted)
        delta = self._text[self._emitted : end]
        self._emitted = end
        return TextDelta(delta, stopped)
