"""Sampling parameters, their validation, and the batched sampler."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class InvalidRequest(ValueError):
    """A request the engine refuses before queueing it; `.param` names the bad field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def validate(self) -> None:
        """Raise InvalidRequest naming the first bad field; normalises stop lists to tuples."""
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequest("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequest("temperature", f"must be a finite number >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidRequest("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequest("top_k", f"must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise InvalidRequest("seed", f"must be an integer or None, got {self.seed!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if not all(isinstance(s, str) and s for s in stop):
            raise InvalidRequest("stop", f"must be non-empty strings, got {self.stop!r}")
        self.stop = stop
        ids = tuple(self.stop_token_ids)
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
            raise InvalidRequest("stop_token_ids", f"must be token ids >= 0, got {self.stop_token_ids!r}")
        self.stop_token_ids = ids

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class Sampler:
    """Picks one token per row. Random rows draw from their own generator, so a seeded
    request gives the same tokens whatever else is in the batch."""

    def __init__(self) -> None:
        self._unseeded = torch.Generator()
        self._unseeded.seed()

    def new_generator(self, seed: int | None) -> torch.Generator:
        gen = torch.Generator()
        if seed is None:
            gen.manual_seed(int(torch.randint(0, 2**62, (1,), generator=self._unseeded)))
        else:
            gen.manual_seed(seed)
        return gen

    def __call__(
        self, logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]
    ) -> list[int]:
        """logits [B, vocab] (any device/dtype); one token id per row."""
        tokens = logits.argmax(dim=-1).tolist()
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if not random_rows:
            return tokens
        rows = logits[random_rows].float().cpu()
        for j, i in enumerate(random_rows):
            tokens[i] = _sample_row(rows[j], params[i], generators[i])
        return tokens


def _sample_row(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = cumulative - sorted_logits.softmax(-1) >= p.top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, -math.inf))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=gen))
