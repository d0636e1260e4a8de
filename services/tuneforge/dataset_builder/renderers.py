"""Hand-written renderers of the built-in families' training chat templates, for counting tokens.

Rendering a chat template with jinja2 costs 50-120 µs an example; these plain functions write
the same text in a few µs. Each one is written for one template text and is chosen only when the
template's SHA-256 is the one it was written for (``for_template``): a changed template, or a
family without a renderer here (Mistral lives in its plugin), is rendered with jinja2, so a
template can never be rendered wrong. Tests compare each renderer with its jinja2 template on
every case of ``tests/test_chat_templates.py`` and on generated conversations.

A renderer takes what ``TokenCounter`` gives the template: ``messages`` as ``template_messages``
makes them (tool-call arguments decoded to objects where they are JSON objects), ``tools`` (a
list or None), ``bos``/``eos``, no generation prompt. It raises ``Unsupported`` for a shape it
was not written for (content that is neither a string, None nor a list of text parts, a role or a
name that is not a string, ...): the caller renders that example with jinja2 instead.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

Renderer = Callable[[list, Any, str, str], str]


class Unsupported(Exception):
    """An example this renderer was not written for; render it with the jinja2 template."""


def template_hash(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


def _tojson(value: Any, indent: int | None = None) -> str:
    """The ``tojson`` filter of ``tokens.compile_template``."""
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _text(content: Any) -> str:
    """The templates' ``render_text`` macro: None -> "", a string as is, text parts joined."""
    if content.__class__ is str:
        return content
    if content is None:
        return ""
    if content.__class__ is not list:
        raise Unsupported("content")
    out = []
    for part in content:
        if part.__class__ is str:
            out.append(part)
        elif part.__class__ is dict:
            if part.get("type") == "text":
                text = part.get("text", "")
                if text.__class__ is not str:
                    raise Unsupported("text part")
                out.append(text)
        else:
            raise Unsupported("content part")
    return "".join(out)


def _str(value: Any) -> str:
    if value.__class__ is not str:
        raise Unsupported("not a string")
    return value


def _message(message: Any) -> dict:
    if message.__class__ is not dict:
        raise Unsupported("message")
    return message


def _arguments(call: dict) -> str:
    """``arguments`` rendered as the templates do: a string as is, anything else with tojson."""
    if "arguments" not in call:
        raise Unsupported("arguments")
    args = call["arguments"]
    return args if args.__class__ is str else _tojson(args)


def _tool_calls(message: dict) -> list:
    calls = message.get("tool_calls")
    if not calls:
        return []
    if calls.__class__ is not list:
        raise Unsupported("tool_calls")
    out = []
    for call in calls:
        if call.__class__ is not dict:
            raise Unsupported("tool call")
        if "function" in call:
            call = call["function"]
            if call.__class__ is not dict:
                raise Unsupported("tool call function")
        out.append(call)
    return out


def _tools(tools: Any) -> list:
    if not tools:
        return []
    if tools.__class__ is not list:
        raise Unsupported("tools")
    return tools


# -- llama3_training.jinja -------------------------------------------------------------------------

LLAMA3_TOOLS_INTRO = (
    "You have access to the following functions. To call a function, please respond with JSON for a function call."
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
    "Do not use variables.\n\n"
)


def render_llama3(messages: list, tools: Any, bos: str, eos: str) -> str:
    tools = _tools(tools)
    out = [bos]
    if messages and _message(messages[0]).get("role") == "system":
        system = _text(messages[0].get("content")).strip()
        rest = messages[1:]
    else:
        system = ""
        rest = messages
    out.append("<|start_header_id|>system<|end_header_id|>\n\n")
    if tools:
        out.append("Environment: ipython\n")
    out.append("Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n")
    if tools:
        out.append(LLAMA3_TOOLS_INTRO)
        for tool in tools:
            out.append(_tojson(tool, indent=4))
            out.append("\n\n")
    out.append(system)
    out.append("<|eot_id|>")
    for message in rest:
        role = _str(_message(message).get("role"))
        if role == "assistant":
            out.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
            calls = _tool_calls(message)
            if calls:
                text = _text(message.get("content")).strip()
                if text:
                    out.append(text + "\n")
                for i, call in enumerate(calls):
                    if i:
                        out.append("\n")
                    out.append('{"name": "' + _str(call.get("name")) + '", "parameters": ' + _arguments(call) + "}")
            else:
                out.append(_text(message.get("content")).strip())
            out.append("<|eot_id|>")
        elif role == "tool" or role == "ipython":
            if "content" not in message:
                raise Unsupported("tool message without content")  # tojson of an undefined value
            content = message["content"]
            out.append("<|start_header_id|>ipython<|end_header_id|>\n\n")
            out.append(content if content.__class__ is str else _tojson(content))
            out.append("<|eot_id|>")
        else:
            out.append("<|start_header_id|>" + role + "<|end_header_id|>\n\n"
                       + _text(message.get("content")).strip() + "<|eot_id|>")
    return "".join(out)


# -- qwen2_5_training.jinja ------------------------------------------------------------------------

QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN_TOOLS_INTRO = ("\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
QWEN_TOOLS_OUTRO = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                    "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
                    "\"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n")


def render_qwen2_5(messages: list, tools: Any, bos: str, eos: str) -> str:
    tools = _tools(tools)
    if not messages:
        raise Unsupported("no messages")  # the template reads messages[0]
    first_is_system = _message(messages[0]).get("role") == "system"
    out = []
    if tools:
        out.append("<|im_start|>system\n")
        out.append(_text(messages[0].get("content")) if first_is_system else QWEN_DEFAULT_SYSTEM)
        out.append(QWEN_TOOLS_INTRO)
        for tool in tools:
            out.append("\n")
            out.append(_tojson(tool))
        out.append(QWEN_TOOLS_OUTRO)
    elif first_is_system:
        out.append("<|im_start|>system\n" + _text(messages[0].get("content")) + "<|im_end|>\n")
    else:
        out.append("<|im_start|>system\n" + QWEN_DEFAULT_SYSTEM + "<|im_end|>\n")
    last = len(messages) - 1
    for i, message in enumerate(messages):
        role = _str(_message(message).get("role"))
        if role == "user" or (role == "system" and i):
            out.append("<|im_start|>" + role + "\n" + _text(message.get("content")) + "<|im_end|>\n")
        elif role == "assistant":
            content = message.get("content")
            out.append("<|im_start|>assistant\n")
            out.append(_text(content))
            for j, call in enumerate(_tool_calls(message)):
                if content or j:
                    out.append("\n")
                out.append('<tool_call>\n{"name": "' + _str(call.get("name")) + '", "arguments": '
                           + _arguments(call) + "}\n</tool_call>")
            out.append("<|im_end|>\n")
        elif role == "tool":
            if i == 0 or _message(messages[i - 1]).get("role") != "tool":
                out.append("<|im_start|>user")
            content = message.get("content")
            out.append("\n<tool_response>\n" + (content if content.__class__ is str else _text(content))
                       + "\n</tool_response>")
            if i == last or _message(messages[i + 1]).get("role") != "tool":
                out.append("<|im_end|>\n")
    return "".join(out)


# -- deepseek_r1_training.jinja --------------------------------------------------------------------

def render_deepseek_r1(messages: list, tools: Any, bos: str, eos: str) -> str:
    system = ""
    for message in messages:
        if _message(message).get("role") == "system":
            system = _text(message.get("content"))
    out = [bos, system]
    is_tool = False
    for message in messages:
        role = message.get("role")
        if role == "user":
            if is_tool:
                out.append("<｜tool▁outputs▁end｜>")
                is_tool = False
            out.append("<｜User｜>" + _text(message.get("content")))
        elif role == "assistant":
            if is_tool:
                out.append("<｜tool▁outputs▁end｜>")
                is_tool = False
            else:
                out.append("<｜Assistant｜>")
            reasoning = message.get("reasoning")
            if reasoning:
                out.append("<think>\n" + _str(reasoning).strip() + "\n</think>\n\n")
            out.append(_text(message.get("content")))
            calls = _tool_calls(message)
            if calls:
                out.append("<｜tool▁calls▁begin｜>")
                for call in calls:
                    out.append("<｜tool▁call▁begin｜>function<｜tool▁sep｜>" + _str(call.get("name"))
                               + "\n```json\n" + _arguments(call) + "\n```<｜tool▁call▁end｜>")
                out.append("<｜tool▁calls▁end｜>")
            out.append("<｜end▁of▁sentence｜>")
        elif role == "tool":
            if not is_tool:
                out.append("<｜tool▁outputs▁begin｜>")
                is_tool = True
            content = message.get("content")
            out.append("<｜tool▁output▁begin｜>" + (content if content.__class__ is str else _text(content))
                       + "<｜tool▁output▁end｜>")
        elif role.__class__ is not str:
            raise Unsupported("role")
    if is_tool:
        out.append("<｜tool▁outputs▁end｜>")
    return "".join(out)


# -- smollm2_training.jinja ------------------------------------------------------------------------

SMOLLM2_DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def render_smollm2(messages: list, tools: Any, bos: str, eos: str) -> str:
    out = []
    if messages and _message(messages[0]).get("role") != "system":
        out.append(SMOLLM2_DEFAULT_SYSTEM)
    for message in messages:
        role = _str(_message(message).get("role"))
        out.append("<|im_start|>" + role + "\n" + _text(message.get("content")) + "<|im_end|>\n")
    return "".join(out)


# -- selection by template hash ----------------------------------------------------------------------

# SHA-256 of the template text each renderer was written for (tests check that the shipped
# templates still have these hashes: a changed template needs its renderer checked again).
RENDERERS: dict[str, tuple[str, Renderer]] = {
    "226dd790bc6d88347337a1ce194a6ee1ea7d11e61ef11d07c4b4d8b261a25917": ("llama3_training.jinja", render_llama3),
    "376ccd4180ff25825eeb818af105ac17ed6e73dcc11f55a7015dd63fe0e83bce": ("qwen2_5_training.jinja", render_qwen2_5),
    "15afde0ce06db72132936cb9ee36d832954024410dd28a14037770990dade748": ("deepseek_r1_training.jinja", render_deepseek_r1),
    "07be0cf80a01079d2f83d002d27750f0948185ec8a8156b408dc35d4ba2fc49c": ("smollm2_training.jinja", render_smollm2),
}


def for_template(source: str) -> Renderer | None:
    """The hand-written renderer of exactly this template text, or None (render with jinja2)."""
    found = RENDERERS.get(template_hash(source))
    return found[1] if found else None
