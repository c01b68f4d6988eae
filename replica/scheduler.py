"""Continuous batching: each step schedules running sequences first (decode, or the rest
of a chunked prompt), then admits waiting ones under the token budget, max_num_seqs and the
adapter slots. KV pressure preempts the newest running sequence, which is recomputed later.
A step is scheduled while the previous one still runs: a running sequence's last sampled token
may still be pending (it counts in num_tokens; the step reads it on the device)."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Protocol

from replica.config import LoRARequest
from replica.kv_cache import BlockManager
from replica.sequence import Sequence, Status


class SlotPool(Protocol):
    """What the scheduler needs of the AdapterPool."""

    def ensure(self, adapter: LoRARequest) -> str: ...  # "ready" | "loading" | "failed"

    def error(self, adapter: LoRARequest) -> BaseException | None: ...

    def acquire(self, adapter: LoRARequest) -> int | None: ...

    def release(self, slot: int) -> None: ...


@dataclass
class SchedulerOutput:
    seqs: list[Sequence] = field(default_factory=list)
    num_new: list[int] = field(default_factory=list)  # tokens computed for each seq this step
    preempted: list[Sequence] = field(default_factory=list)
    failed: list[Sequence] = field(default_factory=list)  # their adapter failed to load

    @property
    def empty(self) -> bool:
        return not self.seqs


class Scheduler:
    def __init__(
        self, block_manager: BlockManager, pool: SlotPool, *, max_num_seqs: int, max_num_batched_tokens: int
    ) -> None:
        self.blocks = block_manager
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[Sequence] = []  # kept in arrival order
        self.running: list[Sequence] = []  # in admission order: the last is the newest

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        bisect.insort(self.waiting, seq, key=lambda s: s.arrival)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.sampled_all:  # its last tokens are on their way; it finishes when they arrive
                i += 1
                continue
            n = min(seq.num_tokens - seq.num_computed, budget)
            while not self.blocks.can_allocate(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                break
            self.blocks.allocate(seq, n)
            out.seqs.append(seq)
            out.num_new.append(n)
            budget -= n
            i += 1
        if not out.preempted:
            self._admit(out, budget)
        return out

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        # A request waiting for a GPU slot holds back later adapter requests, so that the
        # slots drain and it gets one (no starvation); base-only requests need no slot.
        slot_blocked = False
        for seq in list(self.waiting):
            if budget == 0 or len(self.running) >= self.max_num_seqs:
                break
            if seq.adapter is not None:
                if slot_blocked:
                    continue
                state = self.pool.ensure(seq.adapter)
                if state == "failed":  # the caller fails it and takes it out through finish()
                    seq.error = self.pool.error(seq.adapter)
                    out.failed.append(seq)
                    continue
                if state == "loading":
                    continue
            n = min(seq.num_tokens, budget)
            if not self.blocks.can_allocate(seq, n):
                break  # first come, first served: nothing later jumps a request that lacks blocks
            if seq.adapter is not None:
                slot = self.pool.acquire(seq.adapter)
                if slot is None:
                    slot_blocked = True
                    continue
                seq.slot = slot
            self.waiting.remove(seq)
            self.blocks.allocate(seq, n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.seqs.append(seq)
            out.num_new.append(n)
            budget -= n

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_preemptions += 1
        self.add(seq)

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        if seq.slot >= 0:
            self.pool.release(seq.slot)
            seq.slot = -1

    def finish(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out, returning its blocks and slot."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = Status.FINISHED
