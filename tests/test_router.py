"""The router's parts without Ray: placement math, auth, the registry, request validation,
error bodies."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter

import pytest
from pydantic import ValidationError

from replica import InvalidRequest, QueueFull
from replica.deployment import error_dict
from router.auth import ANONYMOUS, KeyRing, Tenant, hash_api_key, new_api_key
from router.errors import APIError
from router.placement import bounded_order, rendezvous_order
from router.protocol import ChatCompletionRequest, CompletionRequest, ResponseBuilder
from router.registry import AdapterRegistry
from storage import AdapterNotFound, StorageUnavailable


def test_rendezvous_order_is_stable_and_moves_only_the_removed_replicas_keys():
    replicas = [f"r{i}" for i in range(5)]
    keys = [f"adapter-{i}" for i in range(400)]
    first = {k: rendezvous_order(k, replicas)[0] for k in keys}
    assert first == {k: rendezvous_order(k, list(reversed(replicas)))[0] for k in keys}
    # Spread: every replica is first for a fair share of the keys.
    counts = Counter(first.values())
    assert set(counts) == set(replicas) and min(counts.values()) > 400 / 5 * 0.6
    # Removing r2 moves exactly the keys r2 owned, each to its own second choice.
    survivors = [r for r in replicas if r != "r2"]
    for k in keys:
        after = rendezvous_order(k, survivors)[0]
        if first[k] != "r2":
            assert after == first[k]
        else:
            assert after == rendezvous_order(k, replicas)[1]


def test_bounded_order_skips_replicas_over_the_bound_in_hash_order():
    order = ["a", "b", "c", "d"]
    within, over = bounded_order(order, {"a": 0, "b": 0, "c": 0, "d": 0}, epsilon=0.5, slack=2)
    assert (within, over) == (order, [])
    # mean 3, bound 1.5 * 3 + 2 = 6.5: a (10) is skipped, the rest keep their order.
    within, over = bounded_order(order, {"a": 10, "b": 1, "c": 1, "d": 0}, epsilon=0.5, slack=2)
    assert (within, over) == (["b", "c", "d"], ["a"])
    # The constant keeps a cold adapter in place while loads are small.
    within, _ = bounded_order(order, {"a": 2, "b": 0, "c": 0, "d": 0}, epsilon=0.0, slack=2)
    assert within[0] == "a"


def test_hot_adapter_spreads_while_cold_ones_stay():
    # Simulate placement of a stream of requests that stay in flight: one hot adapter
    # and several cold ones over 4 replicas.
    replicas = ["r0", "r1", "r2", "r3"]
    loads = dict.fromkeys(replicas, 0)
    placed: dict[str, set[str]] = {}
    rng = random.Random(0)
    for _ in range(200):
        adapter = "hot" if rng.random() < 0.7 else f"cold-{rng.randrange(6)}"
        within, over = bounded_order(rendezvous_order(adapter, replicas), loads, epsilon=0.25, slack=2)
        chosen = (within or over)[0]
        loads[chosen] += 1
        placed.setdefault(adapter, set()).add(chosen)
    assert len(placed["hot"]) >= 2
    assert sum(len(v) for k, v in placed.items() if k != "hot") <= 6 + 6  # cold ones mostly stay put
    assert max(loads.values()) <= 1.25 * sum(loads.values()) / 4 + 2 + 1


def test_keyring_matches_hashes_only():
    key = new_api_key()
    assert key.startswith("lf-") and hash_api_key(key) != key
    ring = KeyRing([Tenant("acme", ("acme-*",))], {hash_api_key(key): "acme"})
    assert ring.tenant_for(f"Bearer {key}").name == "acme"
    assert ring.tenant_for("Bearer lf-wrong") is None
    assert ring.tenant_for(key) is None  # no "Bearer "
    assert ring.tenant_for(None) is None
    assert KeyRing([], {}, required=False).tenant_for(None) is ANONYMOUS
    with pytest.raises(ValueError, match="ghost"):
        KeyRing([Tenant("acme")], {hash_api_key(key): "ghost"})


def test_tenant_patterns():
    t = Tenant("acme", ("acme-*", "shared"))
    assert t.may_use("acme-1") and t.may_use("shared")
    assert not t.may_use("beta-1") and not t.may_use("shared-2") and not Tenant("none").may_use("x")


def test_registry_revisions_never_repeat():
    reg = AdapterRegistry({"a": "/x/a", "b": "/x/b"})
    a0 = reg.get("a")
    a1 = reg.register("a", "/x/a2")
    assert a1.revision > max(a0.revision, reg.get("b").revision)
    reg.remove("a")
    assert reg.get("a") is None and reg.ids() == ["b"]
    assert reg.register("a", "/x/a").revision > a1.revision
    for bad in ("", "-x", "a b", "x" * 200):
        with pytest.raises(ValueError, match="id"):
            reg.register(bad, "/x")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 3}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"echo": True}, "echo"),
        ({"max_tokens": -1}, "max_tokens"),
    ],
)
def test_completion_request_validation_names_the_parameter(body, param):
    with pytest.raises(ValidationError) as err:
        CompletionRequest.model_validate({"model": "m", "prompt": "p", **body})
    assert err.value.errors()[0]["loc"][0] == param


def test_sampling_params_from_requests():
    req = CompletionRequest(model="m", prompt="p", stop="x", temperature=0.0, seed=3)
    assert req.sampling_params(16) == {"max_tokens": 16, "temperature": 0.0, "top_p": 1.0, "top_k": 0,
                                       "seed": 3, "stop": ("x",), "stop_token_ids": (), "ignore_eos": False}
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=5)
    assert chat.sampling_params(16)["max_tokens"] == 5
    with pytest.raises(ValidationError):
        ChatCompletionRequest(model="m", messages=[])


def test_response_objects():
    b = ResponseBuilder("acme-1", chat=True)
    full = b.full("hi", "stop", 3, 1)
    assert full["object"] == "chat.completion" and full["usage"]["total_tokens"] == 4
    assert full["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    assert b.chunk("h", None, first=True)["choices"][0]["delta"] == {"role": "assistant", "content": "h"}
    assert b.chunk("i", "stop")["id"] == full["id"]
    c = ResponseBuilder("base", chat=False)
    assert c.chunk("x", None)["choices"][0]["text"] == "x" and c.usage_chunk(1, 2)["choices"] == []


@pytest.mark.parametrize(
    ("exc", "status", "param"),
    [
        (InvalidRequest("max_tokens", "too many"), 400, "max_tokens"),
        (QueueFull("full"), 429, None),
        (AdapterNotFound("s3://b/a", "no such key"), 404, None),
        (StorageUnavailable("s3://b/a", "timeout"), 503, None),
    ],
)
def test_replica_errors_become_openai_errors(exc, status, param):
    error = APIError.from_dict(error_dict(exc))
    response = error.response()
    assert response.status_code == status
    body = json.loads(response.body)["error"]
    assert body["param"] == param and body["message"] and body["type"]
    if status in (429, 503):
        assert int(response.headers["retry-after"]) > 0


def test_a_bug_is_not_an_api_error():
    assert error_dict(KeyError("x")) is None


def _router(**kwargs):
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID

    from router.placement import AdapterAffinityRouter

    router = AdapterAffinityRouter(deployment_id=DeploymentID(name="engine", app_name="fleet"),
                                   handle_source=DeploymentHandleSource.UNKNOWN)
    router.initialize_state(**kwargs)
    return router


def _replica(uid: str, queue_len: int = 0, resident: tuple[str, ...] = (), age_s: float = 0.0):
    # Stands in for Ray's RunningReplica (an actor): the policy reads only these fields.
    from types import SimpleNamespace

    from ray.serve._private.common import DeploymentID, ReplicaID

    replica_id = ReplicaID(unique_id=uid, deployment_id=DeploymentID(name="engine", app_name="fleet"))
    return SimpleNamespace(replica_id=replica_id,
                           routing_stats={"queue_len": queue_len, "resident_adapters": list(resident),
                                          "reported_at": time.time() - age_s})


def _request(adapter: str, request_id: str, age_s: float = 0.0):
    import time

    from ray.serve._private.common import RequestMetadata
    from ray.serve.request_router import PendingRequest

    metadata = RequestMetadata(request_id=request_id, internal_request_id=request_id, multiplexed_model_id=adapter)
    return PendingRequest(args=[], kwargs={}, metadata=metadata, created_at=time.time() - age_s)


async def _choose(router, replicas, request) -> list[list[str]]:
    return [[r.replica_id.unique_id for r in rank] for rank in await router.choose_replicas(replicas, request)]


def test_policy_prefers_homes_then_holders_and_grows_homes_after_the_wait():
    asyncio.run(_policy())


async def _policy():
    uids = ["r0", "r1", "r2"]
    order = rendezvous_order("a", uids)
    router = _router(epsilon=0.5, slack=2.0, affinity_wait_s=1.0)
    # Nobody holds it: only its home, the first replica in its order.
    assert await _choose(router, [_replica(u) for u in uids], _request("a", "1")) == [[order[0]]]
    # A request that waited affinity_wait_s for it gives the adapter a second home, the next in
    # its order, and both are offered together. The wait counts from the first offer: time
    # queued before it (in Ray's router) does not count.
    quick = _router(epsilon=0.5, slack=2.0, affinity_wait_s=0.05)
    old = _request("a", "2", age_s=2)
    assert await _choose(quick, [_replica(u) for u in uids], old) == [[order[0]]]
    await asyncio.sleep(0.06)
    assert await _choose(quick, [_replica(u) for u in uids], old) == [[order[0], order[1]]]
    assert await _choose(quick, [_replica(u) for u in uids], _request("a", "2b")) == [[order[0], order[1]]]
    # Its home goes first, then other replicas that still hold it (it spilled there once).
    holder = order[2]
    replicas = [_replica(u, resident=("a",) if u == holder else ()) for u in uids]
    assert await _choose(router, replicas, _request("a", "3")) == [[order[0]], [holder]]
    # Its first replica over the load bound (mean 4, bound 8): the next in hash order.
    replicas = [_replica(u, queue_len=12 if u == order[0] else 0) for u in uids]
    assert await _choose(router, replicas, _request("a", "4")) == [[order[1]]]
    # ...unless that count is stale (a burst that has ended).
    replicas = [_replica(u, queue_len=12 if u == order[0] else 0, age_s=5) for u in uids]
    assert await _choose(router, replicas, _request("a", "4b")) == [[order[0]]]
    # Base-model requests: two random replicas, the less loaded one is taken by Ray.
    ranks = await _choose(router, [_replica(u) for u in uids], _request("", "5"))
    assert len(ranks) == 1 and len(set(ranks[0])) == 2


def test_requests_waiting_in_the_router_count_as_load():
    asyncio.run(_waiting())


async def _waiting():
    uids = ["r0", "r1", "r2"]
    order = rendezvous_order("hot", uids)
    router = _router(epsilon=0.0, slack=1.0)
    replicas = [_replica(u) for u in uids]
    placed = [(await _choose(router, replicas, _request("hot", f"q{i}")))[0][0] for i in range(6)]
    # None is routed yet: each waits on its first choice, and the bound moves the later ones on.
    assert placed[0] == order[0] and len(set(placed)) >= 2


def test_requests_ray_picked_a_replica_for_count_there_until_it_is_done_with_them(monkeypatch):
    asyncio.run(_picked(monkeypatch))


async def _picked(monkeypatch):
    import router.placement as placement

    uids = ["r0", "r1", "r2"]
    order = rendezvous_order("hot", uids)
    router = _router(epsilon=0.0, slack=1.0)
    replicas = [_replica(u) for u in uids]
    by_id = {r.replica_id.unique_id: r for r in replicas}
    # A burst: Ray picks each request's replica at once, and the replica's acceptance (a round
    # trip) comes later. The picks so far count, so the bound moves the later ones on.
    burst = [_request("hot", f"b{i}") for i in range(6)]
    for request in burst:
        request.future.set_result(by_id[(await _choose(router, replicas, request))[0][0]])
    placed = [request.future.result().replica_id.unique_id for request in burst]
    assert placed[0] == order[0] and len(set(placed)) >= 2
    # Accepted: now in flight on the same replicas, counted once.
    for request, uid in zip(burst, placed, strict=True):
        router.on_request_routed(request, by_id[uid].replica_id, None)
    assert router._placing_on() == {}
    assert {uid: router._load(r) for uid, r in by_id.items() if router._load(r)} == Counter(placed)
    # Done: nothing is left counted, and the adapter goes home again.
    for request, uid in zip(burst, placed, strict=True):
        router.on_request_completed(by_id[uid].replica_id, request.metadata.internal_request_id)
    assert not any(router._load(r) for r in replicas)
    assert await _choose(router, replicas, _request("hot", "after")) == [[order[0]]]
    # A pick that its replica never answers (the caller went away) stops counting after a while.
    monkeypatch.setattr(placement, "PICKED_TTL_S", 0.05)
    router = _router(epsilon=0.0, slack=1.0)
    lost = _request("hot", "lost")
    assert await _choose(router, replicas, lost) == [[order[0]]]
    lost.future.set_result(by_id[order[0]])
    assert router._placing_on() == {order[0]: 1}
    await asyncio.sleep(0.06)
    assert router._placing_on() == {} and "lost" not in router._waiting


def test_a_long_wait_gives_the_hottest_waiting_adapter_another_home():
    asyncio.run(_relief())


async def _relief():
    uids = ["r0", "r1", "r2"]
    hot, cold = "hot", next(f"cold-{i}" for i in range(100)
                            if rendezvous_order(f"cold-{i}", uids)[0] == rendezvous_order("hot", uids)[0])
    home, second = rendezvous_order(hot, uids)[:2]
    router = _router(epsilon=0.5, slack=8.0, affinity_wait_s=0.05)
    replicas = [_replica(u) for u in uids]
    # Both live on one replica; three requests for the hot one and one for the cold one wait there.
    waiting_cold = _request(cold, "c0")
    for request in [_request(hot, f"h{i}") for i in range(3)] + [waiting_cold]:
        assert await _choose(router, replicas, request) == [[home]]
    await asyncio.sleep(0.06)
    # The cold request has waited too long: the hot adapter gains a home, the cold one stays.
    assert await _choose(router, replicas, waiting_cold) == [[home]]
    assert await _choose(router, replicas, _request(hot, "h-new")) == [[home, second]]
    # At most once per wait for one replica.
    assert await _choose(router, replicas, waiting_cold) == [[home]]
    assert await _choose(router, replicas, _request(hot, "h-newer")) == [[home, second]]
    # Another home only where there is room: with every slot taken, the request keeps waiting.
    router = _router(epsilon=0.5, slack=8.0, affinity_wait_s=0.05)
    for r in replicas:
        r.routing_stats["slots"] = 1
    homes = {a: (await _choose(router, replicas, _request(a, f"first-{a}")))[0] for a in (hot, "x-1", "x-2")}
    assert sorted(u for h in homes.values() for u in h) == sorted(uids)
    waiting_hot = _request(hot, "h-wait")
    assert await _choose(router, replicas, waiting_hot) == [homes[hot]]
    await asyncio.sleep(0.06)
    assert await _choose(router, replicas, waiting_hot) == [homes[hot]]


def test_homes_never_give_a_replica_more_adapters_than_slots():
    asyncio.run(_homes())


async def _homes():
    uids = ["r0", "r1", "r2"]
    adapters = [f"ad-{i}" for i in range(6)]
    # Plain hashing puts more than 2 of these on some replica: the case homes exist for.
    assert max(Counter(rendezvous_order(a, uids)[0] for a in adapters).values()) > 2
    router = _router(epsilon=0.5, slack=2.0)
    replicas = [_replica(u) for u in uids]
    for r in replicas:
        r.routing_stats["slots"] = 2
    homes = {a: (await _choose(router, replicas, _request(a, f"h-{a}")))[0][0] for a in adapters}
    assert Counter(homes.values()) == dict.fromkeys(uids, 2)
    # Each home is the first replica in the adapter's hash order that had room when it came.
    for i, a in enumerate(adapters):
        earlier = Counter(homes[b] for b in adapters[:i])
        order = rendezvous_order(a, uids)
        assert homes[a] == next(u for u in order if earlier[u] < 2)
    # Homes are sticky: asked again, each adapter goes home first.
    for i, a in enumerate(adapters):
        assert (await _choose(router, replicas, _request(a, f"again-{i}")))[0] == [homes[a]]
    # With every slot taken, a new adapter falls back to its plain hash order.
    assert (await _choose(router, replicas, _request("ad-new", "n")))[0] == [rendezvous_order("ad-new", uids)[0]]
