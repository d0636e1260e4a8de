"""The shipped example dataset: reproducible from its generator, well-formed, varied."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CONVERSATIONS = EXAMPLES / "conversations.jsonl"
ROLES = {"system", "user", "assistant", "tool"}


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_conversations", EXAMPLES / "make_conversations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def lines() -> list[str]:
    return CONVERSATIONS.read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="module")
def conversations(lines: list[str]) -> list[dict]:
    return [json.loads(line) for line in lines]


def test_committed_file_equals_the_generator_default_output() -> None:
    generator = _load_generator()
    expected = generator.render(generator.generate())
    assert CONVERSATIONS.read_text(encoding="utf-8") == expected, (
        "examples/conversations.jsonl is stale: run `python examples/make_conversations.py`"
    )


def test_generator_cli_options(tmp_path: Path) -> None:
    generator = _load_generator()
    out = tmp_path / "small.jsonl"
    assert generator.main(["--out", str(out), "--n-per-topic", "5", "--seed", "3"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 * len(generator.TOPICS)
    assert out.read_text() == generator.render(generator.generate(5, 3))  # deterministic
    assert generator.render(generator.generate(5, 4)) != out.read_text()  # the seed matters


def test_size_topics_and_no_duplicates(lines: list[str], conversations: list[dict]) -> None:
    assert len(conversations) >= 300
    topics = Counter(topic for c in conversations for topic in c["topics"])
    assert len(topics) >= 3
    assert min(topics.values()) >= 50, topics
    duplicates = [line for line, n in Counter(lines).items() if n > 1]
    assert not duplicates


def test_every_conversation_is_well_formed(conversations: list[dict]) -> None:
    for i, conversation in enumerate(conversations):
        messages = conversation["messages"]
        assert set(conversation) <= {"messages", "tools", "topics"}, i
        assert conversation["topics"] and all(isinstance(t, str) for t in conversation["topics"]), i
        assert all(m["role"] in ROLES for m in messages), i
        assert [m for m in messages[1:] if m["role"] == "system"] == [], i  # system only first
        assert messages[0]["role"] in {"system", "user"}, i
        assert messages[-1]["role"] == "assistant" and messages[-1]["content"], i
        assert any(m["role"] == "assistant" for m in messages), i
        for m in messages:
            assert "content" in m or "tool_calls" in m, (i, m)
            if "content" in m:
                assert isinstance(m["content"], str) and m["content"].strip(), (i, m)


def test_tool_calls_name_declared_tools_and_are_answered(conversations: list[dict]) -> None:
    with_tools = [c for c in conversations if "tools" in c]
    assert 0.05 <= len(with_tools) / len(conversations) <= 0.2
    for i, conversation in enumerate(conversations):
        declared = {tool["function"]["name"] for tool in conversation.get("tools", [])}
        for tool in conversation.get("tools", []):
            assert tool["type"] == "function"
            assert tool["function"]["parameters"]["type"] == "object"
        call_ids: set[str] = set()
        for m in conversation["messages"]:
            for call in m.get("tool_calls", []):
                assert m["role"] == "assistant", i
                assert call["function"]["name"] in declared, (i, call)
                assert isinstance(call["function"]["arguments"], dict), (i, call)
                call_ids.add(call["id"])
            if m["role"] == "tool":
                assert m["tool_call_id"] in call_ids, (i, m)  # answers an earlier call
                json.loads(m["content"])
        if declared:
            assert call_ids, i  # a declared tool is actually used


def test_conversations_are_short(conversations: list[dict]) -> None:
    for conversation in conversations:
        words = sum(len(m["content"].split()) for m in conversation["messages"] if m.get("content"))
        assert words <= 120
        assert 1 <= sum(m["role"] == "user" for m in conversation["messages"]) <= 3
