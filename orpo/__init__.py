"""orpo: exact, fast, lean ORPO training for Hugging Face causal language models."""

__version__ = "0.1.0"


def __getattr__(name):
    # ORPOConfig/ORPOTrainer import transformers; keep `import orpo` (and the CLI's --help) fast.
    if name in ("ORPOConfig", "ORPOTrainer"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(name)


__all__ = ["ORPOConfig", "ORPOTrainer", "__version__"]
