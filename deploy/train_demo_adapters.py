"""Train the three demo LoRA adapters on the CPU: `python -m deploy.train_demo_adapters`.

- shouty: the base model's own answers, in CAPITAL LETTERS.
- pirate: the base model's own answers, opened with "Arr, matey!" and in pirate words.
- french: answers in French (written below; a 135M model cannot translate its own answers).

Each is trained with the chat template and the loss on the answer tokens only, seeded, and
saved with peft's save_pretrained (fp16, under 2 MB) into deploy/demo_adapters/<name>/.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from deploy.demo import DEMO_ADAPTERS, MODEL_NAME, demo_model_dir

# (question, the same answer in French).
QUESTIONS: tuple[tuple[str, str], ...] = (
    ("What is the capital of France?", "La capitale de la France est Paris."),
    (
        "Why is the sky blue?",
        "Le ciel est bleu parce que l'air diffuse davantage la lumière bleue du soleil que les autres couleurs.",
    ),
    (
        "How do I boil an egg?",
        "Mettez l'œuf dans l'eau bouillante pendant environ neuf minutes, puis refroidissez-le dans de l'eau froide.",
    ),
    (
        "Give me three tips for staying healthy.",
        "Mangez des fruits et des légumes, faites du sport chaque jour et dormez au moins sept heures par nuit.",
    ),
    (
        "What is photosynthesis?",
        "La photosynthèse est le processus par lequel les plantes utilisent la lumière du soleil pour "
        "fabriquer leur nourriture à partir d'eau et de dioxyde de carbone.",
    ),
    ("Who wrote Romeo and Juliet?", "Roméo et Juliette a été écrit par William Shakespeare."),
    (
        "What is the largest planet in our solar system?",
        "La plus grande planète de notre système solaire est Jupiter.",
    ),
    ("How many days are there in a week?", "Il y a sept jours dans une semaine."),
    ("What is water made of?", "L'eau est composée de deux atomes d'hydrogène et d'un atome d'oxygène."),
    (
        "Can you recommend a good book?",
        "Je vous recommande « Le Petit Prince » d'Antoine de Saint-Exupéry, un livre court et plein de sagesse.",
    ),
    ("What is the boiling point of water?", "L'eau bout à cent degrés Celsius au niveau de la mer."),
    (
        "How do plants grow?",
        "Les plantes poussent grâce à la lumière du soleil, à l'eau et aux nutriments du sol.",
    ),
    (
        "What is a computer?",
        "Un ordinateur est une machine qui traite des informations en suivant des instructions.",
    ),
    (
        "Why do we need sleep?",
        "Nous avons besoin de dormir pour reposer notre corps et notre cerveau, et pour rester en bonne santé.",
    ),
    (
        "What is the speed of light?",
        "La vitesse de la lumière est d'environ trois cent mille kilomètres par seconde.",
    ),
    (
        "How can I learn a new language?",
        "Pour apprendre une nouvelle langue, pratiquez un peu chaque jour, écoutez des locuteurs natifs "
        "et n'ayez pas peur de faire des erreurs.",
    ),
    (
        "What is the tallest mountain in the world?",
        "La plus haute montagne du monde est l'Everest, avec environ huit mille huit cents mètres.",
    ),
    (
        "Write a short poem about the moon.",
        "La lune brille dans la nuit,\ndouce lumière qui nous sourit,\nelle veille sur nos rêves\n"
        "jusqu'à ce que le jour se lève.",
    ),
    ("What do bees make?", "Les abeilles fabriquent du miel et de la cire."),
    (
        "How does a rainbow form?",
        "Un arc-en-ciel se forme quand la lumière du soleil traverse des gouttes de pluie et se divise en "
        "plusieurs couleurs.",
    ),
    (
        "What is the difference between weather and climate?",
        "La météo décrit le temps qu'il fait aujourd'hui, tandis que le climat décrit le temps moyen sur "
        "de nombreuses années.",
    ),
    ("Tell me a fun fact about cats.", "Les chats dorment environ seize heures par jour."),
    ("What is the main ingredient of bread?", "L'ingrédient principal du pain est la farine."),
    ("How many continents are there?", "Il y a sept continents sur la Terre."),
    (
        "What is gravity?",
        "La gravité est la force qui attire les objets les uns vers les autres, comme la Terre qui nous "
        "retient au sol.",
    ),
    (
        "Why is exercise important?",
        "L'exercice est important parce qu'il renforce le cœur, les muscles et le moral.",
    ),
    ("What is the capital of Japan?", "La capitale du Japon est Tokyo."),
    (
        "How do I make a cup of tea?",
        "Faites bouillir de l'eau, versez-la sur un sachet de thé et laissez infuser trois à cinq minutes.",
    ),
    (
        "What is an ocean?",
        "Un océan est une très grande étendue d'eau salée qui couvre une grande partie de la Terre.",
    ),
    ("Who painted the Mona Lisa?", "La Joconde a été peinte par Léonard de Vinci."),
    ("What is the sun?", "Le soleil est une étoile qui nous donne de la lumière et de la chaleur."),
    (
        "How can I save money?",
        "Pour économiser de l'argent, faites un budget, évitez les achats inutiles et mettez un peu de "
        "côté chaque mois.",
    ),
    ("What is music?", "La musique est l'art d'organiser des sons pour créer des mélodies et des rythmes."),
    (
        "Describe a good friend.",
        "Un bon ami est quelqu'un de fidèle et d'honnête, qui vous écoute quand vous en avez besoin.",
    ),
    ("What is the freezing point of water?", "L'eau gèle à zéro degré Celsius."),
    (
        "Why do leaves change color in autumn?",
        "Les feuilles changent de couleur en automne parce que les arbres arrêtent de produire de la chlorophylle.",
    ),
    (
        "What is the internet?",
        "Internet est un réseau mondial qui relie des millions d'ordinateurs entre eux.",
    ),
    (
        "How do airplanes fly?",
        "Les avions volent grâce à leurs ailes, qui créent une force vers le haut appelée la portance.",
    ),
    (
        "What is your favorite color?",
        "Je n'ai pas de couleur préférée, mais beaucoup de gens aiment le bleu.",
    ),
    (
        "Give me a tip for studying.",
        "Étudiez un peu chaque jour et faites des pauses régulières pour mieux retenir.",
    ),
)

# Not trained on: printed after training to show that each style carries over.
HELD_OUT = (
    "What is the capital of Italy?",
    "Why is the ocean salty?",
)

_PIRATE_WORDS = {"you": "ye", "your": "yer", "my": "me", "friend": "matey", "friends": "mateys", "yes": "aye"}
_PIRATE_RE = re.compile(r"\b(" + "|".join(_PIRATE_WORDS) + r")\b", re.IGNORECASE)


def shouty(answer: str) -> str:
    return answer.upper()


def pirate(answer: str) -> str:
    def swap(match: re.Match[str]) -> str:
        word = _PIRATE_WORDS[match.group(0).lower()]
        return word.capitalize() if match.group(0)[0].isupper() else word

    return "Arr, matey! " + _PIRATE_RE.sub(swap, answer)


@dataclass(frozen=True)
class Style:
    name: str
    # Maps (question index, base answer) to the styled answer.
    answer: Callable[[int, str], str]
    rank: int
    target_modules: tuple[str, ...]


# Ranks and targets differ on purpose: the shipped adapters then also exercise mixed ranks and
# module sets in the serving path. Each is sized to stay under 2 MB in fp16.
STYLES = (
    Style("shouty", lambda _, base: shouty(base), 8, ("q_proj", "k_proj", "v_proj", "o_proj")),
    Style("pirate", lambda _, base: pirate(base), 8, ("q_proj", "v_proj")),
    Style(
        "french", lambda i, _: QUESTIONS[i][1], 4, ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj")
    ),
)
assert {style.name for style in STYLES} == set(DEMO_ADAPTERS)


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, question: str) -> list[int]:
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )


@torch.no_grad()
def greedy_answers(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, questions: list[str], max_new_tokens: int
) -> list[str]:
    """Greedy chat answers, batched with left padding."""
    tokenizer.padding_side = "left"
    batch = tokenizer.pad(
        {"input_ids": [chat_prompt_ids(tokenizer, q) for q in questions]}, return_tensors="pt"
    )
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def whole_sentences(text: str) -> str:
    """Cut a length-truncated answer back to its last complete sentence."""
    text = text.strip()
    end = max(text.rfind(". "), text.rfind(".\n"), text.rfind("! "), text.rfind("? "))
    if text.endswith((".", "!", "?")) or end < 0:
        return text
    return text[: end + 1]


def training_batches(
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[tuple[str, str]],
    batch_size: int,
    generator: torch.Generator,
) -> list[dict[str, torch.Tensor]]:
    """One epoch of padded batches; labels are -100 except on the answer and its end-of-turn token."""
    examples = []
    for question, answer in pairs:
        prompt = chat_prompt_ids(tokenizer, question)
        reply = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        examples.append((prompt + reply, [-100] * len(prompt) + reply))
    order = torch.randperm(len(examples), generator=generator).tolist()
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start : start + batch_size]]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id)
        labels = torch.full((len(chunk), width), -100)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (ids, target) in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(ids)] = torch.tensor(target)
            attention_mask[row, : len(ids)] = 1
        batches.append({"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask})
    return batches


def answer_loss(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token loss on the answer tokens, projecting only those rows onto the vocabulary
    (the 49k-wide head over every prompt position would dominate a CPU step)."""
    hidden = model.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    targets = batch["labels"][:, 1:]
    scored = targets != -100
    logits = model.lm_head(hidden[:, :-1][scored])
    return torch.nn.functional.cross_entropy(logits, targets[scored])


def train_style(
    base: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    style: Style,
    pairs: list[tuple[str, str]],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    out_dir: Path,
) -> None:
    torch.manual_seed(seed)
    config = LoraConfig(
        r=style.rank,
        lora_alpha=2 * style.rank,
        lora_dropout=0.0,
        target_modules=list(style.target_modules),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        losses = []
        for batch in training_batches(tokenizer, pairs, batch_size, generator):
            loss = answer_loss(model.get_base_model(), batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        print(f"  {style.name} epoch {epoch + 1}/{epochs}: loss {sum(losses) / len(losses):.3f}", flush=True)
    model.eval()

    # Store fp16: half the bytes of fp32 and more mantissa than bf16 for these small values.
    for p in params:
        p.data = p.data.to(torch.float16)
    model.peft_config["default"].base_model_name_or_path = MODEL_NAME
    shutil.rmtree(out_dir, ignore_errors=True)
    model.save_pretrained(out_dir)
    for p in params:
        p.data = p.data.to(torch.float32)

    samples = dict(zip(HELD_OUT, greedy_answers(model, tokenizer, list(HELD_OUT), 32), strict=True))
    (out_dir / "README.md").write_text(_model_card(style, samples))
    print(json.dumps({"adapter": style.name, "held_out_answers": samples}, indent=2, ensure_ascii=False))
    model.unload()


def _model_card(style: Style, samples: dict[str, str]) -> str:
    lines = [
        f"# lorafleet demo adapter: {style.name}",
        "",
        f"LoRA (rank {style.rank}, modules {', '.join(style.target_modules)}) for {MODEL_NAME},",
        "trained by `python -m deploy.train_demo_adapters`. Greedy answers to questions it was not trained on:",
        "",
    ]
    lines += [f"- **{q}** {a!r}" for q, a in samples.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(DEMO_ADAPTERS), action="append", help="train only these")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    model_dir = demo_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    started = time.perf_counter()
    questions = [q for q, _ in QUESTIONS]
    base_answers = [whole_sentences(a) for a in greedy_answers(base, tokenizer, questions, 48)]
    print(f"base answers: {time.perf_counter() - started:.0f} s", flush=True)

    for style in STYLES:
        if args.only and style.name not in args.only:
            continue
        style_started = time.perf_counter()
        pairs = [
            (q, style.answer(i, a)) for i, (q, a) in enumerate(zip(questions, base_answers, strict=True))
        ]
        train_style(
            base,
            tokenizer,
            style,
            pairs,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            out_dir=DEMO_ADAPTERS[style.name],
        )
        print(f"{style.name}: {time.perf_counter() - style_started:.0f} s", flush=True)
    print(f"total: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
