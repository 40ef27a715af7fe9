"""FSDP2 on CPU processes, as accelerate sets it up on GPUs, for the tests' torchrun launches.

accelerate (1.15) sets up FSDP only for GPU-type devices: on CPU (use_cpu, which orpo sets under torchrun without
an accelerator) its AcceleratorState drops the FSDP plugin the Trainer passes and the run trains as DDP (orpo
warns). `fsdp_on_cpu` makes the two assignments AcceleratorState makes for FSDP on a GPU when they were skipped for
the CPU; everything after that is accelerate's and the Trainer's own FSDP2 path (fully_shard, sharded checkpoints,
the full state dict for saving).

`python -m torch.distributed.run --nproc_per_node 2 tests/cpu_fsdp.py train --config RECIPE ...`: orpo's CLI in
each rank, with FSDP set up so (tests/test_recipes.py).
"""
import sys


def fsdp_on_cpu():
    """Patch AcceleratorState: with an FSDP plugin on CPU ranks, the state is FSDP's (the module docstring)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def patched(state, *args, fsdp_plugin=None, **kwargs):
        init(state, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and state.distributed_type == DistributedType.MULTI_CPU:
            state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            state.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = patched


if __name__ == "__main__":
    import torch

    from orpo.commands.cli import main

    torch.set_num_threads(1)
    fsdp_on_cpu()
    sys.exit(main(sys.argv[1:]))
