"""Sampler and stop conditions: validation, seeded reproducibility, top-k/top-p, stop
strings across token boundaries, stop token ids, max_tokens."""

from __future__ import annotations

import pytest
import torch

from replica import EngineConfig, EngineCore, InvalidRequest, SamplingParams
from replica.detokenizer import IncrementalDetokenizer
from replica.sampling import Sampler
from replica.testing import make_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def core(tiny, tmp_path_factory: pytest.TempPathFactory) -> EngineCore:
    model_dir, _ = tiny
    cache = tmp_path_factory.mktemp("cache")
    return EngineCore(EngineConfig(model=str(model_dir), adapter_cache_dir=str(cache), num_kv_blocks=128))


def generate(
    core: EngineCore, requests: list[tuple[list[int] | str, SamplingParams]]
) -> list[tuple[list[int], str, str]]:
    """Run requests together; (token ids, text, finish reason) of each."""
    seqs = [core.make_sequence(p, params) for p, params in requests]
    for s in seqs:
        core.add(s)
    results = {s.request_id: ([], "", None) for s in seqs}
    while core.has_work:
        for seq, out in core.step():
            ids, text, _ = results[seq.request_id]
            results[seq.request_id] = (ids + out.token_ids, text + out.text, out.finish_reason)
    return [results[s.request_id] for s in seqs]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.5),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("max_tokens", 0),
        ("max_tokens", 2.5),
        ("seed", "7"),
        ("stop", [""]),
        ("stop_token_ids", [-3]),
    ],
)
def test_bad_parameters_are_rejected_naming_the_field(field, value):
    with pytest.raises(InvalidRequest) as err:
        SamplingParams(**{field: value}).validate()
    assert err.value.param == field and isinstance(err.value, ValueError)
    assert field in str(err.value)


def test_prompt_and_length_limits(core):
    limit = core.max_model_len
    with pytest.raises(InvalidRequest) as err:
        core.make_sequence([1] * limit, SamplingParams(max_tokens=1))
    assert err.value.param == "prompt"
    with pytest.raises(InvalidRequest) as err:
        core.make_sequence([1] * (limit - 4), SamplingParams(max_tokens=5))
    assert err.value.param == "max_tokens"
    core.make_sequence([1] * (limit - 4), SamplingParams(max_tokens=4))  # exactly at the limit is fine


def test_top_k_and_top_p_keep_only_their_tokens():
    sampler = Sampler()
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).repeat(400, 1)
    for params, allowed in [
        (SamplingParams(top_k=2), {0, 1}),
        (SamplingParams(top_p=0.6), {0, 1}),  # softmax: 0.53, 0.20, 0.12, ... -> 0.53 < 0.6 needs a second
        (SamplingParams(top_p=0.5), {0}),
        (SamplingParams(temperature=0), {0}),
    ]:
        gens = [sampler.new_generator(i) for i in range(400)]
        tokens = sampler(logits, [params] * 400, gens).tolist()
        assert set(tokens) == allowed, params
    # plain temperature sampling reaches every token
    gens = [sampler.new_generator(i) for i in range(400)]
    assert set(sampler(logits, [SamplingParams(temperature=2.0)] * 400, gens).tolist()) == set(range(5))


@pytest.mark.parametrize(
    ("params", "kept"),
    [(SamplingParams(temperature=1.5), 5), (SamplingParams(temperature=0.7, top_k=3), 3),
     (SamplingParams(top_p=0.8), 3),  # softmax 0.53, 0.20, 0.12: 0.73 < 0.8 needs the third
     (SamplingParams(top_k=2, top_p=0.9), 2)],  # top-p over what top-k kept: 0.73, 0.27
)  # fmt: skip
def test_sampled_frequencies_follow_the_kept_distribution(params, kept):
    """Each row's token is a draw from softmax(logits / temperature) over what top-k/top-p keep: the
    frequencies over many rows, seeded or sharing the sampler's generator, match it."""
    sampler = Sampler()
    row = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    expected = torch.zeros(5)
    expected[:kept] = (row[:kept] / params.temperature).softmax(-1)
    n = 20000
    for gens in ([sampler.new_generator(i) for i in range(n)], [sampler.new_generator(None)] * n):
        tokens = sampler(row.repeat(n, 1), [params] * n, gens)
        freq = torch.bincount(tokens, minlength=5).float() / n
        assert (freq - expected).abs().max() < 0.02, (params, freq, expected)  # 5 sigma at n = 20000


@pytest.mark.parametrize(
    "seeded",
    [SamplingParams(temperature=1.3, top_k=20, top_p=0.9, seed=5), SamplingParams(top_k=20, seed=5),
     SamplingParams(temperature=0.9, seed=5)],
)  # fmt: skip
def test_a_seeded_row_draws_the_same_tokens_in_any_batch(seeded):
    """Step after step, a seeded row sampled alone and the same row among greedy, unseeded and other
    seeded rows with other settings (so other code paths: a sort for top-p) draw the same tokens."""
    sampler = Sampler()
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0))
    others = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.5, top_p=0.5),
        SamplingParams(top_k=3),
    ]
    gen_alone, gen_batched, gen_other = (sampler.new_generator(s) for s in (5, 5, 9))
    alone, batched = [], []
    for step in range(6):
        alone += sampler(logits[step : step + 1], [seeded], [gen_alone]).tolist()
        rows = [7 - step, step, 6, 7][: 2 + step % 3]  # the seeded row second, in batches of 2 to 4
        tokens = sampler(logits[rows], [others[0], seeded, *others[1:]][: len(rows)],
                         [None, gen_batched, None, gen_other][: len(rows)])  # fmt: skip
        batched.append(int(tokens[1]))
    assert batched == alone
    assert len(set(alone)) > 1  # it does sample


def test_seeded_sampling_is_reproducible_and_batch_independent(core):
    prompt = [7, 8, 9, 10]
    seeded = SamplingParams(max_tokens=12, temperature=1.5, top_k=50, top_p=0.95, seed=1234, ignore_eos=True)
    alone = generate(core, [(prompt, seeded)])[0][0]
    noise = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)
    batch = generate(core, [([1, 2, 3], noise), (prompt, seeded), ([4, 5], noise)])
    assert batch[1][0] == alone
    other_seed = SamplingParams(
        max_tokens=12, temperature=1.5, top_k=50, top_p=0.95, seed=99, ignore_eos=True
    )
    assert generate(core, [(prompt, other_seed)])[0][0] != alone
    greedy = generate(core, [(prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))])[0][0]
    assert generate(core, [(prompt, SamplingParams(max_tokens=12, top_k=1, ignore_eos=True))])[0][0] == greedy


def test_stop_strings_across_token_boundaries_and_stop_ids(core):
    prompt = "Paris is the"
    plain_ids, plain_text, reason = generate(
        core, [(prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))]
    )[0]
    assert reason == "length" and len(plain_ids) == 24
    # a stop string that starts inside one token and ends inside a later one
    pieces = [core.tokenizer.decode(plain_ids[: i + 1]) for i in range(len(plain_ids))]
    cut = next(i for i in range(3, len(pieces)) if len(pieces[i]) - len(pieces[i - 2]) >= 3)
    start = len(pieces[cut - 2]) - 1
    stop = plain_text[start : len(pieces[cut - 1]) + 1]
    assert len(stop) >= 3 and plain_text.find(stop) == start
    ids, text, reason = generate(
        core, [(prompt, SamplingParams(max_tokens=24, temperature=0, stop=(stop, "never")))]
    )[0]
    assert reason == "stop" and text == plain_text[:start] and ids == plain_ids[: cut + 1]

    ids, _, reason = generate(
        core, [(prompt, SamplingParams(max_tokens=24, temperature=0, stop_token_ids=(plain_ids[4],)))]
    )[0]
    assert reason == "stop" and ids == plain_ids[: plain_ids.index(plain_ids[4]) + 1]

    ids, _, reason = generate(core, [(prompt, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))])[
        0
    ]
    assert reason == "length" and ids == plain_ids[:3]


class _CharTokenizer:
    """One character per token id, for exact control over token boundaries."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


def test_streamed_text_never_shows_part_of_a_stop_string():
    detok = IncrementalDetokenizer(_CharTokenizer(), [ord(c) for c in "prompt"], ("STOP",))
    streamed, out = "", []
    for ch in "abc STO and STOP xyz":
        out.append(ord(ch))
        hit = detok.update(out)
        streamed += detok.take_text(finished=hit)
        assert "STO" not in streamed or "STO " in streamed
        if hit:
            break
    assert hit and streamed == "abc STO and "


def test_incremental_text_equals_decoding_the_whole_output(tmp_path):
    """Token by token, the streamed text adds up to the full decode, also when characters span
    several byte-level tokens (emoji, accents) and the output ends mid-character."""
    tok = make_tokenizer(tmp_path)
    text = "Héllo wörld 👋🏽 — naïve café, ünïcödé 中文 text! 🎉"
    for ids in (tok(text).input_ids, tok(text).input_ids[:-1]):
        detok = IncrementalDetokenizer(tok, tok("prompt words").input_ids, ())
        streamed, out = "", []
        for i, token in enumerate(ids):
            out.append(token)
            detok.update(out)
            streamed += detok.take_text(finished=i == len(ids) - 1)
        assert streamed == tok.decode(ids, skip_special_tokens=True)
