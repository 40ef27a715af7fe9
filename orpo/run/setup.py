"""What a run trains, loaded and prepared in the order that wastes least when something is wrong.

`set_up` is the start of every run, from Python (`ORPOTrainer(...)`) and from `orpo train` alike:

1. every input that can be checked without loading anything (`checks.check_before_loading`);
2. the process set up for its launcher (`launch.start_process`; not in a dry run planning a launched run);
3. the tokenizer (or a vision-language model's processor), then the model (a name is loaded with
   `model_init_kwargs`; what the loader refuses is one line; `--objective reward`: as a reward model, its new score
   head drawn from the run's seed and its pad token the tokenizer's where its config has none; a model object of
   the other kind is one line), LoRA applied (a target the model lacks is one line), dropout disabled and a vision tower frozen as configured, the model tagged as TRL tags it
   (`model.add_model_tags`: export.card.MODEL_TAGS, which the model card shows);
4. the data, each source through the one data path (`config.prepare_data`, or `stream_data` for --streaming).

Nothing is decided here: the plan (plan.py) decides from what this returns.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from orpo.data.images import text_tokenizer
from orpo.data.prepare import PreparedData
from orpo.data.render import TokenizedPair, ensure_chat_template
from orpo.data.stream import PairStream
from orpo.errors import OrpoError, first_line
from orpo.export.card import MODEL_TAGS
from orpo.ops.forward import causal_lm, is_encoder_decoder, is_reward_model
from orpo.ops.vision import vision_tower
from orpo.run.checks import check_before_loading
from orpo.run.launch import start_process
from orpo.train.callbacks import disable_dropout
from orpo.train.config import ORPOConfig, prepare_data, stream_data
from orpo.train.models import load_model, load_tokenizer, unpartitioned_load

logger = logging.getLogger(__name__)

Data = PreparedData | PairStream


@dataclass
class Setup:
    """A run's inputs, loaded: the model (LoRA applied), its tokenizer or processor, the prepared training and
    eval data (eval: one PreparedData, or name → PreparedData for named eval sets), the model's name as given
    (None for a model object), the LoRA config, and the data sources as given ("train", "eval": a path, a hub
    id, a Dataset, rows; the model card names them)."""

    model: torch.nn.Module
    processing_class: object
    train: Data | None
    eval: PreparedData | dict[str, PreparedData] | None
    model_name: str | None
    peft_config: object = None
    sources: dict = dataclasses.field(default_factory=dict)


def set_up(model, args: ORPOConfig, train_dataset=None, eval_dataset=None, processing_class=None,
           peft_config=None, planned_processes: int | None = None) -> Setup:
    """Steps 1-4 of the module docstring for ORPOTrainer's arguments (TRL's): `model` a name/path or a model,
    the datasets any source `prepare_data` reads (or data prepared already), `processing_class` None = the
    model's own, `peft_config` a peft config or None. `planned_processes`: None for a run in this process; N
    for a dry run planning each process of a run of N launched elsewhere (the model is then loaded whole: there
    are no ranks here for ZeRO-3 to partition it over)."""
    name = model if isinstance(model, str) else None
    check_before_loading(args, name, eval_dataset is not None, args.n_gpu, planned_processes)
    if planned_processes is None:
        start_process(args)
    if processing_class is None:
        processing_class = load_tokenizer(name or model.name_or_path, args.trust_remote_code)
    if name is not None:
        with unpartitioned_load(args.hf_deepspeed_config) if planned_processes and args.deepspeed else nullcontext():
            model = _load(name, args)
    encoder_decoder = is_encoder_decoder(model)  # the model's config, not the flag
    if args.is_encoder_decoder and not encoder_decoder:
        raise OrpoError(f"--is_encoder_decoder true: {name or type(model).__name__} is a decoder-only model (its "
                        "config's is_encoder_decoder is false); leave the flag unset, orpo reads it from the model")
    for warning in ensure_chat_template(processing_class, encoder_decoder):
        logger.warning("warning: %s", warning)
    _check_objective(model, args.objective, name)
    if args.objective == "reward":
        _set_reward_pad_token(model, processing_class)
    if hasattr(model, "add_model_tags"):  # before LoRA: a peft model reads and writes its base model's tags
        model.add_model_tags(list(MODEL_TAGS))
    if peft_config is not None:
        model = _with_lora(model, peft_config)
    if args.disable_dropout:
        disable_dropout(model)
    if args.freeze_vision_tower and (tower := vision_tower(causal_lm(model))) is not None:
        tower.requires_grad_(False)  # LoRA adapters inside it too: LoRA trains the language model
    train = prepare_source(train_dataset, processing_class, args, "train")
    evaluation = prepare_source(eval_dataset, processing_class, args, "eval")
    return Setup(model, processing_class, train, evaluation, name, peft_config,
                 {"train": train_dataset, "eval": eval_dataset})


def _load(name: str, args: ORPOConfig) -> torch.nn.Module:
    """The model `name` with `model_init_kwargs` (their dtype, TRL's way to choose it, as the dtype), kept on the
    CPU (the Trainer places it); keyword arguments the model refuses are one line."""
    kwargs = dict(args.model_init_kwargs or {})
    dtype = kwargs.pop("dtype", kwargs.pop("torch_dtype", "float32"))
    reward = args.objective == "reward"
    try:
        # a reward model's new score head is drawn from the run's seed (fork_rng: the process's stream is untouched)
        with torch.random.fork_rng(devices=[]) if reward else nullcontext():
            if reward:
                torch.manual_seed(args.seed)
            return load_model(name, dtype=dtype, trust_remote_code=args.trust_remote_code, reward=reward, **kwargs)
    except OrpoError:
        raise  # already one line (custom code without trust_remote_code among them)
    except (TypeError, ValueError, RuntimeError, AttributeError) as err:
        if not args.model_init_kwargs:
            raise
        raise OrpoError(f"--model_init_kwargs {json.dumps(args.model_init_kwargs)}: {name} cannot be loaded with "
                        f"them ({first_line(err)})") from None


def _check_objective(model, objective: str, name: str | None) -> None:
    """A model object of the other kind than --objective trains, as one line (a name is loaded as the right kind)."""
    reward = is_reward_model(model)
    if reward == (objective == "reward"):
        return
    what = name or type(causal_lm(model)).__name__
    if objective == "reward":
        raise OrpoError(f"objective 'reward' trains a reward model, and {what} is not one (a *ForSequenceClassification): "
                        "pass the model's name, or AutoModelForSequenceClassification.from_pretrained(NAME, "
                        "num_labels=1)")
    raise OrpoError(f"{what} is a sequence-classification (reward) model: train it with objective 'reward' "
                    "(--objective reward)")


def _set_reward_pad_token(model, processing_class) -> None:
    """A reward model reads each sequence's score at its last token that is not its config's pad token; where the
    config has none, the tokenizer's is written there (transformers' model refuses batches without one), so the
    saved model scores padded batches as training read them."""
    config = causal_lm(model).config
    if config.get_text_config().pad_token_id is None:
        pad = text_tokenizer(processing_class).pad_token_id
        config.pad_token_id = pad
        if config.get_text_config() is not config:
            config.get_text_config().pad_token_id = pad


def _with_lora(model, peft_config):
    """`model` with peft's adapters; a target module the model does not have, or LoRA on a head tied to the input
    embedding (merging it would change the embedding too), is one line."""
    from peft import get_peft_model

    task_type = getattr(peft_config, "task_type", None)
    if is_reward_model(model) and getattr(task_type, "value", task_type) != "SEQ_CLS" \
            and "score" not in (getattr(peft_config, "modules_to_save", None) or []):
        raise OrpoError("LoRA on a reward model must train its new score head in full: give the LoraConfig "
                        "task_type='SEQ_CLS' (peft then trains `score` whole beside the adapters)")
    targets = peft_config.target_modules or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    if "lm_head" in targets and model.config.get_text_config().tie_word_embeddings:
        raise OrpoError(f"{model.name_or_path or type(model).__name__}: lm_head shares its weight with the input "
                        "embedding (tied), so merging its LoRA adapter into the saved model would change the "
                        "embedding too; leave lm_head out of --lora_target_modules")
    try:
        return get_peft_model(model, peft_config)
    except ValueError as err:  # peft's NoMatchingPeftModuleError among them
        targets = ",".join(targets) or "(peft default)"
        raise OrpoError(f"--lora_target_modules {targets}: {first_line(err)}") from None


def prepare_source(dataset, tokenizer, args: ORPOConfig, role: str):
    """`dataset` through the one data path with the config's data fields (its split for the role: dataset_split
    for "train", eval_split otherwise); a dict of eval sets (the Trainer's named eval sets) name by name; the
    training data of --streaming as a PairStream. None stays None."""
    if dataset is None:
        return None
    if isinstance(dataset, dict):
        return {name: prepare_source(data, tokenizer, args, f"{role}_{name}") for name, data in dataset.items()}
    split = args.dataset_split if role == "train" else args.eval_split
    name = dataset if isinstance(dataset, str) else f"{role} dataset"
    if isinstance(dataset, PairStream) or (role == "train" and args.streaming):
        return dataset if isinstance(dataset, PairStream) else stream_data(args, dataset, tokenizer, split, name)
    return prepare_data(args, dataset, tokenizer, split, name=name)  # once per machine (config.prepare_data)


def trainer_data(data):
    """What the Trainer iterates of prepared data: a set's pairs, a stream itself, name → pairs for named sets."""
    if isinstance(data, dict):
        return {name: trainer_data(d) for name, d in data.items()}
    return data.pairs if isinstance(data, PreparedData) else data


def is_tokenized(dataset) -> bool:
    """Whether `dataset` is already what the Trainer iterates (TokenizedPairs, or name → TokenizedPairs)."""
    if isinstance(dataset, dict):
        return all(is_tokenized(data) for data in dataset.values())
    return isinstance(dataset, list) and all(isinstance(pair, TokenizedPair) for pair in dataset)
