import os
import tempfile

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
