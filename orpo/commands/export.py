"""`orpo export`: a trained model as a GGUF file for llama.cpp with an Ollama Modelfile beside it, and a
peft adapter merged into its base model first where that is what the directory holds.

The steps are orpo/export's (`merge.py`, `gguf.py`, `modelfile.py`); this module chains them and says
what it wrote. `orpo train --export_gguf` and `orpo demo --export_gguf` end with the same call.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from orpo.errors import OrpoError

logger = logging.getLogger(__name__)


def megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"


def run_export(model_dir: str, gguf: str | None = None, outtype: str = "f16", modelfile: bool = True,
               merged: str | None = None, merge: bool = False, base: str | None = None) -> None:
    """Write what was asked of `model_dir` and print one line per file.

    gguf:      the GGUF file to write (its matrices in `outtype`), with an Ollama Modelfile beside it
               unless `modelfile` is False.
    merged:    `model_dir` is a peft adapter directory: write it merged into its base (`base`, default
               the adapter config's) as a safetensors model here; a GGUF is then made from that.
    merge:     the same without keeping the merged model (it goes to a temporary directory).
    """
    from orpo.export.merge import is_adapter_dir, merge_adapter

    if gguf is None and merged is None:
        raise OrpoError("orpo export: nothing to write; give --gguf FILE and/or --merged DIR")
    if (merged or merge) and not is_adapter_dir(model_dir):
        raise OrpoError(f"{model_dir}: not a peft adapter directory (no adapter_config.json), so there is nothing to "
                        "merge; export it without --merge / --merged")
    if merged:
        merge_adapter(model_dir, merged, base=base)
        print(f"{merged}: {model_dir} merged into its base model (safetensors)")
        model_dir = merged
    if gguf is None:
        return
    if merge and not merged:
        with tempfile.TemporaryDirectory(prefix="orpo-merged-") as tmp:
            merge_adapter(model_dir, tmp, base=base, overwrite=True)
            _write_gguf(tmp, gguf, outtype, modelfile)
        return
    _write_gguf(model_dir, gguf, outtype, modelfile)


def _write_gguf(model_dir: str, gguf: str, outtype: str, modelfile: bool) -> None:
    from orpo.export.gguf import export_gguf
    from orpo.export.modelfile import write_modelfile
    from orpo.train.models import load_tokenizer

    exported = export_gguf(Path(model_dir).expanduser().resolve(), gguf, outtype)
    print(f"{exported.path}: {megabytes(exported.size)}, {exported.outtype}, {exported.architecture}, "
          f"{exported.tensors} tensors" + ("" if exported.chat_template else ", no chat template"))
    if modelfile:
        path, notes = write_modelfile(exported.path, load_tokenizer(str(model_dir)))
        for note in notes:
            logger.warning("warning: %s", note)
        print(f"{path}: ollama create NAME -f {path}")
