"""A request's state inside the engine, and what the engine streams back."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch

from replica.config import LoRARequest
from replica.detokenizer import IncrementalDetokenizer
from replica.sampling import SamplingParams

_arrival = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestOutput:
    request_id: str
    text: str  # new text since the last output
    token_ids: list[int]  # new token ids since the last output
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | None
    prompt_tokens: int
    completion_tokens: int


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None  # a seeded request's own; None: the sampler's shared one
    adapter: LoRARequest | None = None
    eos_token_ids: frozenset[int] = frozenset()
    arrival: int = field(default_factory=lambda: next(_arrival))
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    error: BaseException | None = None  # set when the adapter failed to load
    slot: int = -1  # adapter slot while running (-1: base model)
    num_sent_ids: int = 0
    num_preemptions: int = 0
    # Tokens sampled by launched steps that have not reached the host yet: the next step reads such a
    # token on the device (ModelRunner), so that it can be launched before the last one is collected.
    num_pending: int = 0

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_at(self, position: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[position] if position < n else self.output_ids[position - n]

    @property
    def num_tokens(self) -> int:
        """Tokens so far, the pending ones included."""
        return len(self.prompt_ids) + len(self.output_ids) + self.num_pending

    @property
    def sampled_all(self) -> bool:
        """max_tokens are sampled, some maybe still pending: there is nothing left to compute."""
        return len(self.output_ids) + self.num_pending >= self.params.max_tokens

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def append_token(self, token: int) -> None:
        """Record a pending token as it reaches the host; a stop token or max_tokens ends the sequence.
        Stop strings need the text: detokenize() looks for them, after the next step is on its way."""
        self.num_pending -= 1
        self.output_ids.append(token)
        p = self.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            self.finish_reason = "stop"  # the text ends as it is, without the stop token's
        elif len(self.output_ids) >= p.max_tokens:
            self.finish_reason = "length"

    def detokenize(self) -> None:
        """Decode the tokens recorded since the last call; a stop string in the new text ends the
        sequence (also one that max_tokens just ended: the text is cut before the stop string)."""
        stop_token = self.finish_reason == "stop"
        if self.detokenizer.update(self.output_ids[:-1] if stop_token else self.output_ids):
            self.finish_reason = "stop"

    def take_output(self) -> RequestOutput:
        """The increment since the last output."""
        done = self.finish_reason is not None
        ids = self.output_ids[self.num_sent_ids :]
        self.num_sent_ids = len(self.output_ids)
        return RequestOutput(
            request_id=self.request_id,
            text=self.detokenizer.take_text(finished=done),
            token_ids=ids,
            finished=done,
            finish_reason=self.finish_reason,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.output_ids),
        )
