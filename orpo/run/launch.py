"""The process a run lives in: what the launchers (torchrun, accelerate, DeepSpeed) leave to orpo at its start
and at its end. Nothing here decides anything about training; it only lets the process start and stop cleanly."""
from __future__ import annotations

import logging
import os
import sys

from orpo.train.config import ORPOConfig


def is_launched(config: ORPOConfig) -> bool:
    """Whether a launcher (torchrun, accelerate, DeepSpeed's) started this process: it was given a local rank."""
    return config.local_rank != -1 or os.environ.get("LOCAL_RANK", "-1") != "-1"


def launched_processes(config: ORPOConfig) -> tuple[int, str]:
    """(the processes of the run this process is part of, why): its launcher's world size, or this one alone."""
    if is_launched(config):
        return config.world_size, "as launched (the launcher's WORLD_SIZE)"
    return 1, "this process alone: no launcher started it"


def start_process(config: ORPOConfig) -> None:
    """Before the model loads. DeepSpeed on CPU ranks (gloo): accelerate starts DeepSpeed's communication only for
    accelerators; left unstarted, DeepSpeed counts a world of 1 process, and ZeRO-3's model init (transformers'
    `deepspeed.zero.Init` in `from_pretrained`) rejects the batch sizes the Trainer filled in for all ranks."""
    if config.deepspeed and config.use_cpu and config.world_size > 1:
        from deepspeed import comm

        if not comm.is_initialized():
            comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)


def end_process(accelerator, world_size: int) -> None:
    """After a run has written everything: trackers finish and, under torchrun, the process group is destroyed (a
    rank that exits with its gloo/NCCL threads still running can abort: "terminate called without an active
    exception"). Even so a gloo rank still aborts in the interpreter's teardown now and then (about 1 launch in
    5 on 2 CPU cores; the thread behind it is not found), failing a run that wrote everything: a rank of a
    multi-process run therefore exits here, skipping that teardown, with exit code 0."""
    accelerator.end_training()
    if world_size > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
