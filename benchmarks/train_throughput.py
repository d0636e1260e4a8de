"""SFT training throughput: plain TRL against tuneforge's SFT method, side by side in one process.

    python benchmarks/train_throughput.py [--steps 30] [--repeats 3] [--n-conversations 1000] [--quick]

Alternatives, interleaved and repeated ``--repeats`` times (min and median reported), on the same
data, the same LoRA settings (r 8, alpha 16, dropout 0, q/k/v/o), the same constant learning rate
and seed, and the same real tokens (one epoch over the same ``--steps × 8`` training conversations,
none truncated):

  (a) ``plain``        plain ``trl.SFTTrainer`` as a user first writes it: padded batches of 8,
                       ``assistant_only_loss=True`` (the chat template's generation marks);
  (b) ``padding-free`` ``padding_free=True`` without packing, batch 8 (``max_length=None``);
      ``packing-bfd``  ``packing=True``, ``packing_strategy="bfd"``, batch 1 × gradient
                       accumulation 8 (the fastest packing setting on CPU, STACK-NOTES);
      each is reported, and the faster of the two (by median real tokens/s) is "best TRL";
  (c) ``tuneforge``    ``SFT.train(context)`` from the built-in plugin, exactly as a job runs it
                       (its own data reading, model loading, schedule, evaluation, adapter saving
                       and comparison with the base model).

Model: a Llama stand-in built by ``make_standin`` from the ``llama-3.2-1b`` catalog entry with its
shape enlarged to 4 layers × hidden 256 (intermediate 1536, 4 heads; ~6.6M parameters): a real
byte-level BPE tokenizer and the catalog's training chat template. Data: conversations from
``examples/make_conversations.py`` chained into 1–12 assistant turns (some with tool calls),
generated with a fixed seed.

Measured per run:
  * real tokens/s: non-padding tokens fed to the model in training forwards (a hook on the input
    embeddings counts them, training mode only) over the training-loop time (first step begins →
    last optimiser step ends; evaluation and saving after the last step are not included; the
    tuneforge job's total wall time is printed separately);
  * padding: fraction of the processed tokens that were the pad token;
  * peak RSS of the process during the run (``VmHWM`` after resetting it via ``clear_refs``);
  * eval loss: mean cross-entropy over the assistant tokens of the held-out conversations, one
    conversation at a time without padding, computed by this script in the same way for every
    alternative (so batching cannot change the figure).

The final line compares median real tokens/s: ``sft speedup: X.XXx vs plain TRL, Y.YYx vs best TRL``.

Not measured yet: the DPO comparison (plain ``trl.DPOTrainer`` against tuneforge's DPO method)
and the real ``smollm2-135m`` model; this version covers SFT on the stand-in only.

``--quick`` is a smoke run (tiny data, one repeat, well under 2 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "examples"))

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BASE_MODEL = "llama-3.2-1b"
SHAPE = {"hidden_size": 256, "intermediate_size": 1536, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 4}
BATCH = 8
MAX_LENGTH = 1024  # every generated conversation is shorter (checked), so nothing is truncated
LEARNING_RATE = 1e-3  # a random model learns visibly in a few dozen steps
LORA = {"r": 8, "alpha": 16.0, "dropout": 0.0, "modules": ("q_proj", "k_proj", "v_proj", "o_proj")}
SEED = 20240611
MAX_TURNS = 12


# --- data ----------------------------------------------------------------------------------------

def generate_conversations(n: int, seed: int) -> list[dict]:
    """``n`` conversations with 1–12 assistant turns: a base support chat (keeps its system prompt
    and tools) followed by the user/assistant turns of other chats (their tools merged in)."""
    import make_conversations

    rng = random.Random(seed)
    pool = make_conversations.generate(max(50, n // 2), seed)
    rows = []
    for _ in range(n):
        target = min(MAX_TURNS, max(1, int(rng.expovariate(1 / 3.0)) + 1))  # skewed to short chats
        base = rng.choice(pool)
        messages = [dict(m) for m in base["messages"]]
        tools = {t["function"]["name"]: t for t in base.get("tools") or []}
        while True:
            other = rng.choice(pool)
            turns = [dict(m) for m in other["messages"] if m["role"] != "system"]
            have = sum(m["role"] == "assistant" for m in messages)
            more = sum(m["role"] == "assistant" for m in turns)
            if have >= target or have + more > MAX_TURNS:
                break
            messages += turns
            tools.update({t["function"]["name"]: t for t in other.get("tools") or []})
        row = {"messages": messages}
        if tools:
            row["tools"] = list(tools.values())
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def hf_dataset(rows: list[dict]):
    """What a user writes after reading the TRL docs (with the tool-call fix from STACK-NOTES)."""
    from datasets import Dataset, Features, Json, List

    features = Features({"messages": List(Json()), "tools": List(Json())})
    return Dataset.from_dict({"messages": [r["messages"] for r in rows],
                              "tools": [r.get("tools") or None for r in rows]}, features=features)


def encode(tokenizer, row: dict) -> tuple[list[int], list[int]]:
    out = tokenizer.apply_chat_template(row["messages"], tools=row.get("tools") or None, tokenize=True,
                                        return_dict=True, return_assistant_tokens_mask=True)
    return list(out["input_ids"]), list(out["assistant_masks"])


# --- measurement helpers -------------------------------------------------------------------------

class TokenCounter:
    """Counts tokens fed to the model's input embeddings in training mode (eval/generate not)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id
        self.processed = 0
        self.padding = 0

    def hook(self, module, args):
        if module.training and args:
            ids = args[0]
            self.processed += int(ids.numel())
            self.padding += int((ids == self.pad_id).sum())

    def attach(self, model):
        model.get_input_embeddings().register_forward_pre_hook(self.hook)

    @property
    def real(self) -> int:
        return self.processed - self.padding


def timing_callback_class():
    from transformers import TrainerCallback

    class LoopTimer(TrainerCallback):
        """Wall time from the start of the first step to the end of the last optimiser step."""

        def __init__(self):
            self.start = None
            self.end = None

        def on_step_begin(self, args, state, control, **kwargs):
            if self.start is None:
                self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.end = time.perf_counter()

        @property
        def seconds(self) -> float:
            return (self.end or 0.0) - (self.start or 0.0)

    return LoopTimer


def reset_peak_rss() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def eval_loss(model, encoded_eval: list[tuple[list[int], list[int]]]) -> float:
    """Mean cross-entropy over assistant tokens, one conversation at a time (no padding)."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask in encoded_eval:
            x = torch.tensor([ids])
            logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
            target = torch.tensor(ids[1:])
            keep = torch.tensor(mask[1:], dtype=torch.bool)
            if keep.any():
                losses = torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum")
                total += float(losses)
                count += int(keep.sum())
    return total / max(1, count)


@dataclasses.dataclass
class Measurement:
    real_tokens: int
    processed_tokens: int
    padding_tokens: int
    seconds: float
    peak_rss_mib: float
    eval_loss: float
    steps: int
    job_seconds: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.real_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def padding_fraction(self) -> float:
        return self.padding_tokens / self.processed_tokens if self.processed_tokens else 0.0


# --- the alternatives ----------------------------------------------------------------------------

class Bench:
    def __init__(self, spec, model_dir: Path, train_rows: list[dict], test_rows: list[dict], work: Path):
        from transformers import AutoTokenizer

        self.spec = spec
        self.model_dir = model_dir
        self.train_rows = train_rows
        self.test_rows = test_rows
        self.work = work
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.encoded_eval = [encode(self.tokenizer, r) for r in test_rows]
        self.train_file = write_jsonl(work / "train.jsonl", train_rows)
        self.test_file = write_jsonl(work / "test.jsonl", test_rows)
        self.train_dataset = hf_dataset(train_rows)
        self.eval_dataset = hf_dataset(test_rows)
        self.runs = 0

    def _output_dir(self, name: str) -> Path:
        self.runs += 1
        path = self.work / f"run-{self.runs}-{name}"
        path.mkdir()
        return path

    def plain_trl(self, name: str) -> Measurement:
        """(a) and the (b) candidates: ``trl.SFTTrainer`` written directly."""
        import torch
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
        from trl import SFTConfig, SFTTrainer

        extra = {
            "plain": {"per_device_train_batch_size": BATCH, "gradient_accumulation_steps": 1,
                      "max_length": MAX_LENGTH},
            "padding-free": {"per_device_train_batch_size": BATCH, "gradient_accumulation_steps": 1,
                             "padding_free": True, "max_length": None},
            "packing-bfd": {"per_device_train_batch_size": 1, "gradient_accumulation_steps": BATCH,
                            "packing": True, "packing_strategy": "bfd", "max_length": MAX_LENGTH},
        }[name]
        output_dir = self._output_dir(name)
        reset_peak_rss()
        tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        set_seed(SEED)
        model = AutoModelForCausalLM.from_pretrained(str(self.model_dir), dtype=torch.float32)
        counter = TokenCounter(tokenizer.pad_token_id)
        counter.attach(model)
        timer = timing_callback_class()()
        config = SFTConfig(
            output_dir=str(output_dir),
            learning_rate=LEARNING_RATE,
            lr_scheduler_type="constant",
            num_train_epochs=1,
            seed=SEED,
            data_seed=SEED,
            assistant_only_loss=True,
            activation_checkpointing=False,
            bf16=False,
            use_cpu=True,
            dataloader_pin_memory=False,
            report_to=[],
            logging_steps=10,
            save_strategy="no",
            eval_strategy="no",
            disable_tqdm=True,
            **extra,
        )
        trainer = SFTTrainer(
            model=model,
            args=config,
            train_dataset=self.train_dataset,
            processing_class=tokenizer,
            peft_config=LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                   target_modules=list(LORA["modules"]), task_type="CAUSAL_LM"),
            callbacks=[timer],
        )
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)
        trainer.train()
        loss = eval_loss(trainer.model, self.encoded_eval)
        m = Measurement(counter.real, counter.processed, counter.padding, timer.seconds, peak_rss_mib(), loss,
                        trainer.state.global_step)
        del trainer, model
        gc.collect()
        return m

    def tuneforge(self, name: str = "tuneforge") -> Measurement:
        """(c) ``SFT.train(context)``. Two in-process wrappers observe it without changing it: one
        attaches the token counter to the loaded model, one adds the loop timer to its callbacks."""
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        from tuneforge.core.hyperparameters import ResolvedHyperparameters
        from tuneforge.training import TrainingContext
        from tuneforge_builtin import trl_common
        from tuneforge_builtin.sft import SFT

        counter = TokenCounter(self.tokenizer.pad_token_id)
        timer = timing_callback_class()()
        original_load, original_callbacks = trl_common.load_model_and_tokenizer, trl_common.callbacks

        def load(*args, **kwargs):
            model, tokenizer = original_load(*args, **kwargs)
            counter.attach(model)
            return model, tokenizer

        def callbacks(*args, **kwargs):
            return [*original_callbacks(*args, **kwargs), timer]

        hp = ResolvedHyperparameters(
            learning_rate=LEARNING_RATE, batch_size=BATCH, max_epochs=1, n_evals=1, n_checkpoints=1,
            lora_rank=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
            early_stopping_patience=0, warmup_ratio=0.0, lr_peak_ratio=0.0, seed=SEED,
            lora_target_modules=LORA["modules"],
        )
        context = TrainingContext(
            job_id="bench", base_model=self.spec, model_dir=self.model_dir, train_file=self.train_file,
            test_file=self.test_file, output_dir=self._output_dir(name), hyperparameters=hp, seed=SEED,
        )
        reset_peak_rss()
        trl_common.load_model_and_tokenizer, trl_common.callbacks = load, callbacks
        try:
            start = time.perf_counter()
            result = SFT.train(context)
            job_seconds = time.perf_counter() - start
        finally:
            trl_common.load_model_and_tokenizer, trl_common.callbacks = original_load, original_callbacks
        rss = peak_rss_mib()
        base = AutoModelForCausalLM.from_pretrained(str(self.model_dir), dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(result.adapter_dir))
        loss = eval_loss(model, self.encoded_eval)
        m = Measurement(counter.real, counter.processed, counter.padding, timer.seconds, rss, loss, result.steps,
                        job_seconds)
        del model, base
        gc.collect()
        return m


# --- main ----------------------------------------------------------------------------------------

def build_model(store: Path):
    from tuneforge.plugins import get_registry
    from tuneforge.trainer.standin import make_standin

    spec = get_registry().base_model(BASE_MODEL)
    standin = dataclasses.replace(spec.standin, config={**spec.standin.config, **SHAPE})
    spec = dataclasses.replace(spec, standin=standin)
    return spec, make_standin(spec, store, seed=0)


def summary(values: list[float]) -> tuple[float, float]:
    return min(values), statistics.median(values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30,
                        help="batches of 8 in (a); training set = steps × 8 conversations, one epoch (default 30)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each alternative, interleaved (default 3)")
    parser.add_argument("--n-conversations", type=int, default=1000,
                        help="conversations generated; training and eval sets are drawn from them (default 1000)")
    parser.add_argument("--n-eval", type=int, default=48, help="held-out conversations for the eval loss (default 48)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 steps, 1 repeat, 200 conversations")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.n_conversations, args.n_eval = 4, 1, 200, 8

    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    import datasets

    datasets.disable_progress_bars()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(cores)

    n_train = args.steps * BATCH
    if n_train + args.n_eval > args.n_conversations:
        parser.error(f"--n-conversations {args.n_conversations} < {n_train} training + {args.n_eval} eval")

    work = Path(tempfile.mkdtemp(prefix="tuneforge-train-bench-"))
    try:
        t0 = time.perf_counter()
        spec, model_dir = build_model(work / "models")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(str(model_dir)).parameters())
        rows = generate_conversations(args.n_conversations, SEED)
        lengths = [len(encode(tokenizer, r)[0]) for r in rows]
        rows = [r for r, n in zip(rows, lengths) if n <= MAX_LENGTH]
        rng = random.Random(SEED)
        rng.shuffle(rows)
        train_rows, test_rows = rows[:n_train], rows[n_train:n_train + args.n_eval]
        train_lengths = [len(encode(tokenizer, r)[0]) for r in train_rows]
        turns = [sum(m["role"] == "assistant" for m in r["messages"]) for r in rows]
        with_tools = sum(1 for r in rows if r.get("tools"))
        print(f"model: llama stand-in {SHAPE['num_hidden_layers']} layers x hidden {SHAPE['hidden_size']}, "
              f"{n_params / 1e6:.1f}M parameters, vocab {len(tokenizer)}; LoRA r{LORA['r']} "
              f"{'/'.join(m[0] for m in LORA['modules'])}, fp32, lr {LEARNING_RATE} constant, "
              f"{torch.get_num_threads()} torch threads")
        print(f"data: {len(rows)} conversations (seed {SEED}; {min(turns)}-{max(turns)} assistant turns, "
              f"{with_tools} with tools, {len(lengths) - len(rows)} over {MAX_LENGTH} tokens dropped); "
              f"train {len(train_rows)} (one epoch, {sum(train_lengths)} tokens, "
              f"{min(train_lengths)}-{max(train_lengths)} per conversation), eval {len(test_rows)}")
        bench = Bench(spec, model_dir, train_rows, test_rows, work)
        print(f"setup: {time.perf_counter() - t0:.1f}s; {args.repeats} interleaved repeats")

        alternatives = {
            "(a) plain TRL, padded b8": lambda: bench.plain_trl("plain"),
            "(b1) TRL padding-free b8": lambda: bench.plain_trl("padding-free"),
            "(b2) TRL packing bfd b1xga8": lambda: bench.plain_trl("packing-bfd"),
            "(c) tuneforge SFT.train": bench.tuneforge,
        }
        results: dict[str, list[Measurement]] = {name: [] for name in alternatives}
        for repeat in range(args.repeats):
            for name, run in alternatives.items():
                m = run()
                results[name].append(m)
                job = f", job {m.job_seconds:.1f}s" if m.job_seconds is not None else ""
                print(f"  repeat {repeat + 1} {name:30s} {m.tokens_per_s:8.0f} real tok/s  "
                      f"loop {m.seconds:6.1f}s  steps {m.steps:3d}  real {m.real_tokens}  "
                      f"pad {100 * m.padding_fraction:4.1f}%  eval loss {m.eval_loss:.4f}{job}", flush=True)

        print()
        print(f"{'alternative':30s} {'real tok/s min':>14s} {'median':>8s} {'padding':>8s} "
              f"{'peak RSS MiB':>12s} {'eval loss':>10s} {'steps':>5s} {'real tokens':>11s}")
        medians = {}
        for name, ms in results.items():
            low, med = summary([m.tokens_per_s for m in ms])
            medians[name] = med
            print(f"{name:30s} {low:14.0f} {med:8.0f} {100 * statistics.median(m.padding_fraction for m in ms):7.1f}% "
                  f"{max(m.peak_rss_mib for m in ms):12.0f} {statistics.median(m.eval_loss for m in ms):10.4f} "
                  f"{ms[0].steps:5d} {ms[0].real_tokens:11d}")
        job_times = [m.job_seconds for m in results["(c) tuneforge SFT.train"]]
        print(f"(c) whole job wall time (load, train, eval, save, comparison with base): "
              f"min {min(job_times):.1f}s median {statistics.median(job_times):.1f}s")
        real = {name: ms[0].real_tokens for name, ms in results.items()}
        if len(set(real.values())) != 1:
            print(f"WARNING: real tokens differ between alternatives: {real}")

        plain = medians["(a) plain TRL, padded b8"]
        best_name = max(("(b1) TRL padding-free b8", "(b2) TRL packing bfd b1xga8"), key=medians.get)
        best = medians[best_name]
        ours = medians["(c) tuneforge SFT.train"]
        print(f"best TRL: {best_name} ({best / plain:.2f}x plain TRL)")
        print(f"sft speedup: {ours / plain:.2f}x vs plain TRL, {ours / best:.2f}x vs best TRL")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
