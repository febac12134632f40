"""Incremental detokenization with stop strings.

Token ids arrive one at a time; ``add`` returns the text that is safe to show now. Two things
make text unsafe to show yet:

1. Incomplete characters. A byte-level token may end in the middle of a UTF-8 sequence that the
   next token completes; decoding then ends in U+FFFD. Such text waits for the next token.
2. Possible stop-word starts. If the text ends with ``"<|im"`` and ``"<|im_end|>"`` is a stop word,
   those characters wait until the next tokens show whether the stop word follows.

Decoding uses the prefix-offset / read-offset window: only the tokens since the last emitted
boundary, plus the tokens of the step before (the "prefix"), are decoded, and the new text is
``decode(window)[len(decode(prefix)):]``. Decoding the prefix together with the new tokens lets
start-of-string effects (SentencePiece's stripped leading space) and multi-token characters come
out as in a full decode, while the cost of one ``add`` does not grow with the output.

Many sequences are detokenized together by ``add_tokens``: every sequence's prefix and window go
to the tokenizer in one call (per skip_special_tokens setting), instead of two calls per token.

Token-region diagram of ``self._window`` (already-dropped tokens lie to the left):

    |<- prefix: emitted last step ->|<- pending: not yet emitted ->|
    0                        self._read_offset               len(window)

Invariant: ``"".join(all add() results) + finish() == tokenizer.decode(all_ids, skip_special_tokens)``
whenever no stop word fires. (One exception, a tokenizer quirk: with a byte-fallback tokenizer a
byte token that never completes a character makes Hugging Face's decode turn the *whole* run of
byte tokens before it into U+FFFD, after those characters were shown; real model text, whose byte
runs are valid UTF-8, never does this.)

Stop words: the earliest *completed* occurrence wins, i.e. the one that ends first (ties: the one
that starts first). That is the one a token-by-token engine meets first, so the result does not
depend on how the text was split into tokens. A stop word equal to a special token that
``skip_special_tokens`` hides (``"<|im_end|>"``) still ends the text when that token arrives.
"""
from __future__ import annotations

import os
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple, Union

_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Streams the text of one sequence; see the module docstring for the guarantees."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True, stop_words: Sequence[str] = (),
                 include_stop_str_in_output: bool = False):
        if isinstance(stop_words, str):
            stop_words = (stop_words,)
        if any(not word for word in stop_words):
            raise ValueError(f"stop_words must not contain empty strings: {tuple(stop_words)!r}")
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop_words: Tuple[str, ...] = tuple(dict.fromkeys(stop_words))
        self.include_stop_str_in_output = include_stop_str_in_output
        self._skipped_ids = tokenizer.skipped_special_ids if skip_special_tokens else frozenset()
        self._window: List[int] = []
        self._read_offset = 0
        # decode(self._window[:self._read_offset]), or None when the window moved since: decoded
        # again only when needed (add_tokens decodes it with the window, in the same call)
        self._prefix_text: Optional[str] = ""
        self._pending = ""  # decoded, complete text held back as a possible stop-word start
        self._emitted: List[str] = []
        self.num_tokens = 0
        self.stopped = False
        self.matched_stop_word: Optional[str] = None
        self._finished = False

    @property
    def text(self) -> str:
        """Everything ``add`` and ``finish`` returned so far (the final answer once stopped or finished)."""
        if len(self._emitted) > 1:  # join once; later calls only join what came since
            self._emitted[:] = ["".join(self._emitted)]
        return self._emitted[0] if self._emitted else ""

    def add(self, token_id: int) -> str:
        """Feed one generated token; return the newly visible text ("" once stopped)."""
        text = add_tokens([self], [token_id])[0]
        if isinstance(text, Exception):
            raise text
        return text

    def _take(self, token_id: int) -> Optional[str]:
        """First half of add(): the text when no decode is needed, else None (the token joined the
        window, which the caller decodes together with the prefix and hands to _continue)."""
        if self._finished:
            raise RuntimeError("add() after finish(): this sequence's text is already complete")
        if self.stopped:
            return ""
        self.num_tokens += 1
        if token_id in self._skipped_ids:
            word = self._special_stop_word(token_id)
            return "" if word is None else self._stop_on_special(word)
        self._window.append(token_id)
        return None

    def _continue(self, prefix_text: str, new_text: str) -> str:
        """Second half of add(): prefix_text = decode(window[:read_offset]), new_text = decode(window)."""
        self._prefix_text = prefix_text
        # Hold back while the decode ends in an incomplete character, grew nothing, or no longer
        # extends the prefix text (a decoder rewrote earlier bytes; see the module docstring).
        if (len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR)
                or not new_text.startswith(prefix_text)):
            return ""
        delta = new_text[len(prefix_text):]
        self._advance_window()
        return self._consume(delta)

    def finish(self) -> str:
        """Release everything held back (the sequence ended for another reason than a stop word)."""
        if self._finished or self.stopped:
            self._finished = True
            return ""
        out = self._consume(self._flush_window(), final=True)
        self._finished = True
        return out

    # ---------------------------------------------------------------- internals
    def _advance_window(self) -> None:
        # The tokens just emitted become the next prefix; older tokens are no longer needed.
        del self._window[:self._read_offset]
        self._read_offset = len(self._window)
        self._prefix_text = None

    def _current_prefix_text(self) -> str:
        if self._prefix_text is None:
            self._prefix_text = self.tokenizer.decode(self._window[:self._read_offset],
                                                      skip_special_tokens=self.skip_special_tokens)
        return self._prefix_text

    def _flush_window(self) -> str:
        # Decode the not-yet-emitted tokens as they are, incomplete characters included.
        if len(self._window) == self._read_offset:
            return ""
        prefix_text = self._current_prefix_text()
        new_text = self.tokenizer.decode(self._window, skip_special_tokens=self.skip_special_tokens)
        common = len(os.path.commonprefix([new_text, prefix_text]))
        self._advance_window()
        return new_text[common:]

    def _consume(self, delta: str, final: bool = False) -> str:
        """Append stable text; cut at a completed stop word, else hold back a possible stop-word start."""
        buffer = self._pending + delta
        match = self._first_stop(buffer)
        if match is not None:
            start, word = match
            end = start + len(word) if self.include_stop_str_in_output else start
            self._pending = ""
            self.stopped, self.matched_stop_word = True, word
            return self._emit(buffer[:end])
        hold = 0 if final else self._stop_prefix_len(buffer)
        self._pending = buffer[len(buffer) - hold:]
        return self._emit(buffer[:len(buffer) - hold])

    def _emit(self, text: str) -> str:
        if text:
            self._emitted.append(text)
        return text

    def _first_stop(self, text: str) -> Optional[Tuple[int, str]]:
        best = None  # (end, start, word): the occurrence that completes first
        for word in self.stop_words:
            start = text.find(word)
            if start >= 0 and (best is None or (start + len(word), start) < best[:2]):
                best = (start + len(word), start, word)
        return None if best is None else (best[1], best[2])

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop word.

        Holding back that suffix keeps this invariant: every position from which a stop word could
        still complete lies in ``self._pending``, so emitted text never has to be taken back.
        """
        longest = 0
        for word in self.stop_words:
            for size in range(min(len(word) - 1, len(text)), longest, -1):
                if text.endswith(word[:size]):
                    longest = size
                    break
        return longest

    def _special_stop_word(self, token_id: int) -> Optional[str]:
        if not self.stop_words:
            return None
        token = self.tokenizer.convert_ids_to_tokens(token_id)
        return token if token in self.stop_words else None

    def _stop_on_special(self, word: str) -> str:
        # Text before the special token (held bytes and held stop-word prefixes) is final now;
        # a stop word completed inside it wins because it comes first.
        out = self._consume(self._flush_window(), final=True)
        if self.stopped:
            return out
        self.stopped, self.matched_stop_word = True, word
        if self.include_stop_str_in_output:
            out += self._emit(word)
        return out


def add_tokens(detokenizers: Sequence[IncrementalDetokenizer], token_ids: Sequence[int]
               ) -> List[Union[str, Exception]]:
    """``detokenizers[i].add(token_ids[i])`` for every i (distinct detokenizers sharing one
    tokenizer), decoding every window and its prefix in one tokenizer call per skip setting.

    A sequence whose add() fails gets its exception in place of its text; the others are not
    affected (the engine fails that request alone)."""
    texts: List[Union[str, Exception, None]] = []
    for detok, token_id in zip(detokenizers, token_ids):
        try:
            texts.append(detok._take(token_id))
        except Exception as exc:
            texts.append(exc)
    pending: Dict[bool, List[int]] = defaultdict(list)  # skip_special_tokens -> indices to decode
    for i, text in enumerate(texts):
        if text is None:
            pending[detokenizers[i].skip_special_tokens].append(i)
    for skip, indices in pending.items():
        windows = [w for i in indices for w in (detokenizers[i]._window[:detokenizers[i]._read_offset],
                                                detokenizers[i]._window)]
        try:
            decoded = detokenizers[indices[0]].tokenizer.decode_batch(windows, skip_special_tokens=skip)
        except Exception:  # decode one by one below, so that only a bad window fails
            decoded = None
        for k, i in enumerate(indices):
            detok = detokenizers[i]
            try:
                prefix, new = ((decoded[2 * k], decoded[2 * k + 1]) if decoded is not None else
                               (detok.tokenizer.decode(windows[2 * k], skip), detok.tokenizer.decode(windows[2 * k + 1], skip)))
                texts[i] = detok._continue(prefix, new)
            except Exception as exc:
                texts[i] = exc
    return texts
