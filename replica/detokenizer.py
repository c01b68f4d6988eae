"""Incremental detokenization with stop strings that may span token boundaries.

Each step decodes only a short window of tokens (the way TGI and vLLM do), not the whole
output: text grows by decode(window) minus decode(window's already-emitted prefix), and only
once the window no longer ends in an incomplete UTF-8 character."""

from __future__ import annotations

from typing import Any

# Prompt tokens decoded in front of the output so that tokenizers which drop a leading
# space at the start of a text (sentencepiece) decode the first output token right.
_CONTEXT_TOKENS = 4


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: list[int], stop: tuple[str, ...]) -> None:
        # The Rust tokenizer itself where that is all transformers' decode would do: its Python
        # wrapper costs ~5x the decoding, paid for every sequence at every step.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        plain = backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False)
        self._fast_decode = backend.decode if plain else tokenizer.decode
        self._ids = list(prompt_ids[-_CONTEXT_TOKENS:])  # the context, then the output so far
        self._context = len(self._ids)
        # The window is _ids[_prefix:]; _ids[_prefix:_read] is already part of the text.
        self._prefix, self._read = 0, self._context
        self._stop = stop
        self._max_stop = max((len(s) for s in stop), default=0)
        self._pending = ""  # text of tokens that end mid-character, shown only when finished
        self.text = ""  # the whole output text, cut before a stop string once one appears
        self._sent = 0  # characters already streamed

    def _decode(self, ids: list[int]) -> str:
        return self._fast_decode(ids, skip_special_tokens=True)

    def update(self, output_ids: list[int]) -> bool:
        """Decode the tokens added to output_ids since the last call; True when a stop string
        appeared (the text is cut before it)."""
        self._ids.extend(output_ids[len(self._ids) - self._context :])
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        window_text = self._decode(self._ids[self._prefix :])
        new = window_text[len(prefix_text) :]
        if window_text.endswith("\ufffd") or not new:
            self._pending = new
            return False
        self._pending = ""
        start = len(self.text)
        self.text += new
        self._prefix, self._read = self._read, len(self._ids)
        # A stop string can only end inside the new text.
        hits = [i for i in (self.text.find(s, max(0, start - self._max_stop)) for s in self._stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return True
        return False

    def take_text(self, finished: bool) -> str:
        """New text since the last call. Unless finished, a tail that could still grow into a
        stop string is held back; a finished output also shows an incomplete last character."""
        if finished and self._pending:
            self.text, self._pending = self.text + self._pending, ""
        end = len(self.text)
        if not finished:
            end -= self._stop_prefix_len(self.text[:end])
        end = max(end, self._sent)
        new = self.text[self._sent : end]
        self._sent = end
        return new

    def _stop_prefix_len(self, text: str) -> int:
        longest = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest
