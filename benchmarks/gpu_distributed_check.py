"""GPU check of the multi-process training path and the QLoRA option, on one CUDA GPU.

    PYTHONPATH=services:plugins python3 benchmarks/gpu_distributed_check.py [--steps 20] [--out DIR]
    .venv/bin/python benchmarks/gpu_distributed_check.py --cpu      # the same flow on CPU, (a) and (b)

Three checks on a Llama stand-in (``make_standin`` from the ``llama-3.2-1b`` catalog entry, its
shape enlarged to ``--layers`` × ``--hidden``; a real byte-level BPE tokenizer and the catalog's
training chat template) and the same synthetic, learnable conversations, ``--steps`` optimiser
steps of batch 8, LoRA r 8 on q/k/v/o, no dropout, two evaluations and two checkpoints:

  (a) ``in_process``  ``SFT.train(context)`` in this process, as the trainer worker runs a
                      one-process job.
  (b) ``launched``    the same job through ``tuneforge_builtin.distributed`` (job spec,
                      ``launch_command``, rank 0's progress/result files, as the worker launches
                      it): on the GPU ``accelerate launch --use_fsdp --fsdp_version 2
                      --num_processes 1`` (FSDP2 + LoRA, sharded checkpoints, the adapter gathered
                      and saved once); with ``--cpu`` two processes, DDP over gloo. Its per-step
                      losses must match (a)'s (relative ``--rtol``: bf16 and FSDP's mixed precision
                      on the GPU, fp32 on CPU), its adapter must have (a)'s files, tensor names,
                      shapes and dtypes and load with peft, and its intermediate checkpoint must be
                      a complete trainer checkpoint.
  (c) ``qlora``       (GPU, bitsandbytes importable) ``method_options={"quantization": "4bit"}``
                      in this process: the base in 4-bit NF4. It must train (finite losses, the
                      last below the first) and give (a)'s adapter format; skipped otherwise.

One JSON line per check on stdout (losses, max loss difference of (b) against (a), adapter files,
seconds, peak GPU memory); the exit status is 1 when a check failed. Needs only torch,
transformers, peft, accelerate, trl, datasets, safetensors, tokenizers and pluggy, and of tuneforge
only ``tuneforge.training``, ``tuneforge.trainer.standin`` and the built-in plugins (registered
directly when tuneforge is not installed): no NATS, gRPC, database or settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _part in ("services", "plugins"):  # a source checkout runs without installing tuneforge
    if str(ROOT / _part) not in sys.path:
        sys.path.insert(0, str(ROOT / _part))

CATALOG_ID = "llama-3.2-1b"
BATCH = 8
TEST_EXAMPLES = 16
WORDS = ("apple", "river", "green", "stone", "cloud", "music", "table", "light", "paper", "glass")
CITIES = ("Paris", "Tokyo", "Berlin", "Lima", "Oslo", "Cairo", "Quito", "Rome")


def conversations(n: int, seed: int, repeat: int = 1) -> list[dict]:
    """Short, repetitive (learnable) support-style conversations; ``repeat`` > 1 makes every
    assistant answer that many times longer (activation memory grows with the tokens)."""
    rows = _conversations(n, seed)
    for row in rows:
        answer = row["messages"][-1]
        answer["content"] = " ".join([answer["content"]] * repeat)
    return rows


def _conversations(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            word = rng.choice(WORDS)
            rows.append({"messages": [{"role": "user", "content": f"Repeat: {word}"},
                                      {"role": "assistant", "content": f"{word} {word} {word}"}]})
        elif kind == 1:
            city = rng.choice(CITIES)
            rows.append({"messages": [{"role": "system", "content": "You answer in one sentence."},
                                      {"role": "user", "content": f"Where is the office in {city}?"},
                                      {"role": "assistant", "content": f"Our {city} office is in the city centre."}]})
        else:
            rows.append({"messages": [{"role": "user", "content": "Say hello."},
                                      {"role": "assistant", "content": "Hello! How can I help you today?"}]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@dataclasses.dataclass
class Setup:
    spec: object
    model_dir: Path
    train_file: Path
    test_file: Path
    hyperparameters: object
    cuda: bool


def prepare(work: Path, args) -> Setup:
    import torch

    from tuneforge.core.hyperparameters import ResolvedHyperparameters
    from tuneforge.trainer.standin import make_standin
    from tuneforge_builtin import distributed

    spec = distributed.registry().base_model(CATALOG_ID)
    shape = {"hidden_size": args.hidden, "intermediate_size": args.hidden * 4, "num_hidden_layers": args.layers,
             "num_attention_heads": max(1, args.hidden // 64), "num_key_value_heads": max(1, args.hidden // 128)}
    standin = dataclasses.replace(spec.standin, config={**spec.standin.config, **shape})
    model_dir = make_standin(dataclasses.replace(spec, standin=standin), work / "models", seed=0)
    rows = conversations(args.steps * BATCH + TEST_EXAMPLES, seed=1, repeat=args.repeat)
    hp = ResolvedHyperparameters(
        learning_rate=args.lr, batch_size=BATCH, max_epochs=1, n_evals=2, n_checkpoints=2, lora_rank=8,
        lora_alpha=16.0, lora_dropout=0.0, early_stopping_patience=0, warmup_ratio=0.0, lr_peak_ratio=0.0, seed=0,
        lora_target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    return Setup(spec, model_dir, write_jsonl(work / "train.jsonl", rows[TEST_EXAMPLES:]),
                 write_jsonl(work / "test.jsonl", rows[:TEST_EXAMPLES]), hp, torch.cuda.is_available())


def adapter_format(adapter_dir: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        tensors = {name: [list(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype()] for name in f.keys()}  # noqa: SIM118
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["target_modules"] = sorted(config.get("target_modules") or [])
    return {"files": sorted(p.name for p in adapter_dir.iterdir()), "tensors": tensors, "config": config}


def peak_memory_reset() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def train_in_process(setup: Setup, out: Path, options: dict | None = None) -> dict:
    from tuneforge.training import TrainingContext
    from tuneforge_builtin.sft import SFT

    from transformers import TrainerCallback

    from tuneforge_builtin import trl_common

    reports, train_peak = [], [None]

    class TrainPeak(TrainerCallback):  # peak GPU memory of the training steps alone
        def on_train_begin(self, *_a, **_k):
            peak_memory_reset()

        def on_train_end(self, *_a, **_k):
            train_peak[0] = peak_memory()

    run_to_completion = trl_common.run_to_completion

    def with_train_peak(prepared, context):
        prepared.trainer.add_callback(TrainPeak())
        return run_to_completion(prepared, context)

    trl_common.run_to_completion = with_train_peak
    peak_memory_reset()
    started = time.monotonic()
    try:
        result = SFT.train(TrainingContext(
        job_id=out.name, base_model=setup.spec, model_dir=setup.model_dir, train_file=setup.train_file,
        test_file=setup.test_file, output_dir=out, hyperparameters=setup.hyperparameters,
            method_options=dict(options or {}), seed=setup.hyperparameters.seed, report_progress=reports.append))
    finally:
        trl_common.run_to_completion = run_to_completion
    seconds = time.monotonic() - started
    return {
        "steps": result.steps,
        "losses": {r.step: r.train_loss for r in reports if r.train_loss is not None},
        "eval_losses": {r.step: r.eval_loss for r in reports if r.eval_loss is not None},
        "eval_loss": result.eval_loss, "base_eval_loss": result.base_eval_loss, "samples": len(result.samples),
        "checkpoints": [c.step for c in result.checkpoints],
        "adapter_dir": str(result.adapter_dir), "adapter": adapter_format(Path(result.adapter_dir)),
        "seconds": round(seconds, 2), "peak_gpu_memory_bytes": peak_memory(),
        "train_peak_gpu_memory_bytes": train_peak[0],
    }


def train_launched(setup: Setup, work: Path, processes: int, cpu: bool, timeout: float,
                   options: dict | None = None) -> dict:
    from tuneforge_builtin import distributed

    out = work / "launched"
    job = distributed.JobSpec(
        job_id="launched", method="sft", base_model=CATALOG_ID, model_dir=str(setup.model_dir),
        train_file=str(setup.train_file), test_file=str(setup.test_file), output_dir=str(out),
        hyperparameters=setup.hyperparameters.to_dict(), seed=setup.hyperparameters.seed,
        method_options=dict(options or {}),
        progress_file=str(work / "launched.progress.jsonl"), result_file=str(work / "launched.result.json"),
        error_file=str(work / "launched.error.txt"))
    command = distributed.launch_command(job.write(work / "launched.json"), processes, cpu=cpu, fsdp=not cpu)
    env = distributed.launch_environment(max(1, (os.cpu_count() or 1) // processes))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "services"), str(ROOT / "plugins"),
                                         *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))])
    log_path = work / "launched.log"
    started = time.monotonic()
    with open(log_path, "wb") as log:
        done = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, check=False)
    seconds = time.monotonic() - started
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
    if done.returncode != 0 or not Path(job.result_file).is_file():
        error = Path(job.error_file).read_text() if Path(job.error_file).is_file() else ""
        raise RuntimeError(f"launch failed (exit {done.returncode}) {error}\n{' '.join(command)}\n{tail}")
    record = json.loads(Path(job.result_file).read_text())
    checkpoint_dirs = sorted((out / "checkpoints").glob("step-*"))
    return {
        "command": " ".join(command[1:4] + ["..."] + [a for a in command if a.startswith("--use_fsdp")]),
        "world_size": record["world_size"], "distributed_type": record["distributed_type"],
        "backend": record["backend"], "steps": record["steps"],
        "losses": {e["step"]: e["loss"] for e in record["losses"]},
        "eval_losses": {e["step"]: e["eval_loss"] for e in record["eval_losses"]},
        "eval_loss": record["eval_loss"], "base_eval_loss": record["base_eval_loss"],
        "samples": len(record["samples"]), "checkpoints": record["checkpoints_reported"],
        "checkpoint_files": sorted(p.name for p in checkpoint_dirs[0].iterdir()) if checkpoint_dirs else [],
        "adapter_dir": record["adapter_dir"], "adapter": adapter_format(Path(record["adapter_dir"])),
        "seconds": round(seconds, 2), "peak_gpu_memory_bytes": record.get("peak_gpu_memory_bytes"),
    }


def loss_diff(a: dict, b: dict) -> tuple[float, float]:
    """Largest absolute and relative difference of two ``{step: loss}`` maps over their steps."""
    steps = sorted(set(a) | set(b))
    if any(s not in a or s not in b for s in steps):
        return math.inf, math.inf
    absolute = max((abs(a[s] - b[s]) for s in steps), default=0.0)
    relative = max((abs(a[s] - b[s]) / max(abs(a[s]), 1e-12) for s in steps), default=0.0)
    return absolute, relative


def same_format(reference: dict, other: dict) -> list[str]:
    problems = []
    if reference["files"] != other["files"]:
        problems.append(f"adapter files {other['files']} != {reference['files']}")
    if reference["tensors"] != other["tensors"]:
        problems.append("adapter tensors (names, shapes, dtypes) differ")
    skip = {"base_model_name_or_path", "revision"}
    if {k: v for k, v in reference["config"].items() if k not in skip} != \
            {k: v for k, v in other["config"].items() if k not in skip}:
        problems.append("adapter_config.json differs")
    return problems


def loads_with_peft(setup: Setup, adapter_dir: str) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(setup.model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir)
    if not any("lora_A" in name for name, _ in model.named_parameters()):
        raise RuntimeError("peft loaded no LoRA weights")


def emit(line: dict) -> None:
    print(json.dumps(line, default=str), flush=True)


def learned(losses: dict) -> bool:
    values = [losses[s] for s in sorted(losses)]
    return bool(values) and all(math.isfinite(v) for v in values) and values[-1] < values[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="run (a) and (b) on CPU: (b) as 2 processes, DDP over gloo")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rtol", type=float, default=None,
                        help="largest relative per-step loss difference of (b) against (a) "
                             "(default: 0.05 on the GPU, bf16; 1e-4 with --cpu, fp32)")
    parser.add_argument("--timeout", type=float, default=360.0, help="seconds for the launched run")
    parser.add_argument("--repeat", type=int, default=1, help="assistant answers this many times longer")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="(b) with gradient_checkpointing=true (FSDP + activation checkpointing), and "
                             "(d): (a) again with it, same losses, less peak memory")
    parser.add_argument("--out", type=Path, default=None, help="work directory (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch: the CPU flow even on a GPU machine
    import torch

    if not args.cpu and not torch.cuda.is_available():
        emit({"check": "setup", "ok": False, "error": "no CUDA GPU (use --cpu for the CPU flow)"})
        return 1
    rtol = args.rtol if args.rtol is not None else (1e-4 if args.cpu else 0.05)
    work = args.out or Path(tempfile.mkdtemp(prefix="tuneforge-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    failed = False
    device = "cpu" if args.cpu else torch.cuda.get_device_name(0)
    try:
        setup = prepare(work, args)
        emit({"check": "setup", "ok": True, "device": device, "torch": torch.__version__, "work": str(work),
              "model": f"{CATALOG_ID} stand-in, {args.layers} layers x {args.hidden}", "steps": args.steps})

        # (a) in process
        a = None
        try:
            a = train_in_process(setup, work / "in_process")
            ok = a["steps"] == args.steps and learned(a["losses"])
            failed |= not ok
            emit({"check": "a_in_process", "ok": ok, **{k: v for k, v in a.items() if k != "adapter"},
                  "adapter_files": a["adapter"]["files"]})
        except Exception as exc:
            failed = True
            emit({"check": "a_in_process", "ok": False, "error": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc()[-3000:]})

        # (b) launched: FSDP2 on one GPU, or DDP over gloo on CPU
        try:
            b = train_launched(setup, work, processes=2 if args.cpu else 1, cpu=args.cpu, timeout=args.timeout,
                               options={"gradient_checkpointing": True} if args.gradient_checkpointing else None)
            b["gradient_checkpointing"] = args.gradient_checkpointing
            problems = []
            if b["steps"] != args.steps:
                problems.append(f"{b['steps']} steps, not {args.steps}")
            want_type = "MULTI_CPU" if args.cpu else "FSDP"
            if b["distributed_type"] != want_type:
                problems.append(f"distributed type {b['distributed_type']}, not {want_type}")
            if not b["checkpoint_files"] or "trainer_state.json" not in b["checkpoint_files"]:
                problems.append(f"intermediate checkpoint incomplete: {b['checkpoint_files']}")
            line = {k: v for k, v in b.items() if k != "adapter"}
            line["adapter_files"] = b["adapter"]["files"]
            if a is not None:
                absolute, relative = loss_diff(a["losses"], b["losses"])
                eval_abs, eval_rel = loss_diff(a["eval_losses"], b["eval_losses"])
                line.update(max_loss_diff_vs_a=absolute, max_rel_loss_diff_vs_a=relative,
                            max_eval_loss_diff_vs_a=eval_abs, rtol=rtol)
                if not relative <= rtol or not eval_rel <= rtol:
                    problems.append(f"losses differ from (a): relative {relative:.3g} (eval {eval_rel:.3g}) > {rtol}")
                problems += same_format(a["adapter"], b["adapter"])
            loads_with_peft(setup, b["adapter_dir"])
            line.update(ok=not problems, problems=problems)
            failed |= bool(problems)
            emit({"check": "b_launched", **line})
        except Exception as exc:
            failed = True
            emit({"check": "b_launched", "ok": False, "error": f"{type(exc).__name__}: {exc}"[-6000:]})

        # (d) gradient checkpointing in process: the same losses as (a), less peak memory on the GPU
        if args.gradient_checkpointing:
            try:
                d = train_in_process(setup, work / "checkpointed", {"gradient_checkpointing": True})
                problems = []
                if a is not None:
                    absolute, relative = loss_diff(a["losses"], d["losses"])
                    if not relative <= rtol:
                        problems.append(f"losses differ from (a): relative {relative:.3g} > {rtol}")
                    if not args.cpu and not d["train_peak_gpu_memory_bytes"] < a["train_peak_gpu_memory_bytes"]:
                        problems.append("peak GPU memory of the training steps not below (a)'s")
                line = {k: v for k, v in d.items() if k not in ("adapter", "losses")}
                if a is not None:
                    line.update(max_rel_loss_diff_vs_a=relative, seconds_vs_a=round(d["seconds"] / a["seconds"], 3))
                    if a["train_peak_gpu_memory_bytes"]:
                        line["train_peak_gpu_memory_vs_a"] = round(
                            d["train_peak_gpu_memory_bytes"] / a["train_peak_gpu_memory_bytes"], 4)
                failed |= bool(problems)
                emit({"check": "d_gradient_checkpointing", "ok": not problems, "problems": problems, **line})
            except Exception as exc:
                failed = True
                emit({"check": "d_gradient_checkpointing", "ok": False, "error": f"{type(exc).__name__}: {exc}",
                      "traceback": traceback.format_exc()[-3000:]})

        # (c) QLoRA
        if args.cpu or importlib.util.find_spec("bitsandbytes") is None:
            emit({"check": "c_qlora", "ok": True, "skipped": "--cpu" if args.cpu else "bitsandbytes is not importable"})
        else:
            try:
                c = train_in_process(setup, work / "qlora", {"quantization": "4bit"})
                problems = [] if learned(c["losses"]) else ["it did not learn (last loss not below the first)"]
                if c["steps"] != args.steps:
                    problems.append(f"{c['steps']} steps, not {args.steps}")
                if a is not None:
                    problems += same_format(a["adapter"], c["adapter"])
                failed |= bool(problems)
                emit({"check": "c_qlora", "ok": not problems, "problems": problems,
                      **{k: v for k, v in c.items() if k != "adapter"}, "adapter_files": c["adapter"]["files"],
                      "peak_gpu_memory_vs_a": (c["peak_gpu_memory_bytes"] / a["peak_gpu_memory_bytes"]
                                               if a and a["peak_gpu_memory_bytes"] else None)})
            except Exception as exc:
                failed = True
                emit({"check": "c_qlora", "ok": False, "error": f"{type(exc).__name__}: {exc}",
                      "traceback": traceback.format_exc()[-3000:]})
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
