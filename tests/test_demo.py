"""The demo model converted from the GGUF, and the shipped demo adapters merged by peft."""

from __future__ import annotations

import copy
import fcntl
import json
import threading
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from deploy import demo
from deploy.train_demo_adapters import QUESTIONS

QUESTION = "What is the capital of France?"
# Not in the adapters' training questions: the style must carry over.
HELD_OUT_QUESTION = "Why is the ocean salty?"

# French function words (elided forms like l' and d' count as "l" and "d"), none of them English.
FRENCH_WORDS = {
    "le",
    "la",
    "les",
    "l",
    "un",
    "une",
    "des",
    "du",
    "de",
    "d",
    "et",
    "est",
    "sont",
    "il",
    "ils",
    "elle",
    "elles",
    "au",
    "aux",
    "ce",
    "se",
    "sur",
    "pour",
    "avec",
    "par",
    "pas",
    "ne",
    "qui",
    "que",
    "dans",
}


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return demo.demo_model_dir()  # converts once into the user's cache; later runs find it there


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def base(model_dir: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.no_grad()
def greedy_answer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, question: str) -> str:
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    return tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)


def uppercase_ratio(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    return sum(c.isupper() for c in letters) / len(letters)


def french_ratio(text: str) -> float:
    words = [w.strip(".,;:!?«»\"'").lower() for w in text.replace("'", " ").split()]
    return sum(w in FRENCH_WORDS for w in words) / len(words)


def test_converted_folder_is_a_plain_tied_checkpoint(model_dir: Path, base: PreTrainedModel) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    with safe_open(model_dir / "model.safetensors", "pt") as weights:
        names = set(weights.keys())
        assert weights.get_tensor("model.embed_tokens.weight").dtype == demo.STORAGE_DTYPE
    assert "lm_head.weight" not in names  # stored once, tied on load
    assert len(names) == 1 + 9 * config["num_hidden_layers"] + 1  # embeddings, 9 per layer, final norm
    assert base.lm_head.weight.data_ptr() == base.model.embed_tokens.weight.data_ptr()


def test_base_model_answers_through_the_chat_template(
    base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    assert tokenizer.chat_template
    assert tokenizer.eos_token_id == base.generation_config.eos_token_id
    assert "Paris" in greedy_answer(base, tokenizer, QUESTION)


@pytest.fixture(scope="module")
def base_answer(base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> str:
    return greedy_answer(base, tokenizer, HELD_OUT_QUESTION)


STYLE_CHECKS = {
    "shouty": lambda answer, base_answer: (
        uppercase_ratio(answer) > 0.9 and uppercase_ratio(base_answer) < 0.5
    ),
    "pirate": lambda answer, base_answer: (
        answer.lower().startswith("arr") and not base_answer.lower().startswith("arr")
    ),
    "french": lambda answer, base_answer: french_ratio(answer) > 0.2 and french_ratio(base_answer) < 0.1,
}


@pytest.mark.parametrize("name", sorted(demo.DEMO_ADAPTERS))
def test_adapter_changes_the_answer_in_its_style(
    name: str, base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, base_answer: str
) -> None:
    merged = PeftModel.from_pretrained(copy.deepcopy(base), demo.DEMO_ADAPTERS[name]).merge_and_unload()
    assert HELD_OUT_QUESTION not in {q for q, _ in QUESTIONS}
    answer = greedy_answer(merged, tokenizer, HELD_OUT_QUESTION)
    assert STYLE_CHECKS[name](answer, base_answer), (name, answer, base_answer)


@pytest.mark.parametrize("name", sorted(demo.DEMO_ADAPTERS))
def test_adapter_files_are_small_peft_folders(name: str) -> None:
    folder = demo.DEMO_ADAPTERS[name]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == demo.MODEL_NAME
    assert config["peft_type"] == "LORA"
    assert (folder / "adapter_model.safetensors").stat().st_size < 2 * 1024 * 1024


def test_concurrent_call_waits_for_the_converter_and_returns_its_folder(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORAFLEET_CACHE", str(tmp_path))
    target = tmp_path / model_dir.name
    results: list[Path] = []
    with open(tmp_path / f"{model_dir.name}.lock", "w") as lock:
        # Stand in for a first process midway through converting: it holds the lock.
        fcntl.flock(lock, fcntl.LOCK_EX)
        waiter = threading.Thread(target=lambda: results.append(demo.demo_model_dir()))
        waiter.start()
        time.sleep(1.0)
        assert waiter.is_alive() and not results, "the second call must wait while the first converts"
        # The first process finishes: its complete folder appears in one rename.
        staging = tmp_path / f".{model_dir.name}-done"
        staging.mkdir()
        for file in model_dir.iterdir():
            (staging / file.name).hardlink_to(file)
        staging.rename(target)
    waiter.join(timeout=10)
    assert not waiter.is_alive()
    assert results == [target]
    # It took the first process's folder as is rather than converting again.
    assert (target / "model.safetensors").samefile(model_dir / "model.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, f"{model_dir.name}.lock"])
