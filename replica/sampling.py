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
    """Picks one token per row, the whole batch at once on the logits' device: top-k and top-p as masks
    (one sort where top-p asks for it), then the exponential race (argmax of p / q with q ~ Exp(1) is a
    draw from p: the trick vLLM samples with). A seeded request draws its q from its own generator, so it
    gets the same tokens whatever else is in the batch; unseeded rows share one generator. Nothing waits
    for the GPU before the final copy of the tokens: the host queues the sampling while the step runs."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._unseeded = torch.Generator(self.device)
        self._unseeded.seed()
        self._staging = [torch.empty(0), torch.empty(0)]  # used in turn (see _upload)

    def new_generator(self, seed: int | None) -> torch.Generator | None:
        """A seeded request's own generator on the sampling device; None (unseeded) shares the sampler's."""
        if seed is None:
            return None
        gen = torch.Generator(self.device)
        gen.manual_seed(seed)
        return gen

    def __call__(
        self, logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
    ) -> torch.Tensor:
        """logits [B, vocab] on the sampler's device, any float dtype; one token id per row, int64 on that
        device (queued, not waited for)."""
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if not rows:
            return logits.argmax(dim=-1)
        picked = [params[i] for i in rows]
        vocab = logits.shape[-1]
        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in picked]
        top_p = [p.top_p for p in picked]
        index, temperature, k, p = self._upload([rows, [p.temperature for p in picked], top_k, top_p])
        index = index.long()
        every_row = len(rows) == len(params)
        picked_logits = logits if every_row else logits.index_select(0, index)
        x = picked_logits / temperature[:, None]  # float32, in one kernel
        if min(top_p) < 1.0:
            x.masked_fill_(
                x < _top_p_cut(picked_logits, temperature, k.long(), p, top_k=min(top_k) < vocab), -math.inf
            )
        elif min(top_k) < vocab:  # top-k alone needs no sort: the k-th largest value is the cut
            x.masked_fill_(x < x.topk(max(top_k), dim=-1).values.gather(1, k.long()[:, None] - 1), -math.inf)
        race = torch.empty_like(x)
        if any(g is None for g in generators):
            race.exponential_(generator=self._unseeded)
        for row, i in enumerate(rows):
            if generators[i] is not None:
                race[row].exponential_(generator=generators[i])
        # argmax(softmax(x) / race) without the softmax; a draw of exactly 0 would make a masked -inf a NaN
        sampled = x.sub_(race.clamp_min_(torch.finfo(race.dtype).tiny).log_()).argmax(dim=-1)
        # greedy rows keep their argmax, computed only when there are some
        return sampled if every_row else logits.argmax(dim=-1).index_copy_(0, index, sampled)

    def _upload(self, columns: list[list[float]]) -> torch.Tensor:
        """Per-row values, one row of the result per column, on the device in one copy that does not
        wait: a copy from pageable memory would first wait for the whole step. Two staging buffers in
        turn: a call's copy may not have run when the next call comes (the runner launches a step before
        it collects the last), but it has two calls later (by then that step was collected)."""
        host = torch.tensor(columns, dtype=torch.float32)  # exact for row indices and k below 2**24
        if self.device.type != "cuda":
            return host
        self._staging.reverse()
        if self._staging[0].numel() < host.numel():
            self._staging[0] = torch.empty(2 * host.numel(), pin_memory=True)
        staging = self._staging[0][: host.numel()].view_as(host)
        staging.copy_(host)
        return staging.to(self.device, non_blocking=True)


def _top_p_cut(
    logits: torch.Tensor, temperature: torch.Tensor, k: torch.Tensor, p: torch.Tensor, *, top_k: bool
) -> torch.Tensor:
    """Per row [B, 1], the smallest value of logits / temperature that top-k (the k-th largest value) and
    then top-p (the smallest set of most likely tokens whose mass reaches p; the most likely token always
    stays) keep; tokens equal to it stay too, so ties never depend on the batch. One sort, of the raw
    logits (16-bit keys sort faster, and dividing by the temperature keeps their order)."""
    ordered = logits.sort(dim=-1, descending=True).values / temperature[:, None]
    if top_k:
        ordered.masked_fill_(ordered < ordered.gather(1, k[:, None] - 1), -math.inf)
    probs = ordered.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1).sub_(probs)
    # rows without top-p keep what top-k kept, whatever the rounding of their cumulative mass
    kept = torch.where(p < 1.0, (mass_before < p[:, None]).sum(dim=-1), (probs > 0).sum(dim=-1))
    return ordered.gather(1, kept[:, None] - 1)
