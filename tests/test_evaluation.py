"""Did it learn? The comparison with the base model at the end of every training job: the tool-call
parser and scorer (pure), a real SFT run on the Llama 3.1 stand-in (base vs tuned eval loss on the
same batches, tool-call accuracy, greedy samples, samples.jsonl), a DPO run's samples, the worker's
proto conversion and the email text."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from test_dpo_training import make_pairs
from test_sft_training import hyperparameters, make_conversations, write_jsonl
from tuneforge.plugins import get_registry
from tuneforge.training import TrainingContext
from tuneforge_builtin import evaluation
from tuneforge_builtin.evaluation import parse_tool_calls, tool_call_accuracy

MODEL_ID = "llama-3.1-8b"  # tool calling is one of its capabilities
WEATHER = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
SEARCH = {"name": "search_web", "arguments": {"query": "apple", "limit": 3}}


# ---------------------------------------------------------------------------------------------
# parsing and scoring (pure)


@pytest.mark.parametrize("text", [
    # Llama 3: a bare object with "parameters"
    '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
    # Qwen 2.5: tagged, "arguments"
    '<tool_call>\n{"name": "get_weather", "arguments": {"unit": "celsius", "city": "Paris"}}\n</tool_call>',
    # Mistral v0.3: an array after the marker
    '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]',
    # arguments as a JSON string (OpenAI's form)
    '{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\", \\"unit\\": \\"celsius\\"}"}',
    # prose around the JSON, a stray bracket before it
    'Sure [let me check]: {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}} Done.',
])
def test_each_family_format_parses_to_the_same_call(text):
    assert parse_tool_calls(text) == [WEATHER]
    assert tool_call_accuracy([text], [[WEATHER]]) == 1.0


def test_accuracy_counts_only_exact_call_sets():
    reference_as_string = {"name": "get_weather", "arguments": json.dumps(WEATHER["arguments"])}
    cases = [
        ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', [reference_as_string], True),
        ('{"name": "get_wether", "arguments": {"city": "Paris", "unit": "celsius"}}', [WEATHER], False),  # name
        ('{"name": "get_weather", "arguments": {"city": "Lima", "unit": "celsius"}}', [WEATHER], False),  # value
        ('{"name": "get_weather", "arguments": {"city": "Paris"}}', [WEATHER], False),  # missing argument
        ("It is sunny in Paris, no need to call anything.", [WEATHER], False),  # no call
        ('{"city": "Paris", "unit": "celsius"}', [WEATHER], False),  # arguments without a name
        # two calls, in either order, one per tag
        (('<tool_call>\n{"name": "search_web", "arguments": {"query": "apple", "limit": 3}}\n</tool_call>\n'
          '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'),
         [WEATHER, SEARCH], True),
        ('[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]', [WEATHER, SEARCH], False),
        (('[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
          '{"name": "search_web", "arguments": {"query": "apple", "limit": 3}}]'), [WEATHER], False),  # one extra
        ('{"name": "search_web", "arguments": {"query": "apple", "limit": "3"}}', [SEARCH], False),  # 3 vs "3"
    ]
    for text, reference, right in cases:
        assert tool_call_accuracy([text], [reference]) == (1.0 if right else 0.0), text
    texts, references = zip(*[(t, r) for t, r, _ in cases], strict=True)
    assert tool_call_accuracy(list(texts), list(references)) == pytest.approx(sum(r for *_, r in cases) / len(cases)) == 0.2
    assert tool_call_accuracy([], []) is None
    with pytest.raises(ValueError):
        tool_call_accuracy(["x"], [])


def test_parser_takes_calls_from_openai_shapes_and_ignores_broken_json():
    openai = '{"type": "function", "function": {"name": "search_web", "arguments": "{\\"query\\": \\"apple\\", \\"limit\\": 3}"}}'
    assert parse_tool_calls(openai) == [SEARCH]
    assert parse_tool_calls('{"name": "get_weather", "arguments": {"city": "Par') == []
    assert parse_tool_calls("") == []


def test_evaluation_sets_from_test_rows():
    rows = make_conversations(8, seed=1)  # rows 0 and 4: weather; 3 and 7: search
    cases = evaluation.conversation_evaluation_set(rows)
    assert len(cases.samples) == evaluation.N_SAMPLES
    first = cases.samples[0]  # the weather conversation up to its last assistant message
    assert [m["role"] for m in first.prompt.messages] == ["system", "user", "assistant", "tool"]
    assert first.reference == rows[0]["messages"][-1]["content"] and first.prompt.tools == rows[0]["tools"]
    assert first.prompt.display == rows[0]["messages"][1]["content"]
    assert json.loads(first.prompt.as_json) == first.prompt.messages
    assert cases.tool_call_turns_total == 4 and len(cases.tool_calls) == 4
    weather = cases.tool_calls[0]
    assert [m["role"] for m in weather.prompt.messages] == ["system", "user"]
    assert weather.calls == [{"name": "get_weather", "arguments": rows[0]["messages"][2]["tool_calls"][0]["function"]["arguments"]}]
    search_sample = cases.samples[3]  # a tool call as the reference: compact JSON
    assert json.loads(search_sample.reference) == [{"name": "search_web", "arguments": {"query": rows[3]["messages"][1]["tool_calls"][0]["function"]["arguments"]["query"], "limit": 3}}]

    from tuneforge_builtin.dpo import preference_pair

    pairs = [preference_pair(r, "test") for r in make_pairs(6)]
    dpo_cases = evaluation.preference_evaluation_set(pairs)
    assert len(dpo_cases.samples) == 5 and dpo_cases.samples[1].reference == pairs[1]["chosen"][0]["content"]
    assert dpo_cases.tool_call_turns_total == 2  # pairs 0 and 4 prefer a weather call


# ---------------------------------------------------------------------------------------------
# real runs on a stand-in


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread_and_short_generations(one_torch_thread):
    saved = evaluation.MAX_NEW_TOKENS_SAMPLE, evaluation.MAX_NEW_TOKENS_TOOL_CALL
    evaluation.MAX_NEW_TOKENS_SAMPLE, evaluation.MAX_NEW_TOKENS_TOOL_CALL = 24, 32
    yield
    evaluation.MAX_NEW_TOKENS_SAMPLE, evaluation.MAX_NEW_TOKENS_TOOL_CALL = saved


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    from tuneforge.trainer.standin import make_standin

    root = tmp_path_factory.mktemp("models")
    make_standin(get_registry().base_model(MODEL_ID), root, seed=0)
    return root


def run(method: str, train: list[dict], test: list[dict], store: Path, tmp_path: Path, **options):
    spec = get_registry().base_model(MODEL_ID)
    hp = hyperparameters(n_evals=1, n_checkpoints=1)  # lr 2e-2, batch 8, 2 epochs
    context = TrainingContext(
        job_id=f"job-eval-{method}", base_model=spec, model_dir=store / MODEL_ID,
        train_file=write_jsonl(tmp_path / "train.jsonl", train), test_file=write_jsonl(tmp_path / "test.jsonl", test),
        output_dir=tmp_path / "run", hyperparameters=hp, method_options=options, seed=0)
    return get_registry().method(method).train(context)


@pytest.fixture(scope="module")
def sft_result(store, tmp_path_factory):
    rows = make_conversations(48, seed=1)
    return run("sft", rows[:40], rows[40:], store, tmp_path_factory.mktemp("sft"))


def test_sft_result_compares_with_the_base_model(sft_result):
    result = sft_result
    assert result.steps == 10 and not result.cancelled
    assert math.isfinite(result.base_eval_loss) and math.isfinite(result.eval_loss)
    # lr 2e-2 over 10 steps on a repetitive task: the adapter must beat the random base clearly.
    assert result.eval_loss < result.base_eval_loss - 0.5, (result.base_eval_loss, result.eval_loss)
    assert 0.0 <= result.tool_call_accuracy <= 1.0 and 0.0 <= result.base_tool_call_accuracy <= 1.0
    assert result.metrics["tool_call_turns_evaluated"] == 4 == result.metrics["tool_call_turns_total"]
    assert result.metrics["evaluation_samples"] == 5 and len(result.samples) == 5

    test_rows = make_conversations(48, seed=1)[40:]
    for sample, row in zip(result.samples, test_rows, strict=False):
        assert set(sample) == {"prompt_json", "prompt", "reference", "base_answer", "tuned_answer"}
        assert json.loads(sample["prompt_json"]) == row["messages"][:-1]
        assert sample["prompt"] == [m for m in row["messages"] if m["role"] == "user"][-1]["content"]
    assert any(s["base_answer"] for s in result.samples) and any(s["tuned_answer"] for s in result.samples)
    # The random base and the trained adapter do not answer alike.
    assert [s["base_answer"] for s in result.samples] != [s["tuned_answer"] for s in result.samples]
    print("samples:", json.dumps(result.samples[:2], indent=1))

    written = [json.loads(line) for line in (result.adapter_dir / "samples.jsonl").read_text().splitlines()]
    assert written == result.samples
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()


def test_worker_and_email_carry_the_comparison(sft_result):
    from tuneforge.api.common.v1 import common_pb2
    from tuneforge.api.events.v1 import events_pb2 as ev
    from tuneforge.notifier.messages import job_succeeded
    from tuneforge.trainer.worker import training_metrics

    metrics = training_metrics(sft_result, 12.5)
    assert metrics.base_eval_loss == pytest.approx(sft_result.base_eval_loss)
    assert metrics.eval_loss == pytest.approx(sft_result.eval_loss)
    assert metrics.tool_call_accuracy == pytest.approx(sft_result.tool_call_accuracy)
    assert metrics.base_tool_call_accuracy == pytest.approx(sft_result.base_tool_call_accuracy)
    assert [s.tuned_answer for s in metrics.samples] == [s["tuned_answer"] for s in sft_result.samples]
    assert [s.prompt_json for s in metrics.samples] == [s["prompt_json"] for s in sft_result.samples]
    assert metrics.extra["tool_call_turns_evaluated"] == 4
    # It survives the wire.
    assert common_pb2.TrainingMetrics.FromString(metrics.SerializeToString()) == metrics

    event = ev.JobSucceeded(job_name="weather", model_name="weather-bot", model_id="m-1", method="sft",
                            base_model=MODEL_ID, metrics=metrics)
    _, body = job_succeeded(event)
    change = (sft_result.eval_loss - sft_result.base_eval_loss) / sft_result.base_eval_loss
    assert (f"Eval loss: base {sft_result.base_eval_loss:.4f} -> fine-tuned {sft_result.eval_loss:.4f} "
            f"({change:+.1%})") in body
    assert (f"Tool-call accuracy (greedy, exact calls): base {sft_result.base_tool_call_accuracy:.1%} -> "
            f"fine-tuned {sft_result.tool_call_accuracy:.1%} over 4 tool-call turns") in body
    assert "Samples from the test split (greedy, base model vs fine-tuned, 5):" in body
    first = sft_result.samples[0]
    assert f"  1. Prompt:     {first['prompt']}" in body
    assert f"     Reference:  {first['reference']}" in body
    assert "     Base:       " in body and "     Fine-tuned: " in body
    assert body.count("Reference:") == 5
    assert "tool_call_turns_evaluated" not in body  # shown in words, not as a raw metric

    long = common_pb2.TrainingMetrics(samples=[common_pb2.EvaluationSample(
        prompt="p", reference="r", base_answer="word " * 400, tuned_answer="")])
    _, body = job_succeeded(ev.JobSucceeded(job_name="j", model_name="m", method="sft", metrics=long))
    base_line = next(line for line in body.splitlines() if "Base:" in line)
    assert len(base_line) < 330 and base_line.endswith("…")
    assert "Fine-tuned: (empty)" in body
    assert "Eval loss: base" not in body  # no base loss given: no comparison line


def test_dpo_result_has_samples_but_no_base_loss(store, tmp_path):
    pairs = make_pairs(20, seed=0)
    result = run("dpo", pairs[:16], pairs[16:], store, tmp_path, beta=0.2)
    assert result.steps == 4 and not result.cancelled
    assert result.base_eval_loss is None  # ln 2 by construction: the reward accuracy says more
    assert 0.0 <= result.metrics["eval_reward_accuracy"] <= 1.0
    assert len(result.samples) == 4
    assert result.samples[0]["reference"] == json.dumps(
        [{"name": "get_weather", "arguments": json.loads(pairs[16]["preferred_output"][0]["tool_calls"][0]["function"]["arguments"])}],
        separators=(",", ":"))
    assert all(s["base_answer"] or s["tuned_answer"] for s in result.samples)
    assert result.metrics["tool_call_turns_evaluated"] == 1  # pair 16 prefers a weather call
    assert 0.0 <= result.tool_call_accuracy <= 1.0
    assert (result.adapter_dir / "samples.jsonl").is_file()


def test_cancelled_run_skips_the_comparison(store, tmp_path):
    rows = make_conversations(24, seed=2)
    spec = get_registry().base_model(MODEL_ID)
    hp = hyperparameters(n_evals=1, n_checkpoints=1)
    context = TrainingContext(
        job_id="job-eval-cancel", base_model=spec, model_dir=store / MODEL_ID,
        train_file=write_jsonl(tmp_path / "train.jsonl", rows[:16]),
        test_file=write_jsonl(tmp_path / "test.jsonl", rows[16:]),
        output_dir=tmp_path / "run", hyperparameters=hp, seed=0, should_stop=lambda: True)
    result = get_registry().method("sft").train(context)
    assert result.cancelled and result.steps == 1
    assert result.base_eval_loss is None and result.samples == [] and result.tool_call_accuracy is None
    assert not (result.adapter_dir / "samples.jsonl").exists()
