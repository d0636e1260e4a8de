"""Which tokens carry the loss, pinned token for token.

Each expected sequence is written by hand in the published format: a list of segments, each a
control token (one id) or a piece of text, and whether the model is trained to produce it. The
text pieces are encoded on their own; every one of them starts with a space (SentencePiece's "▁")
and BPE pieces never span a "▁", so the concatenation is what the whole text tokenises to. The
actual ids and labels come from ``tuneforge_builtin.sft.tokenize_row`` — the trainer's path —
under ``train_on_inputs`` auto, true and false.
"""

from __future__ import annotations

import json

import pytest

from mistral_fixtures import (  # noqa: F401 (fixtures are imported to be used)
    MISTRAL,
    MIXTRAL,
    mistral_specs,
    standin_dirs,
    standin_tokenizers,
)
LOSS, NO = True, False
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOOLS_JSON = (' [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a '
              'city.", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, '
              '"required": ["city"]}}}]')


def user(text):
    return {"role": "user", "content": text}


def assistant(text, **extra):
    return {"role": "assistant", "content": text, **extra}


PLAIN = [{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello!")]
MULTI_TURN = [user("Hi"), assistant("Hello!"), user("How are you?"), assistant("Fine, thanks.")]
WEIGHTED = [user("Hi"), assistant("Draft answer.", weight=0), user("Again?"), assistant("Final answer.", weight=1),
            user("Once more?"), assistant("Skip me.", weight=0)]
TOOL_CALL = [
    {"role": "system", "content": "Be brief."},
    user("Weather in Paris?"),
    # the universal format's form: arguments as an encoded JSON string
    assistant(None, tool_calls=[{"id": "call00001", "type": "function",
                                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]),
    {"role": "tool", "tool_call_id": "call00001", "content": '{"temperature": 21}'},
    assistant("It is 21 degrees."),
]

# (segments, tools) per conversation and template; a segment is (text or control token, carries loss)
EXPECTED = {
    (MISTRAL, "plain"): ([
        ("<s>", NO), ("[INST]", NO), (" Be brief.\n\nHi", NO), ("[/INST]", NO), (" Hello!", LOSS), ("</s>", LOSS),
    ], None),
    (MISTRAL, "multi_turn"): ([
        ("<s>", NO), ("[INST]", NO), (" Hi", NO), ("[/INST]", NO), (" Hello!", LOSS), ("</s>", LOSS),
        ("[INST]", NO), (" How are you?", NO), ("[/INST]", NO), (" Fine, thanks.", LOSS), ("</s>", LOSS),
    ], None),
    (MISTRAL, "weighted"): ([
        ("<s>", NO), ("[INST]", NO), (" Hi", NO), ("[/INST]", NO), (" Draft answer.", NO), ("</s>", NO),
        ("[INST]", NO), (" Again?", NO), ("[/INST]", NO), (" Final answer.", LOSS), ("</s>", LOSS),
        ("[INST]", NO), (" Once more?", NO), ("[/INST]", NO), (" Skip me.", NO), ("</s>", NO),
    ], None),
    (MISTRAL, "tool_call"): ([
        ("<s>", NO), ("[AVAILABLE_TOOLS]", NO), (TOOLS_JSON, NO), ("[/AVAILABLE_TOOLS]", NO),
        ("[INST]", NO), (" Be brief.\n\nWeather in Paris?", NO), ("[/INST]", NO),
        ("[TOOL_CALLS]", LOSS), (' [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call00001"}]', LOSS),
        ("</s>", LOSS),
        ("[TOOL_RESULTS]", NO), (' {"content": {"temperature": 21}, "call_id": "call00001"}', NO),
        ("[/TOOL_RESULTS]", NO),
        (" It is 21 degrees.", LOSS), ("</s>", LOSS),
    ], [WEATHER_TOOL]),
    (MIXTRAL, "plain"): ([
        ("<s>", NO), (" [INST] Be brief.\n\nHi [/INST]", NO), (" Hello!", LOSS), ("</s>", LOSS),
    ], None),
    (MIXTRAL, "multi_turn"): ([
        ("<s>", NO), (" [INST] Hi [/INST]", NO), (" Hello!", LOSS), ("</s>", LOSS),
        (" [INST] How are you? [/INST]", NO), (" Fine, thanks.", LOSS), ("</s>", LOSS),
    ], None),
    (MIXTRAL, "weighted"): ([
        ("<s>", NO), (" [INST] Hi [/INST]", NO), (" Draft answer.", NO), ("</s>", NO),
        (" [INST] Again? [/INST]", NO), (" Final answer.", LOSS), ("</s>", LOSS),
        (" [INST] Once more? [/INST]", NO), (" Skip me.", NO), ("</s>", NO),
    ], None),
}
CONVERSATIONS = {"plain": PLAIN, "multi_turn": MULTI_TURN, "weighted": WEIGHTED, "tool_call": TOOL_CALL}


def expected_ids(tokenizer, segments) -> tuple[list[int], list[bool]]:
    """The ids of ``segments`` and, per id, whether it carries the loss (assistant-only)."""
    controls = set(tokenizer.added_tokens_encoder)  # matched whole, before any other tokenisation
    ids: list[int] = []
    loss: list[bool] = []
    for piece, carries in segments:
        if piece in controls:
            piece_ids = [tokenizer.convert_tokens_to_ids(piece)]
            assert tokenizer.encode(piece, add_special_tokens=False) == piece_ids
        else:
            assert piece.startswith(" "), piece
            piece_ids = tokenizer.encode(piece, add_special_tokens=False)
            assert tokenizer.convert_ids_to_tokens(piece_ids)[0].startswith("\u2581")
        ids += piece_ids
        loss += [carries] * len(piece_ids)
    return ids, loss


@pytest.mark.parametrize("train_on_inputs", ["auto", "true", "false"])
@pytest.mark.parametrize(("model_id", "name"), sorted(EXPECTED))
def test_loss_mask_is_pinned(model_id, name, train_on_inputs, standin_tokenizers):
    from tuneforge_builtin.sft import ROW_CONVERSATION, classify, resolve_loss_rule, tokenize_row

    tokenizer = standin_tokenizers[model_id]
    segments, tools = EXPECTED[(model_id, name)]
    row = {"messages": CONVERSATIONS[name], **({"tools": tools} if tools else {})}
    assert classify([row], "train") == [ROW_CONVERSATION]
    rule = resolve_loss_rule(train_on_inputs, {ROW_CONVERSATION})
    out = tokenize_row(row, ROW_CONVERSATION, tokenizer, rule)

    ids, loss = expected_ids(tokenizer, segments)
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(row["messages"], tools=tools, tokenize=False)
    assert out["input_ids"] == ids
    if train_on_inputs == "true":  # every token, message weights or not
        assert out["labels"] == ids
    else:  # auto and false: the assistant turns (their </s> included), weight 0 turns excluded
        assert out["labels"] == [t if carries else -100 for t, carries in zip(ids, loss, strict=True)]
        assert any(loss) and not all(loss)


@pytest.mark.parametrize("model_id", [MISTRAL, MIXTRAL])
def test_weights_move_the_loss_between_turns(model_id, standin_tokenizers):
    """The same conversation with the weights flipped: the loss moves to the other turns."""
    from tuneforge_builtin.sft import ROW_CONVERSATION, resolve_loss_rule, tokenize_row

    tokenizer = standin_tokenizers[model_id]
    rule = resolve_loss_rule("auto", {ROW_CONVERSATION})
    flipped = [dict(m, weight=1 - m["weight"]) if "weight" in m else m for m in WEIGHTED]
    a = tokenize_row({"messages": WEIGHTED}, ROW_CONVERSATION, tokenizer, rule)["labels"]
    b = tokenize_row({"messages": flipped}, ROW_CONVERSATION, tokenizer, rule)["labels"]
    unweighted = tokenize_row({"messages": [{k: v for k, v in m.items() if k != "weight"} for m in WEIGHTED]},
                              ROW_CONVERSATION, tokenizer, rule)["labels"]
    trained = lambda labels: {i for i, t in enumerate(labels) if t != -100}  # noqa: E731
    assert trained(a) and trained(b)
    assert trained(a).isdisjoint(trained(b))
    assert trained(a) | trained(b) == trained(unweighted)
    eos = tokenizer.convert_tokens_to_ids("</s>")
    assert [t for t in b if t != -100].count(eos) == 2  # the two weight-0 turns, each with its </s>


@pytest.mark.parametrize(("model_id", "name"), sorted(EXPECTED))
def test_dataset_builder_counts_what_the_trainer_tokenises(model_id, name, mistral_specs, standin_dirs,
                                                            standin_tokenizers):
    """The dataset builder renders with its own jinja2 environment and counts with ``tokenizers``
    alone; it must see the same sequence as the trainer."""
    from tuneforge.dataset_builder.tokens import TokenCounter
    from tuneforge_builtin.sft import ROW_CONVERSATION, resolve_loss_rule, tokenize_row

    _, tools = EXPECTED[(model_id, name)]
    row = {"messages": CONVERSATIONS[name], **({"tools": tools} if tools else {})}
    counter = TokenCounter.for_model(standin_dirs[model_id].parent, model_id,
                                     mistral_specs[model_id].training_chat_template)
    tokenizer = standin_tokenizers[model_id]
    (text,) = counter.texts(json.loads(json.dumps(row)))
    assert text == tokenizer.apply_chat_template(row["messages"], tools=tools, tokenize=False)
    trainer_ids = tokenize_row(row, ROW_CONVERSATION, tokenizer, resolve_loss_rule("auto", {ROW_CONVERSATION}))
    assert counter.count([row]) == [len(trainer_ids["input_ids"])]
