"""Several processes train as one process does: DDP, FSDP2, DeepSpeed ZeRO-2/3, and two torchrun "nodes".

Every case launches RUN (below) with `python -m torch.distributed.run` on CPU (gloo, OMP_NUM_THREADS=1, fp32) on a
tiny random Llama (tests/tiny.py) and compares what the launch wrote with one process over the same global batch
(`one_process`, shared by the cases): the per-step losses and metrics (metrics.jsonl), an evaluation of 5 pairs
(its metrics and per-pair file), and the final weights as the run saved them with `trainer.save_model()`
(model.safetensors, or adapter_model.safetensors for LoRA), read back in this process. RUN also writes a probe
per rank (`probe-rank{N}.json`: the engine, the FSDP units, the output head's weight as the engine leaves it after
the model's forward and as the head's own call sees it, the launcher's environment), so a launch that silently
fell back to plain DDP fails its test. One fast case of each kind runs by default; `pytest -m slow` runs the rest.

FSDP on CPU: accelerate sets FSDP up only on GPUs; RUN makes it do so on CPU as it does on a GPU
(tests/cpu_fsdp.py), and everything after that is accelerate's and the Trainer's own FSDP2 path.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from orpo.train.checkpoints import COMPLETE_MARKER
from orpo.train.report import METRICS_FILE

REPO = Path(__file__).resolve().parents[2]
PAGE = REPO / "docs" / "distributed.md"
STEP_KEYS = ("loss", "nll", "or_loss", "log_odds", "accuracy", "tokens")
EVAL_KEYS = ("eval_pairs", "eval_accuracy", "eval_log_odds", "eval_nll", "eval_loss")

RUN = r'''
import json, os, signal, sys
import torch
import transformers
from orpo import ORPOConfig, ORPOTrainer
from orpo.data.render import TokenizedPair
from cpu_fsdp import fsdp_on_cpu
from tiny import VOCAB, chatml_tokenizer, tiny_llama


out, batch, accumulation, spec = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
torch.set_num_threads(1)
if not spec.get("accelerate_as_is"):
    fsdp_on_cpu()  # acts only where an FSDP plugin is given (fsdp_config, or accelerate launch with an FSDP config)
g = torch.Generator().manual_seed(0)
ids = lambda n: torch.randint(3, VOCAB, (n,), generator=g).tolist()
pairs = [TokenizedPair([1] + ids(2 + i % 5), ids(1 + i % 3), ids(1 + (i * 7) % 4), i) for i in range(12)]
settings = dict(output_dir=out, max_steps=3, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
                report=False, per_device_eval_batch_size=2, save_eval_pairs=True,  # no use_cpu: orpo sets it under torchrun
                bf16=False)  # fp32, whatever the CPU: the comparisons are to 1e-5
args = ORPOConfig(**{**settings, **spec.get("args", {})})
assert args.world_size == int(os.environ.get("WORLD_SIZE", "1"))
peft_config = None
if spec.get("lora"):
    from peft import LoraConfig

    peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "lm_head"], task_type="CAUSAL_LM")
model = tiny_llama(tied=spec.get("tied", True))
if spec.get("reward"):  # --objective reward: the same decoder with a score head of one output
    from orpo.train.models import unpartitioned_load

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**model.config.to_dict(), "num_labels": 1})
    with unpartitioned_load(getattr(args, "hf_deepspeed_config", None)):  # built whole, as tiny_llama is (its decoder: from_config)
        model = transformers.LlamaForSequenceClassification(config)
trainer = ORPOTrainer(model=model, args=args, train_dataset=pairs,
                      processing_class=chatml_tokenizer(), peft_config=peft_config)


def describe(weight):
    local = weight.to_local() if hasattr(weight, "to_local") else weight  # a DTensor: this rank's shard
    return f"{type(weight).__name__}{list(local.shape)}"


probe = {"after_forward": set(), "in_head": set(), "environment": {name: os.environ.get(name) for name in (
    "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "RANK")}}


class Probe(transformers.TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        from torch.distributed.fsdp import FSDPModule

        engine = trainer.model_wrapped  # DDP, the FSDP2 model itself, or DeepSpeed's engine
        model = trainer.accelerator.unwrap_model(engine)
        head = model.get_output_embeddings() or model.score  # a reward model's score head
        # registered after the engines' own hooks, so they see the weight as the engine leaves it
        head.register_forward_pre_hook(lambda module, inputs: probe["in_head"].add(describe(module.weight)))
        model.register_forward_hook(lambda module, inputs, output: probe["after_forward"].add(describe(head.weight)))
        probe.update(engine=type(engine).__name__, distributed_type=str(trainer.accelerator.distributed_type),
                     fsdp_units=[name for name, module in model.named_modules() if isinstance(module, FSDPModule)],
                     first_step=state.global_step, steps_trained=0)

    def on_step_end(self, args, state, control, **kwargs):
        probe["steps_trained"] += 1


class Kill(transformers.TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == spec["kill_at"] and args.process_index == 0:
            os.kill(os.getpid(), signal.SIGKILL)  # rank 0 dies at the start of the next step: no cleanup at all


trainer.add_callback(Probe())
if "kill_at" in spec:
    trainer.add_callback(Kill())
trainer.train(resume_from_checkpoint="latest" if spec.get("resume") else None)
# 5 eval pairs, 2 per batch: under 2 ranks the last batch is filled with repeated pairs (even_batches)
trainer.evaluate(eval_dataset=pairs[:5])
trainer.save_model()
with open(os.path.join(out, f"probe-rank{args.process_index}.json"), "w") as f:
    json.dump({k: sorted(v) if isinstance(v, set) else v for k, v in probe.items()}, f)
trainer.accelerator.end_training()  # destroys the process group: without it a rank can abort at exit
'''


class Run:
    """What one launch wrote into `out`."""

    def __init__(self, out: Path, result: subprocess.CompletedProcess):
        self.out, self.result = out, result

    @property
    def records(self):
        return [json.loads(line) for line in (self.out / METRICS_FILE).read_text().splitlines()]

    @property
    def steps(self):
        return [r for r in self.records if "margin" in r]

    @property
    def summary(self):
        (summary,) = [r for r in self.records if "train_loss" in r]
        return summary

    @property
    def evaluation(self):
        (evaluation,) = [r for r in self.records if "eval_runtime" in r]
        pairs = [json.loads(line) for line in (self.out / "eval_pairs.jsonl").read_text().splitlines()]
        return evaluation, pairs[:-1]

    @property
    def weights(self):
        for name in ("model.safetensors", "adapter_model.safetensors"):
            if (self.out / name).is_file():
                return load_file(str(self.out / name))
        raise AssertionError(f"{self.out}: no saved model; stderr: {self.result.stderr[-3000:]}")

    def probe(self, rank=0):
        return json.loads((self.out / f"probe-rank{rank}.json").read_text())


def _environment(extra=None):
    path = [str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]  # the tree under test first
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p), "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", **(extra or {})}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(processes):
    """One torchrun on this machine; --standalone: a free port for each launch (a fixed port can still be held
    by the previous launch)."""
    return [[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]]


def two_nodes():
    """Two torchrun agents as two machines would start them (one process each), meeting at a c10d rendezvous."""
    endpoint = f"127.0.0.1:{_free_port()}"
    return [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank",
             str(node), "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "orpo-test"]
            for node in (0, 1)]


def _start(commands, env, logs: Path, timeout=600) -> subprocess.CompletedProcess:
    """The launchers side by side (their output into files: a full pipe of one could stall the other), each in
    a session of its own, so that one that outlives `timeout` seconds is ended with all its workers."""
    processes, outputs = [], [(logs.with_name(f"{logs.name}.{i}.out"), logs.with_name(f"{logs.name}.{i}.err"))
                              for i in range(len(commands))]
    try:
        for command, (stdout, stderr) in zip(commands, outputs):
            with open(stdout, "w") as out, open(stderr, "w") as err:
                processes.append(subprocess.Popen(command, stdout=out, stderr=err, env=env, start_new_session=True))
        codes = [process.wait(timeout=timeout) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    return subprocess.CompletedProcess(commands, max(abs(code) for code in codes),
                                       "".join(o.read_text() for o, _ in outputs), "".join(e.read_text() for _, e in outputs))


def launch(out: Path, spec=None, launchers=(), batch=4, accumulation=1, env=None, killed=False) -> Run:
    """RUN in `out` with `launchers` (each a command prefix; none: one plain process), `batch` pairs per
    micro-batch per rank; `killed`: the run is expected to die (spec kill_at)."""
    spec = spec or {}
    script = out.parent / "run.py"
    script.write_text(RUN)
    arguments = [str(script), str(out), str(batch), str(accumulation), json.dumps(spec)]
    commands = [list(prefix) + arguments for prefix in launchers] or [[sys.executable] + arguments]
    if not spec.get("resume"):
        shutil.rmtree(out, ignore_errors=True)
    result = _start(commands, _environment(env), out.parent / f"{out.name}-launch")
    if killed:
        assert result.returncode != 0, "the run was to be killed"
        return Run(out, result)
    finished = (out / "eval_pairs.jsonl").is_file() and (out / "probe-rank0.json").is_file()
    # A gloo rank sometimes aborts while the interpreter shuts down, after the run has written everything
    # ("terminate called without an active exception", ~1 launch in 5 on 2 cores, cause unknown): the run
    # itself is complete, so its outputs are used (a relaunch would resume a finished run: RunFinished);
    # any other failure fails the test.
    shutdown_abort = finished and "terminate called without" in result.stderr
    assert result.returncode == 0 or shutdown_abort, result.stderr[-3000:]
    return Run(out, result)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The one-process run of a model kind, 4 pairs per step, launched once per module and kind."""
    runs, root = {}, tmp_path_factory.mktemp("one_process")

    def get(kind="tied"):
        if kind not in runs:
            spec = {"tied": kind == "tied", "lora": kind == "lora"}
            runs[kind] = launch(root / kind, spec)
        return runs[kind]

    return get


def assert_same_run(run: Run, reference: Run, name: str, rel=1e-5):
    """Same per-step losses and metrics, same evaluation (each pair once), same final weights, each within
    `rel` relative (weights: the largest difference of a tensor against its largest entry)."""
    steps, expected = run.steps, reference.steps
    assert [r["step"] for r in steps] == [r["step"] for r in expected] == [1, 2, 3], name
    for key in STEP_KEYS:
        assert [r[key] for r in steps] == pytest.approx([r[key] for r in expected], rel=rel, abs=1e-6), (name, key)
    (evaluation, pairs), (expected_evaluation, expected_pairs) = run.evaluation, reference.evaluation
    for key in EVAL_KEYS:
        assert evaluation[key] == pytest.approx(expected_evaluation[key], rel=rel, abs=1e-6), (name, key)
    assert [p["index"] for p in pairs] == [p["index"] for p in expected_pairs] == [0, 1, 2, 3, 4], name
    for got, want in zip(pairs, expected_pairs):
        assert got["log_odds"] == pytest.approx(want["log_odds"], rel=rel, abs=1e-6), name
    assert_same_weights(run.weights, reference.weights, name, rel)


def assert_same_weights(weights, expected, name, rel=1e-5):
    assert set(expected) <= set(weights), (name, sorted(set(expected) - set(weights)))
    for key, want in expected.items():
        error = (weights[key] - want).abs().max() / want.abs().max().clamp_min(1e-12)
        assert error <= rel, f"{name}: {key} differs by {error:.2e} of its largest entry"


def test_two_ranks_equal_one_process_and_gradient_accumulation(tmp_path, one_process):
    """torchrun with 2 CPU (gloo) ranks × 2 pairs == 1 process × 4 pairs == 1 process × 2 pairs ×
    2 accumulation steps: same per-step losses and metrics, same final weights (AdamW, fp32).
    Then the same evaluation of 5 pairs: under DDP each pair counts once (the pair even_batches
    repeats on rank 1 is not counted), so the metrics and the per-pair file are those of one process."""
    reference = one_process()
    for name, launchers, batch, accumulation in (("ddp", torchrun(2), 2, 1), ("ga2", (), 2, 2)):
        run = launch(tmp_path / name, {}, launchers, batch, accumulation)
        assert_same_run(run, reference, name)
        assert run.probe()["engine"] == ("DistributedDataParallel" if launchers else "LlamaForCausalLM"), name
    # train_loss, the mean step loss: logged every 2 of 3 steps, step 3 reaches the summary unlogged (as
    # transformers adds it: from rank 0 alone); orpo's is still the mean over the 3 steps of both ranks
    steps = reference.steps
    assert reference.summary["train_loss"] == pytest.approx(sum(r["loss"] for r in steps) / len(steps), rel=1e-6)
    run = launch(tmp_path / "ddp-log2", {"args": {"logging_steps": 2}}, torchrun(2), 2, 1)
    assert run.summary["train_loss"] == pytest.approx(reference.summary["train_loss"], rel=1e-5)


def assert_same_reward_run(run: Run, reference: Run, name: str):
    """assert_same_run for --objective reward: its step metrics, its evaluation and per-pair rewards, its weights."""
    steps, expected = run.steps, reference.steps
    assert [r["step"] for r in steps] == [r["step"] for r in expected] == [1, 2, 3], name
    for key in ("loss", "accuracy", "margin", "rewards/chosen", "rewards/rejected", "tokens"):
        assert [r[key] for r in steps] == pytest.approx([r[key] for r in expected], rel=1e-5, abs=1e-6), (name, key)
    (evaluation, pairs), (expected_evaluation, expected_pairs) = run.evaluation, reference.evaluation
    for key in ("eval_pairs", "eval_accuracy", "eval_margin", "eval_loss"):
        assert evaluation[key] == pytest.approx(expected_evaluation[key], rel=1e-5, abs=1e-6), (name, key)
    assert [p["index"] for p in pairs] == [0, 1, 2, 3, 4], name
    assert [p["reward_chosen"] for p in pairs] == pytest.approx([p["reward_chosen"] for p in expected_pairs], rel=1e-5)
    assert "score.weight" in reference.weights
    assert_same_weights(run.weights, reference.weights, name)


REWARD = {"reward": True, "args": {"objective": "reward"}}


@pytest.fixture(scope="module")
def one_process_reward(tmp_path_factory):
    """The one-process run of a reward model (--objective reward), 4 pairs per step."""
    return launch(tmp_path_factory.mktemp("one_process_reward") / "run", REWARD)


def test_a_reward_model_on_two_ranks_equals_one_process(tmp_path, one_process_reward):
    """--objective reward under torchrun with 2 CPU ranks x 2 pairs == 1 process x 4 pairs: the Bradley-Terry loss is
    a mean over the step's pairs of all ranks (as ORPO's odds-ratio term), so the per-step losses and metrics, the
    held-out evaluation (each pair once) and the final weights are the same."""
    run = launch(tmp_path / "ddp", REWARD, torchrun(2), 2, 1)
    assert run.probe()["engine"] == "DistributedDataParallel"
    assert_same_reward_run(run, one_process_reward, "reward ddp")


@pytest.mark.slow
def test_a_reward_model_under_fsdp2_with_its_score_head_a_unit_of_its_own(tmp_path, one_process_reward):
    """FSDP2, every Linear a unit that reshards after forward: the score head's weight is a shard outside its call,
    and the reward head runs as that call (it sees the whole weight); the run equals one process."""
    spec = {"reward": True, "args": {"objective": "reward", **fsdp_args(
        transformer_layer_cls_to_wrap=["LlamaDecoderLayer", "Linear"])}}
    run = launch(tmp_path / "fsdp2", spec, torchrun(2), batch=2)
    probe = run.probe()
    assert probe["engine"].startswith("FSDP") and "score" in probe["fsdp_units"], probe
    assert probe["in_head"] == ["Parameter[1, 32]"] and probe["after_forward"] == ["DTensor[1, 32]"], probe
    assert_same_reward_run(run, one_process_reward, "reward fsdp2")


def test_two_nodes_equal_one_process(tmp_path, one_process):
    """Two torchrun agents, `--nnodes 2 --nproc_per_node 1 --node_rank 0|1` with a c10d rendezvous on a free
    port (what two machines run, docs/distributed.md: several machines): one process per "node", the result of one process."""
    run = launch(tmp_path / "nodes", {}, two_nodes(), batch=2)
    assert_same_run(run, one_process(), "two nodes")
    probes = [run.probe(rank) for rank in (0, 1)]
    for probe in probes:
        assert probe["engine"] == "DistributedDataParallel", probe
        environment = probe["environment"]
        assert (environment["WORLD_SIZE"], environment["LOCAL_WORLD_SIZE"], environment["GROUP_WORLD_SIZE"]) == (
            "2", "1", "2"), environment
    assert {probe["environment"]["GROUP_RANK"] for probe in probes} == {"0", "1"}  # one rank on each node


@pytest.mark.slow
def test_two_machines_through_accelerate_launch_with_the_documented_config(tmp_path, one_process):
    """Two `accelerate launch --config_file` with the several-machines config of docs/distributed.md, each with its own
    --machine_rank and this machine's address and a free port in place of the page's: the result of one process."""
    config = tmp_path / "multi.yaml"
    config.write_text(page_block("yaml", "num_machines: 2"))
    port = str(_free_port())
    launchers = [[sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes",
                  "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", port]
                 for rank in (0, 1)]
    run = launch(tmp_path / "machines", {}, launchers, batch=2)
    assert_same_run(run, one_process(), "accelerate two machines")
    probes = [run.probe(rank) for rank in (0, 1)]
    assert [p["engine"] for p in probes] == ["DistributedDataParallel"] * 2
    assert {p["environment"]["LOCAL_WORLD_SIZE"] for p in probes} == {"1"}
    assert {p["environment"]["GROUP_RANK"] for p in probes} == {"0", "1"}


# --- FSDP2 ---------------------------------------------------------------------------------------------------


def page_block(language: str, containing: str) -> str:
    """The one fenced `language` block that contains `containing`: of docs/distributed.md: the configs it shows are the
    ones these tests run."""
    blocks = re.findall(rf"^```{language}\n(.*?)^```$", PAGE.read_text(), flags=re.M | re.S)
    found = [block for block in blocks if containing in block]
    assert len(found) == 1, f"docs/distributed.md: {len(found)} ```{language} blocks contain {containing!r}"
    return found[0]


def page_fsdp_config() -> dict:
    """docs/distributed.md (FSDP2): the fsdp.json passed as --fsdp_config."""
    return json.loads(page_block("json", '"fsdp_version"'))


def fsdp_args(**config):
    return {"fsdp": True, "fsdp_config": {**page_fsdp_config(), **config}}


def assert_fsdp2(run: Run, head_resharded: bool):
    """The model was sharded by FSDP2 (not silently DDP); the head's own call saw its whole weight; after the model's
    forward the head's weight is this rank's shard again (`head_resharded`: a unit that reshards after forward) or
    still gathered (accelerate's [norm, head] unit, which keeps it until backward)."""
    probe = run.probe()
    assert probe["engine"].startswith("FSDP") and probe["distributed_type"] == "DistributedType.FSDP", probe
    units = [name.removeprefix("base_model.model.") for name in probe["fsdp_units"]]  # peft's prefix
    assert {"lm_head", "model.layers.0", "model.layers.1"} <= set(units), probe
    assert probe["in_head"] == ["Parameter[64, 32]"], probe
    expected = "DTensor[32, 32]" if head_resharded else "Parameter[64, 32]"
    assert probe["after_forward"] == [expected], probe


def test_fsdp2_sharded_checkpoint_sigkill_resume_equals_one_process(tmp_path, one_process):
    """FSDP2 with the --fsdp_config of docs/distributed.md (decoder layers as units, reshard after forward, sharded
    checkpoints), 2 ranks × 2 pairs, tied embeddings: rank 0 is SIGKILLed at the start of step 3, after
    checkpoint-2 is complete; the same run relaunched with resume_from_checkpoint="latest" loads the sharded
    checkpoint and ends as one process over the 3 steps does: the losses of steps 1–2 (before the kill) and 3
    (after the resume), the evaluation, and the final weights, which are one consolidated model.safetensors
    that from_pretrained loads in one process."""
    import transformers

    out = tmp_path / "fsdp"
    spec = {"args": {**fsdp_args(), "save_strategy": "steps", "save_steps": 1}, "kill_at": 2}
    killed = launch(out, spec, torchrun(2), batch=2, killed=True)
    checkpoint = out / "checkpoint-2"
    assert (checkpoint / COMPLETE_MARKER).is_file(), killed.result.stderr[-3000:]
    # sharded: torch.distributed.checkpoint files of both ranks, no consolidated weights
    assert sorted(p.name for p in (checkpoint / "pytorch_model_fsdp_0").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not list(checkpoint.glob("*.safetensors")) and not (out / "checkpoint-3").exists()
    assert [r["step"] for r in killed.steps] == [1, 2]

    resumed = launch(out, {"args": spec["args"], "resume": True}, torchrun(2), batch=2)
    assert (resumed.probe()["first_step"], resumed.probe()["steps_trained"]) == (2, 1)  # from checkpoint-2, step 3
    reference = one_process()
    assert_same_run(resumed, reference, "fsdp2 resumed")
    assert_fsdp2(resumed, head_resharded=False)
    assert list(out.glob("*.safetensors")) == [out / "model.safetensors"]
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert_same_weights({k: v.detach() for k, v in model.state_dict().items()}, reference.weights, "from_pretrained")


@pytest.mark.slow
def test_fsdp_on_cpu_without_the_emulation_is_ddp_and_orpo_says_so(tmp_path, one_process):
    """What a user gets on CPU: accelerate drops the FSDP plugin, the run is plain DDP (same result), and orpo
    warns in one line. (When accelerate sets FSDP up on CPU itself, this fails: drop `fsdp_on_cpu` then.)"""
    run = launch(tmp_path / "as_is", {"accelerate_as_is": True, "args": fsdp_args()}, torchrun(2), batch=2)
    assert_same_run(run, one_process(), "fsdp as accelerate does it on CPU")
    assert run.probe()["engine"] == "DistributedDataParallel" and not run.probe()["fsdp_units"]
    assert "fsdp is set, but accelerate did not set up FSDP (it does so only on GPUs and other accelerators): " \
           "this run trains with plain data parallelism (DDP) on cpu" in run.result.stderr


@pytest.mark.slow
def test_fsdp2_untied_head_in_its_own_unit_resharded_after_forward(tmp_path, one_process):
    """Untied embeddings, every Linear its own FSDP2 unit (transformer_layer_cls_to_wrap LlamaDecoderLayer and
    Linear) with reshard after forward, so lm_head is a unit of its own whose weight is a shard outside its call:
    the chunked head runs as that call and gets the whole weight (the probe), and the run equals one process."""
    run = launch(tmp_path / "own", {"tied": False, "args": fsdp_args(
        transformer_layer_cls_to_wrap=["LlamaDecoderLayer", "Linear"])}, torchrun(2), batch=2)
    assert_same_run(run, one_process("untied"), "fsdp2 head in its own unit")
    assert_fsdp2(run, head_resharded=True)


@pytest.mark.slow
def test_fsdp2_lora_on_q_proj_and_lm_head(tmp_path, one_process):
    """LoRA on q_proj and lm_head (untied) under FSDP2: the run equals one process, and the lm_head adapter
    trained (its lora_B, zero at start, moved)."""
    run = launch(tmp_path / "lora", {"tied": False, "lora": True, "args": fsdp_args()}, torchrun(2), batch=2)
    reference = one_process("lora")
    assert_same_run(run, reference, "fsdp2 lora")
    head_b = [k for k in run.weights if "lm_head" in k and "lora_B" in k]
    assert head_b and all(run.weights[k].abs().max() > 1e-4 for k in head_b), head_b
    assert any("q_proj" in k and "lora_B" in k for k in run.weights)
    assert_fsdp2(run, head_resharded=False)


@pytest.mark.slow
def test_fsdp2_through_accelerate_launch_with_the_documented_config(tmp_path, one_process):
    """`accelerate launch --config_file` with the accelerate config of docs/distributed.md (FSDP2), nothing FSDP in the
    training arguments: accelerate's environment sets FSDP up, and the run equals one process."""
    config = tmp_path / "fsdp.yaml"
    config.write_text(page_block("yaml", "distributed_type: FSDP"))
    accelerate = [[sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                   "--num_processes", "2"]]  # flags override the config file's values
    run = launch(tmp_path / "accelerate", {}, accelerate, batch=2)
    assert_same_run(run, one_process(), "accelerate launch fsdp2")
    assert_fsdp2(run, head_resharded=False)


# --- DeepSpeed -----------------------------------------------------------------------------------------------


def zero_config(stage: int) -> dict:
    """The ZeRO-3 config of docs/distributed.md (stage 2: the same with stage 2), plus, for stage 3, settings that keep no
    parameter gathered between uses: lm_head.weight is an empty partition outside its module's call, every step."""
    config = json.loads(page_block("json", '"zero_optimization"'))
    config["zero_optimization"]["stage"] = stage
    if stage == 3:
        config["zero_optimization"].update(
            stage3_param_persistence_threshold=0, stage3_max_reuse_distance=0, stage3_prefetch_bucket_size=0)
    return config


def run_zero(tmp_path, one_process, deepspeed_environment, stage):
    """ZeRO-`stage`, 2 ranks × 2 pairs, against one process × 4 pairs. Tolerance 1e-5 relative, as for DDP and FSDP:
    fp32 throughout; DeepSpeed reduces gradients in its own buckets and averages them over ranks in another order,
    which moves gradients by float rounding (~1e-7) and the weights after 3 AdamW steps by ~2e-6 of their scale here;
    a real fault (a rank's gradient lost, a step normalised twice) moves them by more than 1e-3."""
    run = launch(tmp_path / f"zero{stage}", {"args": {"deepspeed": zero_config(stage)}}, torchrun(2), batch=2,
                 env=deepspeed_environment)
    assert_same_run(run, one_process(), f"zero-{stage}")
    probe = run.probe()
    assert probe["engine"] == "DeepSpeedEngine" and probe["distributed_type"] == "DistributedType.DEEPSPEED", probe
    assert probe["in_head"] == ["Parameter[64, 32]"], probe  # the head's call: the whole weight, gathered
    return probe


def test_deepspeed_zero3_equals_one_process(tmp_path, one_process, deepspeed_environment):
    """ZeRO-3: lm_head.weight is an empty partition after every forward (the probe), gathered for the head's own call,
    where the chunked head runs; losses, evaluation and the consolidated final weights equal one process."""
    probe = run_zero(tmp_path, one_process, deepspeed_environment, 3)
    assert probe["after_forward"] == ["Parameter[0]"], probe


@pytest.mark.slow
def test_deepspeed_zero2_equals_one_process(tmp_path, one_process, deepspeed_environment):
    probe = run_zero(tmp_path, one_process, deepspeed_environment, 2)
    assert probe["after_forward"] == ["Parameter[64, 32]"], probe  # ZeRO-2 shards optimizer state and gradients only


def test_two_ranks_prepare_the_data_once_and_stream_it_as_one_job(tmp_path):
    """`orpo train` under torchrun with 2 ranks, the data a file. Prepared: rank 0 prepares it into the cache
    while rank 1 waits (config.prepare_data: TrainingArguments.main_process_first), then rank 1 maps rank 0's
    set: one preparation in the logs, one cache entry. Streamed (--streaming, source order): every rank reads
    the stream and keeps its half of each global batch of 4 (accelerate's IterableDatasetShard), as the
    sequential sampler hands the prepared pairs out, so both runs train the same weights."""
    from tiny import save_tiny_chat_model

    model = save_tiny_chat_model(tmp_path / "model")
    rows = [{"prompt": "why is the sky blue", "chosen": "the sky is blue", "rejected": "no"},
            {"prompt": "what", "chosen": "good", "rejected": "bad"}, {"prompt": "what", "chosen": "ok", "rejected": "ok"},
            {"prompt": "is it", "chosen": "yes it is", "rejected": "no"}] * 3
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cache = tmp_path / "cache"
    flags = ["-m", "orpo", "train", "--model", model, "--dataset", str(data), "--dataset_cache_dir", str(cache),
             "--max_steps", "2", "--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--logging_steps", "1",
             "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", "--report", "false",
             "--bf16", "false", "--seed", "0"]
    runs = {}
    for name, extra in (("prepared", ["--train_sampling_strategy", "sequential"]),
                        ("streamed", ["--streaming", "--streaming_shuffle_buffer", "0"])):
        out = tmp_path / name
        result = _start([torchrun(2)[0] + flags + ["--output_dir", str(out)] + extra], _environment(),
                        tmp_path / f"{name}-launch")
        saved = (out / "model.safetensors").is_file()
        assert result.returncode == 0 or (saved and "terminate called without" in result.stderr), result.stderr[-3000:]
        runs[name] = (result.stderr, load_file(str(out / "model.safetensors")), Run(out, result).steps)
    log = runs["prepared"][0]
    assert log.count(f"train data: {data}: kept 9 of 12 pairs; dropped 3: chosen == rejected 3 (first at row 2); "
                     f"prepared with 1 process, cached at {cache}") == 1, log[-3000:]
    assert log.count(f"train data: {data}: kept 9 of 12 pairs; dropped 3: chosen == rejected 3 (first at row 2); "
                     f"read from the cache ({cache}") == 1, log[-3000:]
    assert len(list(cache.iterdir())) == 1
    assert_same_weights(runs["streamed"][1], runs["prepared"][1], "streamed", rel=1e-6)
    # rank 0 read what both ranks trained on, and the global batch after it (the loader's end-of-data check);
    # after step 2 that batch is pair 9 and, the file ended, the first 3 of the next pass
    assert [(r["stream_pairs_kept"], r["stream_pairs_dropped"]) for r in runs["streamed"][2]] == [(8, 2), (12, 4)]


@pytest.mark.slow
def test_a_reward_model_under_deepspeed_zero3(tmp_path, one_process_reward, deepspeed_environment):
    """ZeRO-3: the score head's weight is an empty partition after the forward, gathered for its own call, where the
    reward head runs; the run equals one process."""
    spec = {"reward": True, "args": {"objective": "reward", "deepspeed": zero_config(3)}}
    run = launch(tmp_path / "zero3", spec, torchrun(2), batch=2, env=deepspeed_environment)
    probe = run.probe()
    assert probe["engine"] == "DeepSpeedEngine" and probe["in_head"] == ["Parameter[1, 32]"], probe
    assert probe["after_forward"] == ["Parameter[0]"], probe
    assert_same_reward_run(run, one_process_reward, "reward zero-3")
