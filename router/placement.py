"""Adapter-affinity placement: a Ray Serve request router for the engine deployment.

Each adapter id has its own order of the live replicas (rendezvous hashing), so it keeps
landing where its weights are already in a GPU slot. Its home is the first replica in that
order that is home to fewer recently requested adapters than it has GPU slots (consistent
hashing with bounded loads, counted in adapters): hashing alone gives some replica more
adapters than slots, and those would evict each other forever. Requests wait for their
adapter's homes; when one has waited affinity_wait_s, its replica is short of capacity and the
adapter with the most requests waiting there gains another home (the next replica in its
order with room): a hot adapter spreads over a few stable homes while the cold ones stay
where they are resident, instead of every late request evicting something elsewhere. A
replica whose load is over (1 + epsilon) x the mean load plus a constant is skipped for the
next one in the order. Base-only requests take the less loaded of two random replicas.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ray import serve
from ray.serve.exceptions import RayServeException
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from router.metrics import ROUTING_DECISIONS

# Routing-stats keys the engine replicas report (replica/deployment.py: record_routing_stats).
STAT_QUEUE_LEN = "queue_len"
STAT_RESIDENT = "resident_adapters"
STAT_TIME = "reported_at"  # time.time() on the replica
STAT_SLOTS = "slots"  # the replica's GPU adapter slots (max_loras)

# A request that Ray picked a replica for is normally accepted (or rejected) within milliseconds;
# one that is neither after this long was given up on its way (its caller cancelled).
PICKED_TTL_S = 10.0


def rendezvous_order(key: str, replica_ids: Sequence[str]) -> list[str]:
    """Replica ids by descending highest-random-weight score for `key`.

    Removing a replica only moves the keys that ranked it first; nothing else moves.
    """

    def score(replica_id: str) -> int:
        digest = hashlib.blake2b(f"{key}\x00{replica_id}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big")

    return sorted(replica_ids, key=score, reverse=True)


def bounded_order(
    order: Sequence[str], loads: Mapping[str, float], *, epsilon: float, slack: float
) -> tuple[list[str], list[str]]:
    """Split a hash order into replicas within the load bound and those over it (both in order)."""
    mean = sum(loads.get(r, 0.0) for r in order) / max(len(order), 1)
    bound = (1.0 + epsilon) * mean + slack
    within = [r for r in order if loads.get(r, 0.0) <= bound]
    over = [r for r in order if loads.get(r, 0.0) > bound]
    return within, over


@dataclass
class _Placing:
    """A request this router is placing."""

    pending: PendingRequest
    offered: str  # the replica it was first offered to
    since: float  # when (the wait for affinity counts from then)
    picked_at: float | None = None  # when Ray's pick for it was first seen


def _own_replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except RayServeException:  # a handle outside any replica (a driver script)
        return "driver"


class AdapterAffinityRouter(RequestRouter):
    """Rendezvous hashing of the multiplexed model id (the adapter id) with a load bound.

    kwargs (request_router_kwargs): epsilon (default 0.5), slack (default 4.0),
    affinity_wait_s (default 1.0: a request that waited that long, from this router's first offer,
    gives the hottest adapter waiting for the same replica another home), stats_max_age_s
    (default 1.0: older reported queue lengths are ignored), home_ttl_s (default 300: an adapter
    not asked for that long gives up its homes).
    """

    def initialize_state(
        self,
        epsilon: float = 0.5,
        slack: float = 4.0,
        affinity_wait_s: float = 1.0,
        stats_max_age_s: float = 1.0,
        home_ttl_s: float = 300.0,
        **_: object,
    ) -> None:
        if epsilon < 0:
            raise ValueError(f"epsilon must be >= 0, got {epsilon!r}")
        if slack < 0:
            raise ValueError(f"slack must be >= 0, got {slack!r}")
        self._epsilon = float(epsilon)
        self._slack = float(slack)
        self._affinity_wait_s = float(affinity_wait_s)
        self._stats_max_age_s = float(stats_max_age_s)
        self._home_ttl_s = float(home_ttl_s)
        # adapter id -> (its home replicas' unique ids, the first one first; when last asked for)
        self._homes: dict[str, tuple[tuple[str, ...], float]] = {}
        # replica unique id -> when an adapter last gained a home to relieve it
        self._relieved_at: dict[str, float] = {}
        # The `replica` label of the routing counter: the replica this router runs in.
        self._metrics_replica = _own_replica_id()
        # Requests this router has in flight per replica: fresher than the periodic stats.
        self._inflight: dict[ReplicaID, int] = {}
        self._inflight_by_request: dict[str, ReplicaID] = {}
        # Requests being placed by this router, until their replica accepts them: demand that the
        # replicas' own queues, capped at max_ongoing_requests, do not show.
        self._waiting: dict[str, _Placing] = {}

    def _placing_on(self) -> Counter[str]:
        """Requests this router is placing, by replica: the one first offered while Ray picks, then
        the one Ray picked until that replica accepts the request (on_request_routed: in flight
        from then). The acceptance is a round trip to the replica; without this, a burst placed
        meanwhile would all see the same load and go to the same replica."""
        now = time.monotonic()
        counts: Counter[str] = Counter()
        for request_id, placing in list(self._waiting.items()):
            future = placing.pending.future
            if not future.done():  # Ray is picking (again, after a rejection: a new future)
                placing.picked_at = None
                counts[placing.offered] += 1
                continue
            if placing.picked_at is None:
                placing.picked_at = now
            if future.cancelled() or future.exception() is not None or now - placing.picked_at > PICKED_TTL_S:
                del self._waiting[request_id]
            else:
                counts[future.result().replica_id.unique_id] += 1
        return counts

    def _load(self, replica: RunningReplica) -> float:
        # The replica's own count also covers other routers' requests, but it reaches here a
        # period late: a stale one (a burst that has ended) must not move adapters.
        stats = replica.routing_stats or {}
        fresh = time.time() - stats.get(STAT_TIME, 0.0) <= self._stats_max_age_s
        reported = stats.get(STAT_QUEUE_LEN, 0) if fresh else 0
        return float(max(self._inflight.get(replica.replica_id, 0), reported))

    def _homes_of(self, adapter: str, by_id: Mapping[str, RunningReplica], *, grow: bool = False) -> list[str]:
        """The adapter's live homes, first the oldest; a new one when it has none or `grow`."""
        now = time.monotonic()
        homes = [uid for uid in self._homes.get(adapter, ((), 0.0))[0] if uid in by_id]
        if not homes or grow:
            # Adapters nobody asked for lately no longer hold a place (expired here only, where
            # the counts matter, to keep the common path short).
            self._homes = {a: h for a, h in self._homes.items() if now - h[1] <= self._home_ttl_s}
            homed = Counter(uid for a, (uids, _) in self._homes.items() if a != adapter for uid in uids)

            def has_room(uid: str) -> bool:
                slots = (by_id[uid].routing_stats or {}).get(STAT_SLOTS)
                return slots is None or homed[uid] < slots

            candidates = [uid for uid in rendezvous_order(adapter, list(by_id)) if uid not in homes]
            roomy = [uid for uid in candidates if has_room(uid)]
            # A first home even where there is no room: with more adapters than the fleet has
            # slots, plain hashing is the best there is. Another home only where there is room,
            # or it would evict adapters that live there.
            homes += roomy[:1] if homes else (roomy or candidates)[:1]
        self._homes[adapter] = (tuple(homes), now)
        return homes

    def _relieve(self, replica: str, by_id: Mapping[str, RunningReplica]) -> None:
        """A request waited affinity_wait_s for `replica`: the adapter with the most requests waiting
        for it gains another home (at most once per wait), so a hot adapter's load moves and the
        cold adapters homed there stay put."""
        now = time.monotonic()
        if now - self._relieved_at.get(replica, -float("inf")) < self._affinity_wait_s:
            return
        self._relieved_at[replica] = now
        demand = Counter(
            p.pending.metadata.multiplexed_model_id
            for p in self._waiting.values()
            if p.offered == replica and not p.pending.future.done()
        )
        hottest = next((a for a, _ in demand.most_common() if a), None)
        if hottest is not None:
            self._homes_of(hottest, by_id, grow=True)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is None:
            return [candidate_replicas]
        # Sleep between passes over the ranks instead of spinning when all are full.
        pending_request.routing_context.should_backoff = True
        adapter = pending_request.metadata.multiplexed_model_id
        if not adapter:
            pair = random.sample(candidate_replicas, min(2, len(candidate_replicas)))
            return [pair]

        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        placing_on = self._placing_on()
        request_id = pending_request.metadata.internal_request_id
        placing = self._waiting.get(request_id)
        # Counted from the first offer, not from arrival: under load every request queues in
        # Ray's router before placement starts, and that says nothing about its replicas.
        if placing is not None and time.monotonic() - placing.since >= self._affinity_wait_s:
            self._relieve(placing.offered, by_id)
        loads = {uid: self._load(r) + placing_on[uid] for uid, r in by_id.items()}
        homes = self._homes_of(adapter, by_id)
        order = homes + [uid for uid in rendezvous_order(adapter, list(by_id)) if uid not in homes]
        within, _ = bounded_order(order, loads, epsilon=self._epsilon, slack=self._slack)
        # First its homes within the load bound, offered together so that Ray takes the less
        # loaded one; if all are over it, the next replica in its order within the bound (which
        # loads it). Then other replicas within the bound that still hold it.
        home_rank = [uid for uid in homes if uid in within]
        others = [uid for uid in within if uid not in homes]
        first = home_rank or others[:1]
        holding = {uid for uid, r in by_id.items() if adapter in (r.routing_stats or {}).get(STAT_RESIDENT, ())}
        ranks = [first] + [[uid] for uid in others if uid in holding and uid not in first]
        if placing is None:
            self._waiting[request_id] = _Placing(pending_request, first[0], time.monotonic())
        return [[by_id[uid] for uid in rank] for rank in ranks]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: object) -> None:
        request_id = pending_request.metadata.internal_request_id
        self._waiting.pop(request_id, None)
        self._inflight[replica_id] = self._inflight.get(replica_id, 0) + 1
        self._inflight_by_request[request_id] = replica_id
        adapter = pending_request.metadata.multiplexed_model_id
        if not adapter:
            decision = "base"
        else:
            homes = self._homes.get(adapter, ((), 0.0))[0]
            decision = "affine" if replica_id.unique_id in homes else "spilled"
        ROUTING_DECISIONS.labels(replica=self._metrics_replica, decision=decision).inc()

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        routed_to = self._inflight_by_request.pop(internal_request_id, None)
        if routed_to is not None:
            self._inflight[routed_to] = max(0, self._inflight.get(routed_to, 0) - 1)
