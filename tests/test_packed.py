"""The padding-free fast path gives what the plain path gives: the same tokens and loss masks as
TRL's ``SFTTrainer`` makes, the same logits as one example at a time, the same loss and gradients as
a padded batch, and generation still works on a model loaded with the varlen attention.

Tiny random stand-ins (Llama 3 with grouped-query attention, Qwen2 with q/k/v biases), built
locally; about 30 s on 2 CPU cores.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def conversations() -> list[dict]:
    rows = []
    for i in range(6):
        messages = [{"role": "system", "content": "You are terse."}] if i % 2 else []
        for turn in range(1 + i % 3):
            messages += [{"role": "user", "content": f"Question {i}.{turn}: how many apples are in box {i * 7}?"},
                         {"role": "assistant", "content": f"There are {i * turn + 3} apples in box {i * 7}."}]
        rows.append({"messages": messages})
    rows.append({"messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"temperature": 4})},
        {"role": "assistant", "content": "It is 4 degrees in Oslo."}], "tools": [WEATHER_TOOL]})
    return rows


@pytest.fixture(scope="module", params=["llama-3.2-1b", "qwen-2.5-14b"])
def standin(request, tmp_path_factory):
    from tuneforge.plugins import get_registry
    from tuneforge.trainer.standin import make_standin

    spec = get_registry().base_model(request.param)
    return spec, make_standin(spec, tmp_path_factory.mktemp(request.param), seed=1)


def load(model_dir, attention: str, spec):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.chat_template = spec.training_chat_template
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation=attention)
    return model, tokenizer


def encoded(tokenizer, rows):
    from tuneforge_builtin.sft import ROW_CONVERSATION, resolve_loss_rule, tokenize_row

    rule = resolve_loss_rule("auto", {ROW_CONVERSATION})
    return [tokenize_row(r, ROW_CONVERSATION, tokenizer, rule) for r in rows]


def with_lora(model, seed=0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                            task_type="CAUSAL_LM"))


def trl_labels(model, tokenizer, dataset, tmp_path, **config):
    from trl import SFTConfig, SFTTrainer

    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset,
                         args=SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_length=None,
                                        **config))
    return [(row["input_ids"], row["labels"]) for row in trainer.train_dataset]


def test_tokens_and_masks_match_trl_sfttrainer(standin, tmp_path):
    """TRL's own dataset processing (its ``labels``) against our one-pass tokenisation, for
    conversations (assistant turns only, tools), prompt/completion (completion only) and text."""
    from datasets import Dataset, Features, Json, List

    from tuneforge_builtin.sft import (
        ROW_CONVERSATION,
        ROW_PROMPT_COMPLETION,
        ROW_TEXT,
        resolve_loss_rule,
        tokenize_row,
    )

    spec, model_dir = standin
    model, tokenizer = load(model_dir, "sdpa", spec)
    rows = conversations()
    features = Features({"messages": List(Json()), "tools": List(Json())})
    dataset = Dataset.from_dict({"messages": [r["messages"] for r in rows],
                                 "tools": [r.get("tools") for r in rows]}, features=features)
    theirs = trl_labels(model, tokenizer, dataset, tmp_path / "c", assistant_only_loss=True)
    ours = encoded(tokenizer, rows)
    assert [(o["input_ids"], o["labels"]) for o in ours] == theirs
    assert all(any(x != -100 for x in o["labels"]) and any(x == -100 for x in o["labels"]) for o in ours)

    pairs = [{"prompt": f"Count to {i}:", "completion": " " + " ".join(str(k) for k in range(i))} for i in range(2, 7)]
    theirs = trl_labels(model, tokenizer, Dataset.from_list(pairs), tmp_path / "p", completion_only_loss=True)
    rule = resolve_loss_rule("auto", {ROW_PROMPT_COMPLETION})
    ours = [tokenize_row(r, ROW_PROMPT_COMPLETION, tokenizer, rule) for r in pairs]
    assert [(o["input_ids"], o["labels"]) for o in ours] == theirs

    texts = [{"text": f"Plain text number {i} about rivers and stones."} for i in range(4)]
    theirs = trl_labels(model, tokenizer, Dataset.from_list(texts), tmp_path / "t")
    rule = resolve_loss_rule("auto", {ROW_TEXT})
    ours = [tokenize_row(r, ROW_TEXT, tokenizer, rule) for r in texts]
    assert [o["input_ids"] for o in ours] == [t[0] for t in theirs]
    assert [o["labels"] for o in ours] == [t[0] for t in theirs]  # loss on every token
    assert ROW_CONVERSATION  # (all three kinds covered)


def test_varlen_logits_equal_one_example_at_a_time(standin):
    from tuneforge_builtin import packed

    spec, model_dir = standin
    name = packed.register_attention()
    fast, tokenizer = load(model_dir, name, spec)
    plain, _ = load(model_dir, "sdpa", spec)
    examples = encoded(tokenizer, conversations())
    batch = packed.pack(examples)
    assert batch["input_ids"].shape[0] == 1
    assert batch["input_ids"].shape[1] == sum(len(e["input_ids"]) for e in examples)  # no padding at all
    everywhere = torch.arange(batch["input_ids"].shape[1])
    with torch.no_grad():
        got = packed.logits_at(fast, batch, everywhere)
        start = 0
        for e in examples:
            n = len(e["input_ids"])
            alone = plain(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).logits[0]
            torch.testing.assert_close(got[start:start + n], alone, rtol=1e-4, atol=1e-4)
            start += n
    # Without the boundaries, the same row attends across examples: the check above can fail.
    with torch.no_grad():
        crossing = fast(input_ids=batch["input_ids"], use_cache=False).logits[0]
    n0 = len(examples[0]["input_ids"])
    assert not torch.allclose(crossing[n0:n0 + 5], got[n0:n0 + 5], atol=1e-3)


def test_packed_loss_and_gradients_equal_padded_batch(standin):
    """The loss of one packed row (LM head on loss positions only) against the plain padded batch's
    mean over loss tokens, and the LoRA gradients of both."""
    from tuneforge_builtin import packed

    spec, model_dir = standin
    name = packed.register_attention()
    fast, tokenizer = load(model_dir, name, spec)
    plain, _ = load(model_dir, "sdpa", spec)
    fast, plain = with_lora(fast), with_lora(plain)
    examples = encoded(tokenizer, conversations())

    batch = packed.pack(examples)
    loss_sum, count = packed.token_loss_sum(fast, batch)
    fast_loss = loss_sum / count
    fast_loss.backward()

    width = max(len(e["input_ids"]) for e in examples)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([e["input_ids"] + [pad] * (width - len(e["input_ids"])) for e in examples])
    mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in examples])
    labels = torch.tensor([e["labels"] + [-100] * (width - len(e["labels"])) for e in examples])
    assert (ids == pad).sum() > 0  # the plain batch really is padded
    plain_loss = plain(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
    plain_loss.backward()

    assert count == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(fast_loss, plain_loss, rtol=1e-5, atol=1e-5)
    grads_fast = {n: p.grad for n, p in fast.named_parameters() if p.requires_grad}
    grads_plain = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    assert grads_fast.keys() == grads_plain.keys() and grads_fast
    for n in grads_fast:
        torch.testing.assert_close(grads_fast[n], grads_plain[n], rtol=1e-3, atol=1e-5, msg=n)


def test_generation_unchanged_with_varlen_attention(standin):
    from tuneforge_builtin import packed

    spec, model_dir = standin
    fast, tokenizer = load(model_dir, packed.register_attention(), spec)
    plain, _ = load(model_dir, "sdpa", spec)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hello there, how are you?"}],
                                           add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    x = torch.tensor([prompt])
    a = fast.generate(x, max_new_tokens=12, do_sample=False)
    b = plain.generate(x, max_new_tokens=12, do_sample=False)
    assert a.tolist() == b.tolist()
    # A left-padded batch still gets its padding mask (the mask function is sdpa's outside packing).
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    short = prompt[-6:]
    ids = torch.tensor([prompt, [pad] * (len(prompt) - len(short)) + short])
    mask = torch.tensor([[1] * len(prompt), [0] * (len(prompt) - len(short)) + [1] * len(short)])
    a = fast.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=pad)
    b = plain.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=pad)
    assert a.tolist() == b.tolist()


def test_empty_loss_batch_is_a_zero_loss_with_a_graph(standin):
    from tuneforge_builtin import packed

    spec, model_dir = standin
    fast, tokenizer = load(model_dir, packed.register_attention(), spec)
    fast = with_lora(fast)
    example = encoded(tokenizer, conversations()[:1])[0]
    batch = packed.pack([{"input_ids": example["input_ids"], "labels": [-100] * len(example["input_ids"])}])
    loss, count = packed.token_loss_sum(fast, batch)
    assert count == 0 and float(loss.detach()) == 0.0
    loss.backward()  # no error: the graph is connected


def test_large_batch_split_into_forwards_gives_the_same_gradients(standin, tmp_path):
    """A batch over the token budget trains as several forwards (cut at example boundaries) with
    the same loss and gradients as one."""
    from transformers import TrainingArguments

    from tuneforge_builtin import packed

    spec, model_dir = standin
    examples = encoded(load(model_dir, "sdpa", spec)[1], conversations())
    batch = packed.pack(examples)
    lengths = [len(e["input_ids"]) for e in examples]
    budget = max(lengths) + 1
    rows = packed.split_row(batch, budget)
    assert len(rows) > 1 and all(r["input_ids"].shape[1] <= budget for r in rows)
    assert torch.equal(torch.cat([r["input_ids"] for r in rows], dim=1), batch["input_ids"])
    assert sum(len(r["cu_seq_lens_q"]) - 1 for r in rows) == len(examples)

    results = []
    for max_tokens in (0, budget):
        model = with_lora(load(model_dir, packed.register_attention(), spec)[0])
        trainer = packed.packed_trainer_class()(
            model=model, args=TrainingArguments(output_dir=str(tmp_path / str(max_tokens)), use_cpu=True,
                                                report_to=[], remove_unused_columns=False))
        trainer.max_tokens_per_forward = max_tokens
        trainer.current_gradient_accumulation_steps = 1  # set by train(); as the trainer calls it:
        count = int((batch["labels"][:, 1:] != -100).sum())
        loss = trainer.training_step(model, packed.pack(examples), num_items_in_batch=count)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss, grads))
    (whole, whole_grads), (split, split_grads) = results
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6)
    for name in whole_grads:
        torch.testing.assert_close(split_grads[name], whole_grads[name], rtol=1e-4, atol=1e-6, msg=name)
