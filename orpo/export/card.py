"""The Hugging Face model card (README.md) of a training output directory.

Its YAML front matter is what the hub reads (base_model, library_name, license, datasets, tags,
pipeline_tag); its text is what a reader needs to trust and reuse the model: the base model, the data
and the pairs dropped from it by reason (and the lines skipped as unreadable: data.drops.DropCounts), the ORPO
settings, the final training and held-out metrics from the run's metrics.jsonl, the report's plots (by relative
path) and how to load the model.

`render_card` is pure (explicit arguments → text); `write_card` gathers the run's files and writes
README.md; `card_settings` picks the settings a card shows from a config. Every run writes its card at its
end (main process, after the final save: run/finish.py), from Python and `orpo train` alike.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from orpo.data.load import is_hub_dataset_id
from orpo.data.prepare import PreparedData
from orpo.data.stream import PairStream
from orpo.export.merge import is_adapter_dir
from orpo.train.models import is_hub_model_id
from orpo.train.report import METRICS_FILE, PLOTS, REPORT_FILE, read_metrics

CARD_FILE = "README.md"
# the tags orpo adds to the model it trains (`model.add_model_tags`, as TRL's trainers do); the card's tags are the
# model's. "orpo" is TRL's tag for the method and this library's name; TRL's "trl" tag is left out: on the hub it
# says that TRL trained the model.
MODEL_TAGS = ("orpo", "preference-optimization")
# the metrics a card shows, in this order (metrics.jsonl keys; eval records without their eval_ prefix)
CARD_METRICS = ("loss", "nll", "or_loss", "log_odds", "logps/chosen", "logps/rejected", "rewards/chosen",
                "rewards/rejected", "margin", "accuracy")
PAPER = "[ORPO](https://arxiv.org/abs/2403.07691) (Odds Ratio Preference Optimization, Hong, Lee & Thorne 2024)"


def card_settings(args, steps: int, peft_config=None) -> dict[str, object]:
    """The settings a card shows, by name, from `args` (an ORPOConfig): the ORPO fields (a reward model's run: the
    objective), the optimizer
    steps trained (`steps`), the batch and the precision; with `peft_config` (a peft LoraConfig) the LoRA
    rank, alpha, dropout and modules."""
    precision = "fp16 autocast" if args.fp16 else "bf16 autocast" if args.bf16 else "fp32"
    loss_fields = ("objective",) if args.objective == "reward" else ("beta", "nll_scope")  # a reward model: no beta
    settings = {name: getattr(args, name) for name in (
        *loss_fields, "max_length", "max_prompt_length", "max_completion_length", "learning_rate")}
    settings.update({
        "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),  # an enum
        "steps": steps,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "processes": args.world_size,
        "pairs per optimizer step": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "precision": precision,
        "seed": args.seed,
    })
    if peft_config is not None:
        modules = peft_config.target_modules
        modules = ", ".join(sorted(modules)) if isinstance(modules, (list, set, tuple)) else modules or "peft's default"
        settings["LoRA"] = (f"r {peft_config.r}, alpha {peft_config.lora_alpha}, dropout {peft_config.lora_dropout}, "
                            f"modules {modules}")
    return settings


def _number(value) -> str:
    """A metric or setting as the card prints it: floats to 4 significant digits, None as "none"."""
    return f"{value:.4g}" if isinstance(value, float) else "none" if value is None else str(value)


def _source_name(source) -> str:
    """How the card names a data source: a path or hub id as given, else what it is."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return "a datasets.Dataset" if type(source).__name__ == "Dataset" else "rows given in Python"


def _front_matter(base_model: str, hub_ids: set[str], sources: list[str], license: str | None, adapter: bool,
                  lora: bool, vision: bool = False, encoder_decoder: bool = False, tags=MODEL_TAGS,
                  reward: bool = False) -> str:
    meta = {}
    if base_model in hub_ids:
        meta["base_model"] = base_model
    meta["library_name"] = "peft" if adapter else "transformers"
    if license:
        meta["license"] = license
    datasets = [s for s in dict.fromkeys(sources) if s in hub_ids]
    if datasets:
        meta["datasets"] = datasets
    meta["tags"] = list(dict.fromkeys([*tags, *(["reward-model"] if reward else []), *(["lora"] if lora else [])]))
    meta["pipeline_tag"] = "text-classification" if reward else "image-text-to-text" if vision \
        else "text2text-generation" if encoder_decoder else "text-generation"
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def _data_section(data: dict[str, tuple[object, PreparedData]]) -> list[str]:
    lines = ["## Data", "", "| | source | rows | pairs kept | pairs dropped |", "| --- | --- | --- | --- | --- |"]
    for role, (source, prepared) in data.items():
        lines.append(f"| {role} | `{_source_name(source)}` | {prepared.rows} | {prepared.kept} | "
                     f"{prepared.drops.total} |")
    streamed = [role for role, (_, p) in data.items() if isinstance(p, PairStream)]
    if streamed:  # streamed data is counted as it is read: the rows training read, passes included
        lines += ["", f"Streamed ({', '.join(streamed)}): the rows read while training, counted as they were read."]
    reasons = sorted({r for _, p in data.values() for r in p.drops},
                     key=lambda r: (-sum(p.drops.get(r, 0) for _, p in data.values()), r))
    if reasons:
        lines += ["", "Dropped pairs by reason (counted once each as rows were read):", "",
                  "| reason | " + " | ".join(data) + " |", "| --- |" + " --- |" * len(data)]
        lines += [f"| {reason} | " + " | ".join(str(p.drops.get(reason, 0)) for _, p in data.values()) + " |"
                  for reason in reasons]
    skipped = [f"{role}: {p.drops.skipped_text()}" for role, (_, p) in data.items() if p.drops.skipped_lines]
    if skipped:  # lines of a JSON-lines file that were no rows (--skip_bad_rows): not in the rows counted
        lines += ["", "Unreadable lines skipped (--skip_bad_rows), not counted as rows: " + "; ".join(skipped) + "."]
    return lines + [""]


def _metrics_section(train_records: list[dict], eval_records: list[dict], plots: list[str],
                     report: str | None, reward: bool = False) -> list[str]:
    if not train_records and not eval_records:
        return []
    lines = ["## Results", ""]
    columns = []  # (header, record)
    if train_records:
        first, last = train_records[0], train_records[-1]
        if len(train_records) > 1:
            columns.append((f"training, first log (step {first['step']})", first))
        columns.append((f"training, final log (step {last['step']})", last))
    if eval_records:
        final_eval = eval_records[-1]
        pairs = f", {final_eval['pairs']} pairs" if "pairs" in final_eval else ""
        columns.append((f"held-out (step {final_eval['step']}{pairs})", final_eval))
    keys = [k for k in CARD_METRICS if any(k in record for _, record in columns)]
    lines += ["| metric | " + " | ".join(header for header, _ in columns) + " |", "| --- |" + " --- |" * len(columns)]
    lines += [f"| {k} | " + " | ".join(_number(record[k]) if k in record else "" for _, record in columns) + " |"
              for k in keys]
    if reward:
        lines += ["", "Training values are means over the steps since the previous log. loss is the Bradley-Terry "
                  "loss −log σ(r_chosen − r_rejected); accuracy is the share of pairs whose chosen answer gets the "
                  "higher reward (held-out: the pair accuracy on pairs the model did not train on); margin is "
                  "r_chosen − r_rejected.", ""]
    else:
        lines += ["", "Training values are means over the steps since the previous log. ORPO works when the chosen "
                  "and rejected log-probs separate and log_odds rises; accuracy is the share of pairs whose chosen "
                  "answer has the higher log odds.", ""]
    if plots:
        lines += [f"![{PLOTS[name][0]}]({name})" for name in plots] + [""]
    if report:
        lines += [f"All plots and the metrics of the run: [{report}]({report}) and `{METRICS_FILE}`.", ""]
    return lines


def _reward_usage_section(model_path: str, adapter: bool) -> list[str]:
    """How to score an answer with the reward model: the chat template renders [prompt | answer], the model's own
    call reads the score at its last non-pad token, as training did."""
    if adapter:
        load = ["from peft import AutoPeftModelForSequenceClassification", "from transformers import AutoTokenizer", "",
                f'model = AutoPeftModelForSequenceClassification.from_pretrained("{model_path}", num_labels=1)']
    else:
        load = ["from transformers import AutoModelForSequenceClassification, AutoTokenizer", "",
                f'model = AutoModelForSequenceClassification.from_pretrained("{model_path}")']
    return ["## Usage", "", "A reward model: one score per (prompt, answer), higher for the answer people prefer "
            "(Bradley-Terry: P(a preferred to b) = σ(r_a − r_b)).", "", "```python", *load,
            f'tokenizer = AutoTokenizer.from_pretrained("{model_path}")',
            'messages = [{"role": "user", "content": "Give me three tips for writing a good prompt."},',
            '            {"role": "assistant", "content": "Be specific, give context, show an example."}]',
            'inputs = tokenizer.apply_chat_template(messages, return_tensors="pt", return_dict=True)',
            "print(model(**inputs).logits[0, 0].item())",
            "```", "", f"Or judge two models' answers with it: `orpo judge --reward_model {model_path} ...` "
            "(docs/evaluation.md).", ""]


def _usage_section(model_path: str, adapter: bool, vision: bool = False, encoder_decoder: bool = False) -> list[str]:
    if vision:  # a vision-language model: its processor takes the image with the chat template's text
        if adapter:
            load = ["from peft import PeftConfig, PeftModel", "from PIL import Image",
                    "from transformers import AutoModelForImageTextToText, AutoProcessor", "",
                    f'base = PeftConfig.from_pretrained("{model_path}").base_model_name_or_path',
                    "model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base),",
                    f'                                  "{model_path}")']
        else:
            load = ["from PIL import Image", "from transformers import AutoModelForImageTextToText, AutoProcessor", "",
                    f'model = AutoModelForImageTextToText.from_pretrained("{model_path}")']
        load += [f'processor = AutoProcessor.from_pretrained("{model_path}")',
                'messages = [{"role": "user", "content": [{"type": "image"}, '
                '{"type": "text", "text": "What is in this picture?"}]}]',
                "text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)",
                'image = Image.open("picture.jpg").convert("RGB")',
                'inputs = processor(text=[text], images=[image], return_tensors="pt")',
                "output = model.generate(**inputs, max_new_tokens=256)",
                'print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))']
        note = f"Or answer a file of prompts with images: `orpo generate --model {model_path} --prompts PROMPTS.jsonl`."
        return ["## Usage", "", "```python", *load, "```", "", note, ""]
    kind = "Seq2SeqLM" if encoder_decoder else "CausalLM"  # T5, BART: AutoModelForSeq2SeqLM
    if adapter:
        load = [f"from peft import AutoPeftModelFor{kind}", "from transformers import AutoTokenizer", "",
                f'model = AutoPeftModelFor{kind}.from_pretrained("{model_path}")']
        note = (f"This directory holds a LoRA adapter. `orpo export {model_path} --merged OUT_DIR` (or "
                "`orpo.export.merge.merge_adapter`) writes the merged model, which loads without peft.")
    else:
        load = [f"from transformers import AutoModelFor{kind}, AutoTokenizer", "",
                f'model = AutoModelFor{kind}.from_pretrained("{model_path}")']
        note = f"Or talk to it in a terminal: `orpo chat {model_path}`."
    # an encoder-decoder model's output is its decoder's tokens only; a decoder-only model's continues the prompt
    answer = "output[0]" if encoder_decoder else 'output[0, inputs["input_ids"].shape[1]:]'
    return ["## Usage", "", "```python", *load,
            f'tokenizer = AutoTokenizer.from_pretrained("{model_path}")',
            'messages = [{"role": "user", "content": "Give me three tips for writing a good prompt."}]',
            "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
            "return_dict=True)",
            "output = model.generate(**inputs, max_new_tokens=256)",
            f"print(tokenizer.decode({answer}, skip_special_tokens=True))",
            "```", "", note, ""]


def render_card(name: str, base_model: str, data: dict[str, tuple[object, PreparedData]], settings: dict[str, object],
                train_records: list[dict], eval_records: list[dict], plots: list[str], report: str | None = None,
                model_path: str = ".", hub_ids: set[str] = frozenset(), license: str | None = None,
                adapter: bool = False, vision: bool = False, choices: list[str] = (),
                encoder_decoder: bool = False, tags=MODEL_TAGS, reward: bool = False) -> str:
    """The model card's text (README.md).

    name:          the card's title (e.g. the output directory's name).
    base_model:    the model training started from, as given (hub id, directory or .gguf file).
    data:          role ("training", "held-out") → (source as given, its PreparedData): rows, kept, drops.
    settings:      setting name → value (`card_settings`).
    train_records, eval_records: `read_metrics` of the run's metrics.jsonl; the first and last training
                   records and the last evaluation are shown.
    plots:         PNG file names of report.PLOTS beside the card; `report`: report.html's name, if written.
    model_path:    how the usage snippet loads the model.
    hub_ids:       which of base_model and the data sources are hub ids: only those go into the front matter
                   (the hub takes repository ids there, not local paths).
    license:       the base model's license, if known. `adapter`: the directory holds a peft adapter.
    vision:        a vision-language model (pipeline image-text-to-text; the usage snippet passes an image).
    encoder_decoder: an encoder-decoder model or its adapter (T5, BART: AutoModelForSeq2SeqLM, pipeline
                   text2text-generation; the usage snippet decodes the whole output).
    choices:       what orpo chose for the run and why, one line each (the run's plan: `Plan.lines()`).
    tags:          the front matter's tags: the trained model's `model_tags` ("lora" added for a LoRA run).
    reward:        a reward model (--objective reward: pipeline text-classification, tag reward-model; the usage
                   snippet scores an answer).
    """
    sources = [s for s, _ in data.values() if isinstance(s, str)]
    lines = [f"# {name}", ""]
    base = f"[{base_model}](https://huggingface.co/{base_model})" if base_model in hub_ids else f"`{base_model}`"
    what = "a LoRA adapter for" if adapter else "a fine-tune of"
    if reward:
        start = "A LoRA adapter for a" if adapter else "A"
        lines += [f"{start} Bradley-Terry reward model on {base}: a score head with one output, trained by `orpo` "
                  "(`--objective reward`) on preference pairs with the loss −log σ(r_chosen − r_rejected) (InstructGPT, "
                  "Ouyang et al. 2022, Eq. 1).", ""]
    else:
        lines += [f"{what[0].upper()}{what[1:]} {base}, trained with {PAPER} by `orpo`: one stage, no reference "
                  "model; the loss is the NLL of the chosen answers plus beta times the odds-ratio term.", ""]
    lines += ["## Base model", "", base + ("" if base_model in hub_ids else " (a path on the machine that trained it)"), ""]
    lines += _data_section(data)
    lines += ["## Training settings", "", "| setting | value |", "| --- | --- |"]
    lines += [f"| {k} | {_number(v)} |" for k, v in settings.items()] + [""]
    if choices:
        lines += ["## How orpo ran it", "", "Each choice orpo made for this run, and why (`orpo_plan.json`):", ""]
        lines += [f"- {choice}" for choice in choices] + [""]
    lines += _metrics_section(train_records, eval_records, plots, report, reward)
    lines += _reward_usage_section(model_path, adapter) if reward else \
        _usage_section(model_path, adapter, vision, encoder_decoder)
    lines.insert(0, _front_matter(base_model, hub_ids, sources, license, adapter, "LoRA" in settings, vision,
                                  encoder_decoder, tags, reward))
    return "\n".join(lines)


def base_license(base_model: str) -> str | None:
    """The `license` of the base model's own card, where one is on this machine (a local directory's
    README.md, or the hub cache's for a hub id; nothing is downloaded); None if unknown."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.repocard import metadata_load

    if is_hub_model_id(base_model):
        path = try_to_load_from_cache(base_model, CARD_FILE)
        path = path if isinstance(path, str) else None
    else:
        local = Path(base_model).expanduser()
        path = local / CARD_FILE if local.is_dir() else None
    if path is None or not os.path.isfile(path):
        return None
    try:
        license = (metadata_load(path) or {}).get("license")
    except (yaml.YAMLError, ValueError):
        return None
    return license if isinstance(license, str) else None


def _is_vision_language_dir(output_dir: str) -> bool:
    """Whether the directory holds a vision-language model or an adapter for one: the trainer saved a processor
    with an image processor beside it, or its config.json has a vision tower's config."""
    processor_files = ("processor_config.json", "preprocessor_config.json")
    if any(os.path.isfile(os.path.join(output_dir, name)) for name in processor_files):
        return True
    path = os.path.join(output_dir, "config.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return json.load(f).get("vision_config") is not None


def _is_encoder_decoder_dir(output_dir: str) -> bool:
    """Whether the directory holds an encoder-decoder model (config.json's is_encoder_decoder: T5, BART) or an
    adapter for one (adapter_config.json's task_type SEQ_2_SEQ_LM)."""
    for name, key, value in (("config.json", "is_encoder_decoder", True),
                             ("adapter_config.json", "task_type", "SEQ_2_SEQ_LM")):
        path = os.path.join(output_dir, name)
        if os.path.isfile(path):
            with open(path) as f:
                if json.load(f).get(key) == value:
                    return True
    return False


def _is_reward_model_dir(output_dir: str) -> bool:
    """Whether the directory holds a reward model (config.json's architectures: a *ForSequenceClassification) or an
    adapter for one (adapter_config.json's task_type SEQ_CLS)."""
    for name, key, matches in (("config.json", "architectures",
                                lambda v: any(a.endswith("ForSequenceClassification") for a in v or [])),
                               ("adapter_config.json", "task_type", lambda v: v == "SEQ_CLS")):
        path = os.path.join(output_dir, name)
        if os.path.isfile(path):
            with open(path) as f:
                if matches(json.load(f).get(key)):
                    return True
    return False


def write_card(output_dir: str, base_model: str, settings: dict[str, object], train: tuple[object, PreparedData],
               eval: tuple[object, PreparedData] | None = None, license: str | None = None,
               choices: list[str] = (), tags=MODEL_TAGS) -> str:
    """Write OUTPUT_DIR/README.md for a run that trained `base_model` on `train` (source, PreparedData) with
    `settings` (`card_settings`) and the plan's `choices`, held out `eval` if any, tagged `tags` (the model's
    `model_tags`); metrics and plots are read from the directory, the license from the base model's card when not
    given. Returns the card's path."""
    metrics = os.path.join(output_dir, METRICS_FILE)
    train_records, eval_records = read_metrics(metrics) if os.path.isfile(metrics) else ([], [])
    plots = [name for name in PLOTS if os.path.isfile(os.path.join(output_dir, name))]
    report = REPORT_FILE if os.path.isfile(os.path.join(output_dir, REPORT_FILE)) else None
    data = {"training": train, **({"held-out": eval} if eval is not None else {})}
    hub_ids = {base_model} if is_hub_model_id(base_model) else set()
    hub_ids |= {s for s, _ in data.values() if isinstance(s, str) and is_hub_dataset_id(s)}
    text = render_card(os.path.basename(os.path.abspath(output_dir)), base_model, data, settings, train_records,
                       eval_records, plots, report, model_path=output_dir, hub_ids=hub_ids,
                       license=license or base_license(base_model), adapter=is_adapter_dir(output_dir),
                       vision=_is_vision_language_dir(output_dir), choices=choices,
                       encoder_decoder=_is_encoder_decoder_dir(output_dir), tags=tags,
                       reward=_is_reward_model_dir(output_dir))
    path = os.path.join(output_dir, CARD_FILE)
    with open(path, "w") as f:
        f.write(text)
    return path
