"""The distributed training path (tuneforge_builtin.distributed) on CPU: a 2-process DDP run over
gloo on a tiny Llama 3 stand-in trains like the 1-process run — the same per-step losses, the same
evaluation loss, the same adapter format — and writes the adapter once.

Tolerance: both runs are fp32 and see the same examples per optimiser step (batch 8 = 2 ranks × 4,
accelerate shards the one shuffled order), so they differ only in summation order (two partial
token-loss sums and a gloo all-reduce of the gradients instead of one sum). Measured: a relative
difference of at most 1.5e-7 (fp32 epsilon 1.2e-7) over 4 steps at a high learning rate. RTOL 1e-5
leaves room for that order to vary, and still fails on the errors that matter: a loss normalised per
rank instead of over the step's loss tokens of all ranks reads 0.5× the true loss (measured
4.0908 vs 8.1815 at step 1, 3.4209 vs 6.8436 for the step-2 evaluation), and batch_size examples per
rank instead of per step would make 2 steps instead of 4. The adapters' weights must agree within
1e-4 (measured: at most 9.2e-6 apart, largest weight 0.17; Adam's per-step normalisation carries
the fp32 rounding differences into the weights at that level).
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
from test_sft_training import (
    CATALOG_ID,
    hyperparameters,
    make_conversations,
    write_jsonl,
)

pytestmark = pytest.mark.integration

RTOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(one_torch_thread):
    """The reference run trains in this process: one torch thread (tests/conftest.py)."""


@pytest.fixture(scope="module")
def spec():
    from tuneforge.plugins import get_registry

    return get_registry().base_model(CATALOG_ID)


@pytest.fixture(scope="module")
def runs(spec, tmp_path_factory):
    """The same job twice: in this process (the product's 1-process path, ``SFT.train``) and as two
    processes launched with :func:`distributed.launch_command`."""
    from tuneforge.trainer.standin import make_standin
    from tuneforge.training import TrainingContext
    from tuneforge_builtin import distributed
    from tuneforge_builtin.sft import SFT

    root = tmp_path_factory.mktemp("distributed")
    model_dir = make_standin(spec, root / "models", seed=0)
    train_file = write_jsonl(root / "train.jsonl", make_conversations(32, seed=1))
    test_file = write_jsonl(root / "test.jsonl", make_conversations(8, seed=5))
    hp = hyperparameters(batch_size=8, max_epochs=1, n_evals=2, n_checkpoints=1)

    reports = []
    one = SFT.train(TrainingContext(
        job_id="one", base_model=spec, model_dir=model_dir, train_file=train_file, test_file=test_file,
        output_dir=root / "one", hyperparameters=hp, seed=hp.seed, report_progress=reports.append))

    job = distributed.JobSpec(
        job_id="two", method="sft", base_model=CATALOG_ID, model_dir=str(model_dir), train_file=str(train_file),
        test_file=str(test_file), output_dir=str(root / "two"), hyperparameters=hp.to_dict(), seed=hp.seed,
        progress_file=str(root / "two.progress.jsonl"), result_file=str(root / "two.result.json"))
    command = distributed.launch_command(job.write(root / "two.json"), 2, cpu=True)
    done = subprocess.run(command, env=distributed.launch_environment(1), capture_output=True, text=True,
                          check=False, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    two = json.loads(Path(job.result_file).read_text())
    progress = [json.loads(line) for line in Path(job.progress_file).read_text().splitlines()]
    return {"one": one, "one_reports": reports, "two": two, "two_progress": progress,
            "two_log": done.stdout + done.stderr, "root": root}


def test_two_processes_ran_ddp_over_gloo(runs):
    two = runs["two"]
    assert two["world_size"] == 2
    assert two["distributed_type"] == "MULTI_CPU" and two["backend"] == "gloo"
    assert two["steps"] == runs["one"].steps == 4  # 32 examples, batch 8 per step over both ranks


def test_per_step_losses_match_the_one_process_run(runs):
    one = [(r.step, r.train_loss) for r in runs["one_reports"] if r.train_loss is not None]
    two = [(e["step"], e["loss"]) for e in runs["two"]["losses"]]
    assert [s for s, _ in one] == [s for s, _ in two] == [1, 2, 3, 4]
    for (step, a), (_, b) in zip(one, two, strict=True):
        assert math.isclose(a, b, rel_tol=RTOL), (step, a, b)
    # the loss moved: equality is not two untrained runs agreeing
    assert two[-1][1] < two[0][1] - 0.5
    # rank 0 alone reported progress: each step once, with the same losses
    reported = [(p["step"], p["train_loss"]) for p in runs["two_progress"]
                if p["kind"] == "progress" and p["train_loss"] is not None]
    assert reported == two


def test_evaluation_loss_matches(runs):
    one = [(r.step, r.eval_loss) for r in runs["one_reports"] if r.eval_loss is not None]
    two = [(e["step"], e["eval_loss"]) for e in runs["two"]["eval_losses"]]
    assert [s for s, _ in one] == [s for s, _ in two] == [2, 4]
    for (step, a), (_, b) in zip(one, two, strict=True):
        assert math.isclose(a, b, rel_tol=RTOL), (step, a, b)
    assert math.isclose(runs["one"].eval_loss, runs["two"]["eval_loss"], rel_tol=RTOL)


def test_adapter_has_the_one_process_format_and_weights(runs):
    from safetensors import safe_open

    one_dir, two_dir = Path(runs["one"].adapter_dir), Path(runs["two"]["adapter_dir"])
    configs = [json.loads((d / "adapter_config.json").read_text()) for d in (one_dir, two_dir)]
    for config in configs:  # peft keeps them as a set: its order follows the process's string hashing
        config["target_modules"] = sorted(config["target_modules"])
    assert configs[0] == configs[1]
    assert configs[1]["base_model_name_or_path"] == str(Path(runs["root"] / "models" / CATALOG_ID).resolve())
    with safe_open(str(one_dir / "adapter_model.safetensors"), "pt") as a, \
            safe_open(str(two_dir / "adapter_model.safetensors"), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys()) and len(list(a.keys())) == 4 * 2 * 2  # q/k/v/o × A/B × layers
        for name in a.keys():  # noqa: SIM118 (safe_open is not a dict)
            x, y = a.get_tensor(name), b.get_tensor(name)
            assert x.shape == y.shape and x.dtype == y.dtype, name
            assert (x - y).abs().max().item() <= 1e-4 * max(1.0, x.abs().max().item()), name
    # the tokenizer travels with it, as in one process
    assert (two_dir / "tokenizer.json").is_file() and (two_dir / "chat_template.jinja").is_file()
    # written once, by rank 0
    assert runs["two_log"].count("rank 0 saved the adapter") == 1


def test_launch_command_and_spec_checks(tmp_path):
    from tuneforge_builtin import distributed

    spec_file = tmp_path / "job.json"
    cpu = distributed.launch_command(spec_file, 2, cpu=True, main_process_port=29999)
    assert cpu[1:3] == ["-m", "torch.distributed.run"]
    assert cpu[cpu.index("--nproc_per_node") + 1] == "2" and cpu[cpu.index("--master_port") + 1] == "29999"
    assert cpu[-3:] == ["-m", "tuneforge_builtin.distributed", str(spec_file.resolve())]
    gpu = distributed.launch_command(spec_file, 8, cpu=False, fsdp=True)
    assert gpu[1:3] == ["-m", "accelerate.commands.launch"] and "--use_fsdp" in gpu
    assert gpu[gpu.index("--num_processes") + 1] == "8"
    with pytest.raises(ValueError, match="FSDP is the GPU path"):
        distributed.launch_command(spec_file, 2, cpu=True, fsdp=True)
    with pytest.raises(ValueError, match="choose a multiple of 2"):
        distributed.split_batch(7, 2)
    assert distributed.split_batch(8, 2) == 4
    spec_file.write_text(json.dumps({"job_id": "x", "colour": "red"}))
    with pytest.raises(ValueError, match="unknown job spec field.*colour"):
        distributed.JobSpec.read(spec_file)
    spec_file.write_text(json.dumps({"job_id": "x"}))
    with pytest.raises(ValueError, match="lacks .*base_model"):
        distributed.JobSpec.read(spec_file)


def test_a_stop_request_stops_every_rank(spec, runs, tmp_path):
    """The stop file exists from the start: both ranks stop after the first step (agreed through an
    all-reduce; a rank stopping alone would hang the other in its next gradient all-reduce)."""
    from tuneforge_builtin import distributed

    root = runs["root"]
    stop = tmp_path / "stop"
    stop.touch()
    job = distributed.JobSpec(
        job_id="stop", method="sft", base_model=CATALOG_ID, model_dir=str(root / "models" / CATALOG_ID),
        train_file=str(root / "train.jsonl"), test_file=str(root / "test.jsonl"), output_dir=str(tmp_path / "out"),
        hyperparameters=hyperparameters(batch_size=8, max_epochs=1, n_evals=0, n_checkpoints=1).to_dict(),
        result_file=str(tmp_path / "result.json"), stop_file=str(stop))
    command = distributed.launch_command(job.write(tmp_path / "job.json"), 2, cpu=True)
    done = subprocess.run(command, env=distributed.launch_environment(1), capture_output=True, text=True,
                          check=False, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(Path(job.result_file).read_text())
    assert result["cancelled"] is True and result["steps"] == 1 and result["world_size"] == 2
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
