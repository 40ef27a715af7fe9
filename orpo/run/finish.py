"""What follows a run's last step, from Python (`ORPOTrainer.train()`) and `orpo train` alike, as the plan's
`Finish` says:

1. the final model evaluated on the eval data (during the last step already, `FinalEvaluation`, so that the
   run's summary stays the last log record; here only where none fell on the last step);
2. a run in which no optimizer step updated the weights (every step non-finite) ends with one line, and
   nothing that claims a trained model is written;
3. the model saved in output_dir; a LoRA run's adapter merged into its base model (reloaded by name: the
   trainer's model keeps its adapters), saved as one model with the tokenizer (a base without a name or path:
   the adapter saved as it is);
4. the model card (README.md: the run's data, settings, metrics and the plan's choices; the model's tags), on the
   main process;
5. the GGUF export (with its Ollama Modelfile), where asked;
6. the finished marker (checkpoints.py), so a rerun of the same command trains nothing.
"""
from __future__ import annotations

import logging
import os
import shutil

from transformers import TrainerCallback

from orpo.errors import OrpoError
from orpo.export.card import MODEL_TAGS, card_settings, write_card
from orpo.export.merge import merge_adapter
from orpo.export.modelfile import export_for_llama_cpp
from orpo.train.checkpoints import mark_finished

logger = logging.getLogger(__name__)

ADAPTER_STAGING = ".lora-adapter"  # in output_dir: the adapter while it is merged


class FinalEvaluation(TrainerCallback):
    """At the last step, an evaluation: the final model's held-out metrics. With eval_strategy "epoch" the
    epoch's end, which the last step ends, evaluates already; a step the "steps" strategy evaluates is
    evaluated once (the flag is the same). The last step's training metrics are logged at that step, before the
    evaluation (the Trainer logs, then evaluates), so the final evaluation is the record before the run's summary,
    as in TRL (`log_history[-2]`)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True
            if args.eval_strategy != "epoch":
                control.should_evaluate = True


def finish_run(trainer, output):
    """Steps 1-6 of the module docstring for `trainer` (an ORPOTrainer after Trainer.train); returns `output`."""
    args, finish, state = trainer.args, trainer.plan.finish, trainer.state
    step = state.global_step
    if finish.final_eval and not any("eval_runtime" in r and r.get("step") == step for r in state.log_history):
        trainer.evaluate()
    if trainer.applied_steps() <= 0:
        raise OrpoError(f"no optimizer step updated the weights ({step} steps, {trainer.nonfinite_skipped} skipped as "
                        "non-finite: see the warnings above for their steps and rows): no model or model card is "
                        f"written; metrics.jsonl in {args.output_dir} shows the run")
    if finish.merge_base is None:
        trainer.save_model(args.output_dir)
    else:
        _save_merged(trainer, finish.merge_base)
    logger.info("saved the trained model and tokenizer to %s", args.output_dir)
    if trainer.is_world_process_zero():
        setup = trainer.setup
        evaluation = setup.eval if not isinstance(setup.eval, dict) else None
        tags = getattr(trainer.accelerator.unwrap_model(trainer.model), "model_tags", None) or MODEL_TAGS
        try:
            logger.info("model card: %s", write_card(
                args.output_dir, finish.base_model, card_settings(args, step, setup.peft_config),
                (setup.sources.get("train"), setup.train),
                (setup.sources.get("eval"), evaluation) if evaluation is not None else None,
                choices=trainer.plan.lines(), tags=tags))
        except OrpoError as err:  # e.g. an unreadable metrics.jsonl: the trained model is saved all the same
            logger.warning("no model card: %s", err)
        if finish.export_gguf:
            lines, notes = export_for_llama_cpp(args.output_dir, finish.export_gguf, finish.export_outtype)
            for line in notes:
                logger.warning("warning: %s", line)
            for line in lines:
                logger.info("exported %s", line)
        mark_finished(args.output_dir, step)
    trainer.accelerator.wait_for_everyone()
    return output


def _save_merged(trainer, base: str) -> None:
    """The adapter saved (every rank: a collective under sharding) into a directory inside output_dir, then
    merged into `base`, reloaded in the dtype it trained in (peft's merge_and_unload: export/merge.py), and saved
    as one model in output_dir with the processing class; the adapter's directory is removed."""
    args = trainer.args
    staging = os.path.join(args.output_dir, ADAPTER_STAGING)
    if trainer.is_world_process_zero():
        shutil.rmtree(staging, ignore_errors=True)  # a run killed while merging left it
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(staging)
    if trainer.is_world_process_zero():
        base_model = trainer.accelerator.unwrap_model(trainer.model).get_base_model()
        dtype = str(next(base_model.parameters()).dtype).removeprefix("torch.")
        merge_adapter(staging, args.output_dir, base=base, dtype=dtype, trust_remote_code=args.trust_remote_code,
                      overwrite=True)
        trainer.processing_class.save_pretrained(args.output_dir)  # a vision-language model's processor too
        trainer.after_model_saved(args.output_dir)
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
