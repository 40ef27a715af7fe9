"""`orpo export`: a trained model as a GGUF file for llama.cpp with an Ollama Modelfile beside it, and a
peft adapter merged into its base model first where that is what the directory holds.

The steps are orpo/export's (`merge.py`, `gguf.py`, `modelfile.py`); this module chains them and says
what it wrote. `orpo train --export_gguf` (run/finish.py) and `orpo demo --export_gguf` end with the same
GGUF and Modelfile writer (`modelfile.export_for_llama_cpp`).
"""
from __future__ import annotations

import logging
import tempfile

from orpo.errors import OrpoError

logger = logging.getLogger(__name__)


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
    from orpo.run.checks import check_writable_dir, check_writable_file

    if gguf is None and merged is None:
        raise OrpoError("orpo export: nothing to write; give --gguf FILE and/or --merged DIR")
    if gguf is not None:
        check_writable_file("gguf", gguf)
    if merged is not None:
        check_writable_dir("merged", merged)
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
    from orpo.export.modelfile import export_for_llama_cpp

    lines, notes = export_for_llama_cpp(model_dir, gguf, outtype, modelfile)
    for note in notes:
        logger.warning("warning: %s", note)
    print("\n".join(lines))
