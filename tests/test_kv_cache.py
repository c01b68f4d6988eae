"""Paged KV cache: block accounting, paged attention against plain causal attention, and
no leaked blocks or pinned slots after thousands of random finishes and aborts."""

from __future__ import annotations

import random
import time

import pytest
import torch
import torch.nn.functional as F

from replica import EngineConfig, EngineCore, LoRARequest, SamplingParams
from replica.attention import AttentionMetadata, paged_attention
from replica.kv_cache import BlockManager
from replica.sequence import Sequence

pytestmark = pytest.mark.usefixtures("one_thread")


def _seq() -> Sequence:
    return Sequence(request_id="x", prompt_ids=[1], params=None, detokenizer=None, generator=None)  # type: ignore[arg-type]


def test_block_manager_grows_tables_and_frees_everything():
    bm = BlockManager(num_blocks=5, block_size=4)
    a, b = _seq(), _seq()
    bm.allocate(a, 5)  # 5 tokens -> 2 blocks
    a.num_computed = 5
    assert len(a.block_table) == 2 and bm.num_free == 3
    assert bm.blocks_needed(a, 3) == 0 and bm.blocks_needed(a, 4) == 1
    bm.allocate(b, 12)
    assert bm.num_free == 0 and not bm.can_allocate(a, 4)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.allocate(a, 4)
    assert set(a.block_table).isdisjoint(b.block_table)
    bm.free(a)
    bm.free(b)
    assert bm.num_free == 5 and a.block_table == [] and a.num_computed == 0
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 4)


# (cached tokens, new tokens) per sequence: plain prefill, prefill after a cached prefix (chunked or
# recomputed), and decode (one new token: the paged decode kernel), mixed in one step, and each alone.
@pytest.mark.parametrize("shapes", [[(0, 9), (13, 1), (6, 5), (0, 1), (2, 3)], [(13, 1), (0, 1)], [(0, 9)]])
def test_paged_attention_matches_plain_causal_attention(shapes):
    torch.manual_seed(0)
    heads, kv_heads, dim, block = 4, 2, 8, 4
    k_cache = torch.zeros(40 * block, kv_heads, dim)
    v_cache = torch.zeros_like(k_cache)
    free = list(range(40))
    random.Random(0).shuffle(free)  # scattered blocks
    full_k = [torch.randn(c + n, kv_heads, dim) for c, n in shapes]
    full_v = [torch.randn(c + n, kv_heads, dim) for c, n in shapes]
    tables = []
    for (c, n), k, v in zip(shapes, full_k, full_v, strict=True):
        table = [free.pop() for _ in range(-(-(c + n) // block))]
        tables.append(table)
        for p in range(c):  # the prefix is already in the cache
            k_cache[table[p // block] * block + p % block] = k[p]
            v_cache[table[p // block] * block + p % block] = v[p]
    q = [torch.randn(n, heads, dim) for _, n in shapes]
    meta = AttentionMetadata.build(
        tables, [c for c, _ in shapes], [n for _, n in shapes], block, torch.device("cpu")
    )
    out = paged_attention(
        torch.cat(q),
        torch.cat([k[c:] for (c, _), k in zip(shapes, full_k, strict=True)]),
        torch.cat([v[c:] for (c, _), v in zip(shapes, full_v, strict=True)]),
        k_cache,
        v_cache,
        meta,
        scale=dim**-0.5,
    )
    row = 0
    for (c, n), qi, k, v in zip(shapes, q, full_k, full_v, strict=True):
        mask = torch.ones(n, c + n, dtype=torch.bool).tril(diagonal=c)
        ref = F.scaled_dot_product_attention(
            qi.transpose(0, 1),
            k.repeat_interleave(heads // kv_heads, 1).transpose(0, 1),
            v.repeat_interleave(heads // kv_heads, 1).transpose(0, 1),
            attn_mask=mask,
        ).transpose(0, 1)
        torch.testing.assert_close(out[row : row + n], ref)
        row += n


def test_no_leaks_after_thousands_of_random_finishes_and_aborts(tiny, tmp_path_factory: pytest.TempPathFactory):
    model_dir, adapters = tiny
    cache = tmp_path_factory.mktemp("cache")
    core = EngineCore(
        EngineConfig(
            model=str(model_dir),
            adapter_cache_dir=str(cache),
            num_kv_blocks=24,
            block_size=4,
            max_loras=2,
            max_num_seqs=16,
            max_num_batched_tokens=48,
        )
    )
    loras = [
        None,
        *(LoRARequest(n, str(p)) for n, p in adapters.items()),
        LoRARequest("gone", str(cache / "nope")),
    ]
    rng = random.Random(1)
    live: list[str] = []
    counts = {"stop": 0, "length": 0, "abort": 0, "error": 0}

    def tally(results: list) -> None:
        for _, out in results:
            if isinstance(out, BaseException):
                counts["error"] += 1
            elif out.finished:
                counts[out.finish_reason] += 1

    for i in range(2000):
        params = SamplingParams(
            max_tokens=rng.randint(1, 4),
            temperature=rng.choice([0, 1.0]),
            stop_token_ids=(rng.randrange(300),),
            stop=rng.choice([(), ("e",), ("a", "o")]),  # found in the text while the next step is in flight
        )
        seq = core.make_sequence(
            [rng.randrange(1, 300) for _ in range(rng.randint(1, 12))], params, rng.choice(loras), f"r{i}"
        )
        core.add(seq)
        live.append(seq.request_id)
        if rng.random() < 0.3:  # abort a random live request, wherever it is (waiting or running)
            out = core.abort(live.pop(rng.randrange(len(live))))
            if out is not None:
                counts["abort"] += 1
        if rng.random() < 0.5:
            tally(core.step())
    deadline = time.monotonic() + 60
    while core.has_work:
        assert time.monotonic() < deadline
        tally(core.step())
        if not core.last_num_scheduled:
            time.sleep(0.005)
    assert sum(counts.values()) == 2000 and all(counts.values()), counts
    assert core.blocks.num_free == 24 and sorted(set(core.blocks._free)) == list(range(24))
    assert core.pool.num_pinned() == 0 and not core.requests
    assert not core.scheduler.waiting and not core.scheduler.running
