"""orpo: exact, fast, lean ORPO training for Hugging Face causal language models."""

__version__ = "0.1.0"


def __getattr__(name):
    # ORPOConfig/ORPOTrainer import transformers; keep `import orpo` (and the CLI's --help) fast.
    if name == "ORPOConfig":
        from orpo.train.config import ORPOConfig

        return ORPOConfig
    if name == "ORPOTrainer":
        from orpo.run.trainer import ORPOTrainer

        return ORPOTrainer
    raise AttributeError(name)


__all__ = ["ORPOConfig", "ORPOTrainer", "__version__"]
