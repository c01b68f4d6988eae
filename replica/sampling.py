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
    """Picks one token per row, the whole batch at once on the logits' device: one sort for top-k/top-p,
    then the exponential race (argmax of p / q, q ~ Exp(1): a draw from p, the trick vLLM samples with).
    A seeded request draws its q from its own generator, so it gets the same tokens whatever else is in
    the batch; unseeded rows share one generator."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._unseeded = torch.Generator(self.device)
        self._unseeded.seed()

    def new_generator(self, seed: int | None) -> torch.Generator | None:
        """A seeded request's own generator on the sampling device; None (unseeded) shares the sampler's."""
        if seed is None:
            return None
        gen = torch.Generator(self.device)
        gen.manual_seed(seed)
        return gen

    def __call__(
        self, logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
    ) -> list[int]:
        """logits [B, vocab] on the sampler's device, any float dtype; one token id per row."""
        tokens = logits.argmax(dim=-1)
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if rows:
            picked = [params[i] for i in rows]
            tokens[rows] = self._sample(logits[rows].float(), picked, [generators[i] for i in rows])
        return tokens.tolist()

    def _sample(
        self, logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
    ) -> torch.Tensor:
        temperature = torch.tensor([p.temperature for p in params], device=logits.device)
        logits = _top_k_top_p(logits.div_(temperature[:, None]), params)
        probs = logits.softmax(dim=-1)
        race = torch.empty_like(probs)
        if any(g is None for g in generators):
            race.exponential_(generator=self._unseeded)
        for row, gen in enumerate(generators):
            if gen is not None:
                race[row].exponential_(generator=gen)
        return probs.div_(race).argmax(dim=-1)


def _top_k_top_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """logits with what top-k leaves out (below the k-th largest value; ties stay) and then what top-p
    leaves out (beyond the smallest set of most likely tokens whose mass reaches p; the most likely
    token always stays) set to -inf."""
    vocab = logits.shape[-1]
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    top_p = [p.top_p for p in params]
    if min(top_k) == vocab and min(top_p) == 1.0:
        return logits
    ordered, order = logits.sort(dim=-1, descending=True)
    if min(top_k) < vocab:
        k = torch.tensor(top_k, device=logits.device)
        ordered.masked_fill_(ordered < ordered.gather(1, (k - 1)[:, None]), -math.inf)
    if min(top_p) < 1.0:
        probs = ordered.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1).sub_(probs)
        ordered.masked_fill_(mass_before >= torch.tensor(top_p, device=logits.device)[:, None], -math.inf)
    return logits.scatter_(-1, order, ordered)
