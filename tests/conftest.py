import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

# Prepared-data caches of the tests (and of the commands they start) in a directory of this run, not the
# user's datasets cache: set before anything imports datasets, which reads it at import.
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="orpo-tests-datasets-")

import pytest
import torch

from orpo.commands.cli import send_import_logs_to_stderr

# What `orpo` does first for the model-loading commands: DeepSpeed (a test dependency) announces its
# accelerator on stdout when imported; tests that read a command's stdout must not see it.
send_import_logs_to_stderr()


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    """Tiny matmuls: intra-op threads only add overhead and contention. Real-model tests keep all threads."""
    if request.node.get_closest_marker("real_model"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def deepspeed_environment(tmp_path_factory):
    """DeepSpeed (skipped where it is not installed) and where it compiles its ops: DeepSpeed builds a shared-memory
    communication op with g++ at the first start on CPU (~35 s), kept for the test session (the distributed
    tests and the recipes' share it), or in $TORCH_EXTENSIONS_DIR."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed (pip install -e '.[deepspeed]')")
    if shutil.which("g++") is None:
        pytest.skip("DeepSpeed on CPU compiles an op with g++, which is not installed")
    directory = os.environ.get("TORCH_EXTENSIONS_DIR") or str(tmp_path_factory.mktemp("torch_extensions"))
    # the op is built with ninja, which pip installs beside the interpreter (or in a --target's bin)
    binaries = [str(Path(sys.executable).parent)] + [
        os.path.join(p, "bin") for p in sys.path if os.path.isfile(os.path.join(p, "bin", "ninja"))]
    return {"TORCH_EXTENSIONS_DIR": directory, "PATH": os.pathsep.join(binaries + [os.environ["PATH"]])}
