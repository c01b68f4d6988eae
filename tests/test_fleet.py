"""The fleet end to end: real Ray Serve on 127.0.0.1, a tiny random model, 3 engine replicas,
20 adapters, the official openai SDK as the client."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections import Counter

import openai
import pytest
import requests

from deploy.app import engine_options
from deploy.config import load_config
from deploy.testing import make_adapters, make_model, start_fleet, stop_fleet, total
from deploy.testing import scrape as scrape_metrics
from replica import Engine, EngineConfig, LoRARequest, SamplingParams

ACME = [f"acme-{i}" for i in range(10)]
BETA = [f"beta-{i}" for i in range(10)]
ENGINE = {"device": "cpu", "dtype": "float32", "kernel_backend": "torch", "max_loras": 2, "max_cpu_loras": 4,
          "max_num_seqs": 16, "num_kv_blocks": 96, "max_model_len": 128, "max_waiting": 64}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    model_dir = make_model(root)
    adapters = make_adapters(model_dir, root / "adapters", ACME + BETA + ["spare-1", "spare-2"])
    spares = {k: adapters.pop(k) for k in ("spare-1", "spare-2")}
    config = {
        "model": {"path": str(model_dir), "name": "tiny-llama"},
        "adapters": {"static": adapters},
        "tenants": [
            {"name": "acme", "adapters": ["acme-*", "new-*"]},
            {"name": "beta", "adapters": ["beta-*"]},
            {"name": "ops", "adapters": ["*"], "admin": True},
        ],
        "engine": {**ENGINE, "adapter_cache_dir": str(root / "cache")},
        "replicas": {"num_replicas": 3, "num_cpus": 0.5},
        "router": {"routing_stats_period_s": 0.5, "default_max_tokens": 8},
    }
    f = start_fleet(root, config, ["acme", "beta", "ops"])
    f.spares = spares
    yield f
    stop_fleet()


def client(fleet, tenant: str | None = "acme", key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=fleet.base_url + "/v1", api_key=key or fleet.keys.get(tenant, "none"),
                         max_retries=0, timeout=120)


def direct_outputs(fleet, requests: list[tuple[str | list[dict], str | None]], max_tokens: int) -> list[str]:
    """What a plain Engine (no Ray) answers for the same greedy requests."""
    config = EngineConfig(**{**engine_options(load_config(fleet.config), fleet.model_dir),
                             "adapter_cache_dir": str(fleet.model_dir.parent / "direct-cache")})

    async def run() -> list[str]:
        engine = Engine(config)
        texts = []
        for prompt, adapter in requests:
            if isinstance(prompt, list):
                prompt = list(engine.tokenizer.apply_chat_template(prompt, add_generation_prompt=True,
                                                                   tokenize=True, return_dict=False))
            lora = LoRARequest(adapter, fleet.adapters[adapter]) if adapter else None
            outs = [o async for o in engine.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                            ignore_eos=True), adapter=lora)]
            texts.append("".join(o.text for o in outs))
        await engine.shutdown()
        return texts

    return asyncio.run(run())


def scrape(fleet) -> dict[tuple[str, tuple], float]:
    return scrape_metrics(fleet.metrics_url)


def test_completions_and_chat_match_the_engine(fleet):
    c = client(fleet)
    prompt = "The quick brown fox"
    messages = [{"role": "user", "content": "Paris is the capital of"}]
    cases = [("tiny-llama", None), ("acme-1", "acme-1"), ("acme-2", "acme-2")]
    expected = direct_outputs(fleet, [(p, a) for _, a in cases for p in (prompt, messages)], max_tokens=6)
    got = []
    for model, _ in cases:
        kw = {"model": model, "max_tokens": 6, "temperature": 0.0, "extra_body": {"ignore_eos": True}}
        plain = c.completions.create(prompt=prompt, **kw)
        assert plain.choices[0].finish_reason == "length"
        assert plain.usage.completion_tokens == 6 and plain.usage.prompt_tokens > 0
        streamed = "".join(ch.choices[0].text for ch in c.completions.create(prompt=prompt, stream=True, **kw))
        assert streamed == plain.choices[0].text
        chat = c.chat.completions.create(messages=messages, **kw)
        assert chat.choices[0].message.role == "assistant"
        chunks = list(c.chat.completions.create(messages=messages, stream=True,
                                                stream_options={"include_usage": True}, **kw))
        assert chunks[-1].usage.completion_tokens == 6
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == \
            chat.choices[0].message.content
        got += [plain.choices[0].text, chat.choices[0].message.content]
    assert got == expected
    # The adapters change the output (they are not no-ops), so the comparison above means something.
    assert len({got[0], got[2], got[4]}) == 3


def test_stream_ends_with_done(fleet):
    body = {"model": "acme-3", "prompt": "Berlin", "max_tokens": 3, "stream": True}
    headers = {"Authorization": f"Bearer {fleet.keys['acme']}"}
    with requests.post(fleet.base_url + "/v1/completions", json=body, headers=headers, timeout=60,
                       stream=True) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines(decode_unicode=True) if ln]
    assert lines[-1] == "data: [DONE]"
    assert all(ln.startswith("data: ") for ln in lines)


def test_models_lists_only_the_tenants_adapters(fleet):
    ids = {m.id for m in client(fleet, "beta").models.list()}
    assert ids == {"tiny-llama", *BETA}


def test_auth_matrix(fleet):
    with pytest.raises(openai.AuthenticationError):
        client(fleet, key="lf-not-a-key").completions.create(model="acme-1", prompt="x", max_tokens=1)
    r = requests.post(fleet.base_url + "/v1/completions", json={"model": "acme-1", "prompt": "x"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    # Another tenant's adapter answers exactly like one that does not exist.
    answers = []
    for model in ("acme-1", "no-such-adapter"):
        with pytest.raises(openai.NotFoundError) as err:
            client(fleet, "beta").completions.create(model=model, prompt="x", max_tokens=1)
        answers.append(err.value.body["message"].replace(model, "M"))
    assert answers[0] == answers[1]
    # Admin endpoints with a tenant key.
    headers = {"Authorization": f"Bearer {fleet.keys['acme']}"}
    r = requests.post(fleet.base_url + "/v1/adapters", json={"id": "x", "uri": "/tmp"}, headers=headers, timeout=30)
    assert r.status_code == 403
    assert requests.delete(fleet.base_url + "/v1/adapters/acme-1", headers=headers, timeout=30).status_code == 403
    assert requests.get(fleet.base_url + "/v1/adapters", headers=headers, timeout=30).status_code == 403


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"temperature": -1}, 400, "temperature"),
        ({"top_p": 0}, 400, "top_p"),
        ({"max_tokens": 0}, 400, "max_tokens"),
        ({"n": 2}, 400, "n"),
        ({"prompt": ""}, 400, "prompt"),
        ({"prompt": "word " * 400}, 400, "prompt"),
        ({"max_tokens": 1000}, 400, "max_tokens"),
        ({"model": "gpt-4"}, 404, "model"),
    ],
)
def test_bad_parameters(fleet, body, status, param):
    request = {"model": "acme-1", "prompt": "hello", "max_tokens": 2, **body}
    r = requests.post(fleet.base_url + "/v1/completions", json=request,
                   headers={"Authorization": f"Bearer {fleet.keys['acme']}"}, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"]


def replica_of(c: openai.OpenAI, model: str, max_tokens: int = 2) -> str:
    raw = c.completions.with_raw_response.create(model=model, prompt="hello", max_tokens=max_tokens,
                                                 extra_body={"ignore_eos": True})
    return raw.headers["x-lorafleet-replica"]


def test_metrics_show_the_hits_and_misses_this_test_caused(fleet):
    c = client(fleet, "beta")
    before = scrape(fleet)
    replica = replica_of(c, "beta-9")  # first use anywhere: a miss
    assert replica_of(c, "beta-9") == replica  # now resident: a GPU hit
    after = scrape(fleet)
    for name, labels in [("lorafleet_adapter_misses_total", {}), ("lorafleet_adapter_hits_total", {"tier": "gpu"})]:
        delta = total(after, name, replica=replica, **labels) - total(before, name, replica=replica, **labels)
        assert delta == 1, name
    assert total(after, "lorafleet_routing_decisions_total", decision="affine") >= 2
    assert total(after, "lorafleet_requests_total", replica=replica, status="length") >= 2
    assert total(after, "lorafleet_time_to_first_token_seconds_count", replica=replica) >= 2
    # No label value names an adapter or a tenant.
    assert not any("beta" in v for (_, labels) in after for _, v in labels)


def test_affinity_when_light_and_spreading_when_hot(fleet):
    c = client(fleet)
    # Light load: every request for one adapter lands on the same replica...
    for adapter in ("acme-4", "acme-5", "acme-6"):
        assert len({replica_of(c, adapter) for _ in range(5)}) == 1
    # ...while different adapters use different replicas.
    assert len({replica_of(c, a) for a in ACME}) >= 2
    # A hot adapter: many at once spill past its first replica's load bound. Long enough that the
    # first requests are still running when the last arrive (tiny-model steps take milliseconds);
    # the router counts a burst's requests from its picks, before the replica accepts them.
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        placed = Counter(pool.map(lambda _: replica_of(c, "acme-7", max_tokens=64), range(24)))
    assert len(placed) >= 2, placed


def test_admin_registers_replaces_and_removes_adapters(fleet):
    admin = {"Authorization": f"Bearer {fleet.keys['ops']}"}
    c = client(fleet)
    url = fleet.base_url + "/v1/adapters"
    r = requests.post(url, json={"id": "new-1", "uri": fleet.spares["spare-1"]}, headers=admin, timeout=60)
    assert r.status_code == 201, r.text
    first = c.completions.create(model="new-1", prompt="hello", max_tokens=5, temperature=0.0).choices[0].text
    r = requests.post(url, json={"id": "new-1", "uri": fleet.spares["spare-2"]}, headers=admin, timeout=60)
    assert r.json()["revision"] > 0
    second = c.completions.create(model="new-1", prompt="hello", max_tokens=5, temperature=0.0).choices[0].text
    assert second != first  # the replaced adapter's weights serve now
    bad = requests.post(url, json={"id": "new-2", "uri": str(fleet.model_dir)}, headers=admin, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "uri"
    assert requests.delete(url + "/new-1", headers=admin, timeout=30).status_code == 200
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="new-1", prompt="hello", max_tokens=1)
    assert requests.delete(url + "/new-1", headers=admin, timeout=30).status_code == 404


def test_client_disconnect_aborts_the_request(fleet):
    before = scrape(fleet)
    body = {"model": "tiny-llama", "prompt": "hello", "max_tokens": 100, "stream": True,
            "ignore_eos": True}
    with requests.post(fleet.base_url + "/v1/completions", json=body, timeout=60, stream=True,
                       headers={"Authorization": f"Bearer {fleet.keys['acme']}"}) as r:
        next(r.iter_lines())  # the first chunk arrived; now hang up
    for _ in range(60):
        after = scrape(fleet)
        aborted = total(after, "lorafleet_requests_total", status="abort") - total(
            before, "lorafleet_requests_total", status="abort")
        if aborted == 1 and total(after, "lorafleet_running_sequences") == 0:
            break
        asyncio.run(asyncio.sleep(0.5))
    assert aborted == 1
    assert total(after, "lorafleet_running_sequences") == 0


def test_health(fleet):
    assert requests.get(fleet.base_url + "/health", timeout=30).json() == {"status": "ok"}
