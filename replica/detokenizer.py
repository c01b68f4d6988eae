"""Incremental detokenization with stop strings that may span token boundaries."""

from __future__ import annotations

from typing import Any

# Prompt tokens decoded in front of the output so that tokenizers which drop a leading
# space at the start of a text (sentencepiece) decode the first output token right.
_CONTEXT_TOKENS = 4


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: list[int], stop: tuple[str, ...]) -> None:
        self._tokenizer = tokenizer
        self._context = prompt_ids[-_CONTEXT_TOKENS:]
        self._context_text = self._decode(self._context)
        self._stop = stop
        self.text = ""  # the whole output text, cut before a stop string once one appears
        self._sent = 0  # characters already streamed

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def update(self, output_ids: list[int]) -> bool:
        """Re-decode the output; True when a stop string appeared (the text is cut before it)."""
        full = self._decode(self._context + output_ids)
        if full.startswith(self._context_text):
            text = full[len(self._context_text) :]
        else:
            text = self._decode(output_ids)
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        if hits:
            self.text = text[: min(hits)]
            return True
        self.text = text
        return False

    def take_text(self, finished: bool) -> str:
        """New text since the last call. Unless finished, an incomplete UTF-8 character and a
        tail that could still grow into a stop string are held back."""
        end = len(self.text)
        if not finished:
            end = len(self.text.rstrip("\ufffd"))
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
