"""The replica's model against transformers (+ PEFT merged adapters) on seeded tiny random
Llamas, and on the demo model; batching and preemption never change a request's tokens."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from replica import EngineCore, LoRARequest, SamplingParams
from replica.testing import make_core, make_tiny_llama

GREEDY_32 = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)


pytestmark = pytest.mark.usefixtures("one_thread")



def preload(core: EngineCore, adapters: list[LoRARequest]) -> None:
    for a in adapters:
        core.pool.request(a)
    deadline = time.monotonic() + 30
    while any(core.pool.ensure(a) != "ready" for a in adapters):
        assert time.monotonic() < deadline, "adapters did not load"
        time.sleep(0.01)


def run_to_end(core: EngineCore, seqs: list) -> dict[str, list[int]]:
    for s in seqs:
        core.add(s)
    tokens: dict[str, list[int]] = {s.request_id: [] for s in seqs}
    while core.has_work:
        for seq, out in core.step():
            assert not isinstance(out, BaseException), out
            tokens[seq.request_id].extend(out.token_ids)
    return tokens


def reference_model(model_dir: Path, adapter_dir: Path | None) -> torch.nn.Module:
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return model.eval()


# Prompts of different lengths; the adapter (or None) each request runs with.
MIXED = [
    ([3, 17, 42, 99, 7, 250, 31], "attn8"),
    ([5, 6, 7], None),
    ([11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], "all4"),
    ([200, 100, 50, 25, 12], "mlp16"),
    ([1, 2, 3, 4, 5, 6, 7, 8], None),
    ([9, 8, 7, 6], "attn8"),
    ([300, 301, 302, 303, 304, 305], "all4"),
]


def test_mixed_batch_matches_peft_logits_and_greedy_tokens(tiny, tmp_path):
    model_dir, adapter_dirs = tiny
    core = make_core(model_dir, tmp_path)
    loras = {n: LoRARequest(n, str(p)) for n, p in adapter_dirs.items()}
    preload(core, list(loras.values()))
    seqs = [core.make_sequence(p, GREEDY_32, loras.get(a) if a else None) for p, a in MIXED]

    logits: dict[str, list[torch.Tensor]] = {s.request_id: [] for s in seqs}
    forward = core.runner.forward

    def record(step):
        done, out = forward(step)
        for s, row in zip(done, out, strict=True):
            logits[s.request_id].append(row.clone())
        return done, out

    core.runner.forward = record
    first = core.scheduler.schedule
    sizes = []
    core.scheduler.schedule = lambda: (lambda out: (sizes.append(len(out.seqs)), out)[1])(first())
    tokens = run_to_end(core, seqs)
    assert sizes[0] == len(MIXED), "all requests (three adapters + base rows) share the first step"

    for seq, (prompt, name) in zip(seqs, MIXED, strict=True):
        ref = reference_model(model_dir, adapter_dirs[name] if name else None)
        ours = tokens[seq.request_id]
        with torch.no_grad():
            full = torch.tensor([prompt + ours[:-1]])
            ref_logits = ref(full).logits[0, len(prompt) - 1 :]
            generated = ref.generate(
                torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0
            )[0, len(prompt) :].tolist()
        torch.testing.assert_close(torch.stack(logits[seq.request_id]), ref_logits, rtol=1e-4, atol=1e-4)
        assert ours == generated, f"request with adapter {name}"


def test_batching_and_preemption_do_not_change_tokens(tiny, tmp_path):
    model_dir, adapter_dirs = tiny
    loras = {n: LoRARequest(n, str(p)) for n, p in adapter_dirs.items()}
    alone_core = make_core(model_dir, tmp_path)
    preload(alone_core, list(loras.values()))
    alone = []
    for prompt, name in MIXED:
        seq = alone_core.make_sequence(prompt, GREEDY_32, loras.get(name) if name else None)
        alone.append(run_to_end(alone_core, [seq])[seq.request_id])

    # 20 blocks of 4 tokens cannot hold 7 sequences of up to 43 tokens: preemption must happen;
    # a small token budget also splits prompts into chunks.
    tight = make_core(model_dir, tmp_path, num_kv_blocks=20, block_size=4, max_num_batched_tokens=16)
    preload(tight, list(loras.values()))
    seqs = [tight.make_sequence(p, GREEDY_32, loras.get(a) if a else None) for p, a in MIXED]
    together = run_to_end(tight, seqs)
    assert sum(s.num_preemptions for s in seqs) > 0
    assert [together[s.request_id] for s in seqs] == alone
    assert tight.blocks.num_free == 20 and tight.pool.num_pinned() == 0


@pytest.mark.parametrize("variant", ["llama-tied-sharded", "mistral"])
def test_config_variants_match_transformers(variant, tmp_path):
    if variant == "mistral":
        from transformers import MistralConfig, MistralForCausalLM

        from replica.testing import make_tokenizer

        make_tokenizer(tmp_path)
        cfg = MistralConfig(
            vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, head_dim=32, sliding_window=128, max_position_embeddings=512,
        )  # fmt: skip
        torch.manual_seed(1)
        MistralForCausalLM(cfg).save_pretrained(tmp_path)
    else:
        make_tiny_llama(tmp_path, seed=2, tie_word_embeddings=True, rope_scaling=None)
        model = AutoModelForCausalLM.from_pretrained(tmp_path)
        for f in tmp_path.glob("*.safetensors"):
            f.unlink()
        model.save_pretrained(tmp_path, max_shard_size="40KB")
        assert len(list(tmp_path.glob("*.safetensors"))) > 1
    core = make_core(tmp_path, tmp_path)
    prompt = [4, 8, 15, 16, 23, 42, 108]
    seq = core.make_sequence(prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    ours = run_to_end(core, [seq])[seq.request_id]
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = ref.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(prompt) :].tolist()
    assert ours == expected


def test_demo_model_greedy_chat_matches_transformers(tmp_path):
    from deploy.demo import demo_model_dir

    model_dir = demo_model_dir()
    core = make_core(model_dir, tmp_path, num_kv_blocks=64)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    questions = ["What is the capital of France?", "Name three colors.", "What is 2 + 3?"]
    for question in questions:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(prompt).input_ids
        seq = core.make_sequence(prompt, SamplingParams(max_tokens=24, temperature=0))
        core.add(seq)
        text, tokens = "", []
        while core.has_work:
            for _, out in core.step():
                text += out.text
                tokens += out.token_ids
        with torch.no_grad():
            expected = ref.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[
                0, len(ids) :
            ].tolist()
        assert tokens == expected, question
        assert text == tokenizer.decode(expected, skip_special_tokens=True)
        if question.endswith("France?"):
            assert "Paris" in text


def test_demo_adapters_in_one_batch_match_peft(tmp_path):
    from peft import PeftModel

    from deploy.demo import DEMO_ADAPTERS, demo_model_dir

    model_dir = demo_model_dir()
    core = make_core(model_dir, tmp_path, num_kv_blocks=64)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Why is the sky blue?"}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(prompt).input_ids
    loras = [LoRARequest(name, str(path)) for name, path in DEMO_ADAPTERS.items()]
    preload(core, loras)
    params = SamplingParams(max_tokens=16, temperature=0)
    seqs = [core.make_sequence(prompt, params, lora) for lora in [*loras, None]]
    tokens = run_to_end(core, seqs)
    for seq, lora in zip(seqs, [*loras, None], strict=True):
        ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        if lora is not None:
            ref = PeftModel.from_pretrained(ref, lora.uri).merge_and_unload()
        with torch.no_grad():
            expected = ref.eval().generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[
                0, len(ids) :
            ]
        assert tokens[seq.request_id] == expected.tolist(), lora
