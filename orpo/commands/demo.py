"""`orpo demo`: ORPO visibly changes a real model, offline, in a few minutes on 2 CPU cores.

The preference is verifiable: answers as a JSON object (`{"statement": "The capital of France is
Paris.", "answer": "Paris"}`, chosen) over the same answer as a sentence (rejected), and, so that the
format is not learnt at the cost of what the model knows, over the same JSON with a wrong answer
(`make_pairs`). The model, SmolLM2-135M-Instruct, answers in sentences before training. The demo
measures, on held-out questions it never trains on, the preference accuracy (share of pairs with
log_odds > 0), the mean log-odds and how many greedy answers parse as that JSON, before and after
ORPO, and counts the questions the base model answered right whose answers training kept or lost
(`states_fact`), naming each one lost.
"""
from __future__ import annotations

import json
import logging
import random
import re
import time
from pathlib import Path

logger = logging.getLogger(__name__)

SYSTEM = "Answer the question."
LEARNING_RATE = 5e-5
BETA = 0.1
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasilia", "Argentina": "Buenos Aires",
    "Peru": "Lima", "Chile": "Santiago", "Russia": "Moscow", "Poland": "Warsaw", "Greece": "Athens",
    "Turkey": "Ankara", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen",
    "Ireland": "Dublin", "Austria": "Vienna", "Hungary": "Budapest", "Thailand": "Bangkok",
    "Vietnam": "Hanoi", "Australia": "Canberra", "Cuba": "Havana", "Iran": "Tehran", "Iraq": "Baghdad",
    "Nigeria": "Abuja", "Morocco": "Rabat", "Belgium": "Brussels", "Netherlands": "Amsterdam",
    "Switzerland": "Bern", "Czechia": "Prague", "Romania": "Bucharest",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "day": "night", "happy": "sad",
    "light": "dark", "open": "closed", "early": "late", "full": "empty", "hard": "soft", "old": "young",
    "strong": "weak", "rich": "poor", "wet": "dry", "loud": "quiet", "high": "low", "long": "short",
    "thick": "thin", "heavy": "light", "clean": "dirty", "first": "last", "win": "lose", "push": "pull",
}
COLORS = {
    "a banana": "yellow", "the sky on a clear day": "blue", "grass": "green", "snow": "white",
    "coal": "black", "a ripe tomato": "red", "an orange": "orange", "a lemon": "yellow",
    "milk": "white", "a carrot": "orange", "a strawberry": "red", "a cucumber": "green",
    "chocolate": "brown", "the sun": "yellow", "a polar bear": "white", "a crow": "black",
}


def questions(rng: random.Random) -> list[tuple[str, str, str, str]]:
    """(question, answer, the answer as a sentence, a wrong answer of the same kind) for every fact, plus some
    additions: the wrong answer is another fact's (the next capital, opposite, colour), a sum off by 1 or 10."""
    facts = []
    for kind, table, ask, say in (
        ("capital", CAPITALS, "What is the capital of {}?", "The capital of {} is {}."),
        ("opposite", OPPOSITES, "What is the opposite of {}?", "The opposite of {} is {}."),
        ("color", COLORS, "What color is {}?", "{} is {}."),
    ):
        keys = list(table)
        for i, key in enumerate(keys):
            wrong = next(table[k] for k in keys[i + 1:] + keys[:i] if table[k] != table[key])
            subject = key[0].upper() + key[1:] if kind == "color" else key
            facts.append((ask.format(key), table[key], say.format(subject, table[key]), wrong))
    for _ in range(40):
        x, y = rng.randint(2, 60), rng.randint(2, 40)
        facts.append((f"What is {x} plus {y}?", str(x + y), f"{x} plus {y} equals {x + y}.",
                      str(x + y + rng.choice([-10, -1, 1, 10]))))
    return facts


def make_pairs(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows) in the conversational shape, split by question. Each training question gives
    two pairs: the format (the right answer in JSON over the same answer as a sentence) and the content (the
    right answer in JSON over a wrong one in JSON), so that ORPO teaches the format without trading away what
    the model knew; each held-out question gives its format pair."""
    rng = random.Random(seed)
    facts = questions(rng)
    rng.shuffle(facts)
    held_out = len(facts) // 5

    def row(question: str, chosen: str, rejected: str) -> dict:
        return {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}]}

    def as_json(sentence: str, answer: str) -> str:
        return json.dumps({"statement": sentence, "answer": answer})

    train = [pair for q, a, sentence, wrong in facts[held_out:]
             for pair in (row(q, as_json(sentence, a), sentence),
                          row(q, as_json(sentence, a), as_json(sentence.replace(a, wrong), wrong)))]
    rng.shuffle(train)
    return train, [row(q, as_json(sentence, a), sentence) for q, a, sentence, _ in facts[:held_out]]


def states_fact(text: str, answer: str) -> bool:
    """Whether a model's answer states the right `answer` (as a whole word or number, any case): "The capital
    of Greece is Athens." and {"answer": "Athens"} both do; "Macedonia" does not, nor does "152" for 52."""
    return re.search(rf"(?<![\w.]){re.escape(answer)}(?![\w]|\.\d)", text, flags=re.IGNORECASE) is not None


def answers_as_json(text: str) -> bool:
    try:
        value = json.loads(text.strip())
    except json.JSONDecodeError:
        return False
    return isinstance(value, dict) and set(value) == {"statement", "answer"}


def measure(model, tokenizer, held_out_pairs, held_out_rows, beta: float) -> tuple[dict, list[str]]:
    """Preference metrics on the held-out pairs, and greedy answers (prompted as in training)."""
    from orpo.commands.evaluate import evaluate_model
    from orpo.commands.generate import generate_answers
    from orpo.ops.scoring import summarize

    summary = summarize(evaluate_model(model, held_out_pairs, tokenizer.pad_token_id), beta)
    prompts = [{"messages": row["prompt"]} for row in held_out_rows]
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens=48, temperature=0.0, seed=0, batch_size=8)
    summary["json_answers"] = sum(answers_as_json(a) for a in answers) / len(answers)
    return summary, answers


def run_demo(output_dir: str = "orpo-demo", max_steps: int | None = None, seed: int = 0,
             sft_baseline: bool = False, export_gguf: str | None = None, export_outtype: str = "f16") -> dict:
    """Train SmolLM2 with ORPO on the demo pairs and print held-out metrics before and after; with
    `sft_baseline`, also train a copy with the same data, steps and learning rate but beta 0 (the
    NLL on the chosen answers alone) and print it as a column between them; with `export_gguf`, end by
    writing the aligned model as that GGUF file (`export_outtype`), with an Ollama Modelfile beside it."""
    from orpo.train.models import fetch_smollm2, load_model, load_tokenizer
    from orpo.train.config import ORPOConfig, prepare_data
    from orpo.run.trainer import ORPOTrainer

    start = time.perf_counter()
    out = Path(output_dir)
    (out / "data").mkdir(parents=True, exist_ok=True)
    train_rows, held_out_rows = make_pairs(seed)
    for name, rows in (("train", train_rows), ("held_out", held_out_rows)):
        with open(out / "data" / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)

    model_dir = fetch_smollm2()
    tokenizer = load_tokenizer(str(model_dir))

    def config(name: str, beta: float) -> ORPOConfig:
        return ORPOConfig(
            output_dir=str(out / name),
            overwrite_output_dir=True,  # the demo's own directory: a second run replaces the first
            beta=beta,
            learning_rate=LEARNING_RATE,
            lr_scheduler_type="cosine",
            warmup_steps=2,
            per_device_train_batch_size=8,
            num_train_epochs=1,
            max_steps=max_steps if max_steps is not None else -1,
            logging_steps=2,
            save_strategy="no",
            report_to="none",
            seed=seed,
            disable_tqdm=True,
        )

    runs = [("sft", 0.0)] if sft_baseline else []
    runs.append(("model", BETA))
    held_out = prepare_data(config("model", BETA), held_out_rows, tokenizer, name="demo held-out set").pairs
    print(f"demo: {len(train_rows)} training pairs, {len(held_out_rows)} held-out pairs (chosen: JSON answers; "
          f"rejected: the same answer as a sentence, or a wrong answer in JSON); data in {out / 'data'}")

    columns = {"before": measure(load_model(str(model_dir)), tokenizer, held_out, held_out_rows, BETA)}
    for name, beta in runs:
        trainer = ORPOTrainer(model=load_model(str(model_dir)), args=config(name, beta), train_dataset=train_rows,
                              processing_class=tokenizer)
        trainer.train()  # and saved, with its card (run/finish.py)
        # measured as saved: without the autocast wrapper accelerate puts on forward for mixed-precision training,
        # under which the route's fp32 probe against separate forwards would fail by bf16 rounding
        trained = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
        columns["SFT (beta 0)" if name == "sft" else "ORPO"] = measure(
            trained, tokenizer, held_out, held_out_rows, BETA)

    print("\n=== held-out preference metrics (never trained on)")
    print(f"{'':>24}" + "".join(f"{name:>14}" for name in columns))
    for key, label in (("accuracy", "preference accuracy"), ("log_odds", "mean log-odds"),
                       ("json_answers", "answers in JSON"), ("nll", "NLL (chosen)")):
        print(f"{label:>24}" + "".join(f"{summary[key]:>14.3f}" for summary, _ in columns.values()))
    answers = [column[1] for column in columns.values()]
    truth = [json.loads(row["chosen"][0]["content"])["answer"] for row in held_out_rows]
    right = {name: [states_fact(text, fact) for text, fact in zip(column, truth)]
             for name, column in zip(columns, answers)}
    known = [i for i, ok in enumerate(right["before"]) if ok]
    print(f"\n=== facts: the base model states the right answer to {len(known)} of {len(truth)} held-out questions")
    for name in list(columns)[1:]:
        kept = sum(right[name][i] for i in known)
        gained = sum(ok for i, ok in enumerate(right[name]) if i not in known)
        print(f"{name:>14}: kept {kept}, lost {len(known) - kept} of those; right on {gained} the base got wrong")
        for i in [i for i in known if not right[name][i]]:
            print(f"{'lost:':>20} {held_out_rows[i]['prompt'][-1]['content']} {answers[0][i]!r} → "
                  f"{answers[list(columns).index(name)][i]!r}")
        columns[name][0].update(facts_kept=kept, facts_lost=len(known) - kept, facts_gained=gained)
    print("\n=== greedy answers to held-out questions, " + " → ".join(columns))
    for i, row in list(enumerate(held_out_rows))[:4]:
        print(f"Q: {row['prompt'][-1]['content']}")
        for name, column in zip(columns, answers):
            print(f"   {name + ':':<14}{column[i]}")
    result = {name: summary for name, (summary, _) in columns.items()}
    if export_gguf:
        from orpo.commands.export import run_export

        run_export(str(out / "model"), export_gguf, export_outtype)
    result["seconds"] = time.perf_counter() - start
    (out / "demo_result.json").write_text(json.dumps(result, indent=2))
    print(f"\ndemo finished in {result['seconds']:.0f} s; trained model in {out / 'model'}")
    return result
