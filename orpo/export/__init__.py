"""Shipping a trained model: GGUF files for llama.cpp and Ollama (`gguf.py`, `modelfile.py`), LoRA merge
(`merge.py`), the model card (`card.py`)."""
