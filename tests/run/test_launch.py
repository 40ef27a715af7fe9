"""launch.py: the process start and end that the launchers leave to orpo."""
from orpo.run.launch import end_process, start_process
from orpo.train.config import ORPOConfig


class Accelerator:
    def __init__(self):
        self.ended = False

    def end_training(self):
        self.ended = True


def test_a_single_process_ends_training_and_returns(tmp_path):
    accelerator = Accelerator()
    end_process(accelerator, world_size=1)  # a multi-process rank would exit here (os._exit)
    assert accelerator.ended


def test_without_deepspeed_nothing_is_started(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # an import of it would fail
    start_process(ORPOConfig(output_dir=str(tmp_path), report_to="none"))
