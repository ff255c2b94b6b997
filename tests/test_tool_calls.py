"""Tool calls (function calling): LLaMA-Factory's ShareGPT `function_call` / `observation` turns and `tools`
column, rendered as Qwen2.5's and Qwen3's own jinja templates render the same conversation.

Oracle: transformers' `apply_chat_template(messages, tools=...)` with the real chat templates in
../shared/real (skipped where that folder is absent), given the conversation in OpenAI / HF form: a
function_call turn is an assistant message with `tool_calls`, an observation a `tool` message.
The loss trains the calls and the replies, never the observations.
"""
import json
from pathlib import Path

import pytest
from test_templates_real import needs_real, real  # noqa: F401 (real: the fixture)

from minitune.data.dataset import IGNORE_INDEX, tokenize_conversation
from minitune.data.formats import DataError, load_examples
from minitune.data.registry import load_sft, resolve_datasets
from minitune.data.templates import TEMPLATES, TemplateError, get_template, render, render_segments
from minitune.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]

# a glaive_toolcall-style signature: bare (LLaMA-Factory and OpenAI wrap it in {"type": "function", ...})
TOOLS = [{"name": "get_weather", "description": "Current weather in a city, in °C",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
         {"name": "get_time", "description": "Local time", "parameters": {"type": "object", "properties": {}}}]
HF_TOOLS = [{"type": "function", "function": t} for t in TOOLS]

SYS = {"role": "system", "content": "You are a weather bot."}
ASK = {"role": "user", "content": "Weather in Zürich?"}
CALL = {"role": "function_call", "content": json.dumps({"name": "get_weather", "arguments": {"city": "Zürich"}})}
TWO_CALLS = {"role": "function_call", "content": json.dumps([
    {"name": "get_weather", "arguments": {"city": "Zürich"}}, {"name": "get_time", "arguments": {}}])}
RESULT = {"role": "observation", "content": '{"temperature": 21, "sky": "clear"}'}
REPLY = {"role": "assistant", "content": "It is 21 °C and clear in Zürich."}
THANKS = {"role": "user", "content": "Thanks!"}
WELCOME = {"role": "assistant", "content": "You're welcome."}

CONVERSATIONS = {
    "call, result, reply": [ASK, CALL, RESULT, REPLY],
    "system + call, result, reply": [SYS, ASK, CALL, RESULT, REPLY],
    "two calls in one turn": [ASK, TWO_CALLS, RESULT, REPLY],
    "ends with the result (generation prompt)": [ASK, CALL, RESULT],
    "ends with the call": [SYS, ASK, CALL],
    "a plain turn after the tool turn": [ASK, CALL, RESULT, REPLY, THANKS, WELCOME],
    "empty system prompt": [{"role": "system", "content": ""}, ASK, CALL, RESULT, REPLY],
}


def hf_form(messages):
    """The same conversation as HF chat templates take it (OpenAI's tool_calls / tool messages)."""
    out = []
    for m in messages:
        if m["role"] == "function_call":
            calls = json.loads(m["content"])
            calls = [calls] if isinstance(calls, dict) else calls
            out.append({"role": "assistant", "content": "",
                        "tool_calls": [{"type": "function", "function": c} for c in calls]})
        elif m["role"] == "observation":
            out.append({"role": "tool", "content": m["content"]})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return out


def check(hf, name, conversations, with_tools=(True, False)):
    n = 0
    for label, messages in conversations.items():
        for tools in with_tools:
            for gen in (False, True):
                want = hf.apply_chat_template(hf_form(messages), tools=HF_TOOLS if tools else None,
                                              tokenize=False, add_generation_prompt=gen)
                got = render(name, messages, add_generation_prompt=gen, tools=TOOLS if tools else None)
                assert got == want, f"{name} / {label} / tools={tools} / gen={gen}"
                n += 1
    return n


@needs_real
@pytest.mark.parametrize("name, real_name", [("qwen", "qwen"), ("qwen3", "qwen3")])
def test_tool_conversations_equal_the_real_qwen_templates(real, name, real_name):  # noqa: F811
    assert check(real(real_name), name, CONVERSATIONS) == 4 * len(CONVERSATIONS)


@needs_real
@pytest.mark.parametrize("name", ["qwen3_nothink"])
def test_chatml_family_writes_tools_as_qwen3_does(real, name):  # noqa: F811
    # Qwen3's jinja writes no think block where no reply follows the last question or result
    no_reply_after = {k: v for k, v in CONVERSATIONS.items() if v[-1]["role"] == "observation"}
    assert check(real("qwen3"), name, no_reply_after) == 4 * len(no_reply_after)
    # elsewhere these two differ from qwen3 only by that block
    msgs = CONVERSATIONS["system + call, result, reply"]
    assert render(name, msgs, tools=TOOLS) == render("qwen3", msgs, tools=TOOLS).replace("<think>\n\n</think>\n\n", "")


def test_tool_listing_follows_the_system_prompt_or_stands_alone():
    listed = render("qwen3", [ASK, CALL], tools=TOOLS)
    assert listed.startswith("<|im_start|>system\n# Tools\n\nYou may call one or more functions")
    signature = json.dumps({"type": "function", "function": TOOLS[0]}, ensure_ascii=False)
    assert f"<tools>\n{signature}\n" in listed and "°C" in signature  # one JSON line per tool, UTF-8 kept
    assert render("qwen", [ASK, CALL], tools=TOOLS).startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools\n\n")


def test_calls_are_trained_and_observations_are_not():
    segs = render_segments("qwen", [ASK, CALL, RESULT, REPLY], tools=TOOLS)
    assert [t for t, trainable in segs if trainable] == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call><|im_end|>',
        "It is 21 °C and clear in Zürich.<|im_end|>"]
    context = "".join(t for t, trainable in segs if not trainable)
    assert "<|im_start|>user\n<tool_response>\n" + RESULT["content"] + "\n</tool_response><|im_end|>\n" in context


def test_glaive_toolcall_data_set_loads_and_masks_the_observation(tmp_path):
    record = {"conversations": [{"from": "human", "value": ASK["content"]},
                                {"from": "function_call", "value": CALL["content"]},
                                {"from": "observation", "value": RESULT["content"]},
                                {"from": "gpt", "value": REPLY["content"]}],
              "tools": json.dumps(TOOLS)}  # LLaMA-Factory's glaive_toolcall_*_demo: tools as JSON text
    (tmp_path / "glaive.json").write_text(json.dumps([record]))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"glaive_toolcall": {
        "file_name": "glaive.json", "formatting": "sharegpt", "columns": {"messages": "conversations", "tools": "tools"}}}))
    [messages] = load_sft(resolve_datasets(["glaive_toolcall"], tmp_path)[0]).examples
    assert [m["role"] for m in messages] == ["user", "function_call", "observation", "assistant"]
    assert messages[0]["tools"] == [{"type": "function", "function": t} for t in TOOLS]
    assert load_examples(tmp_path / "glaive.json").examples == [messages]  # the same file by path

    tok = load_tokenizer(ROOT / "weights" / "tiny")
    feature = tokenize_conversation(tok, "qwen", messages)
    trained = tok.decode([i for i, lab in zip(feature["input_ids"], feature["labels"]) if lab != IGNORE_INDEX])
    assert trained == "".join(t for t, trainable in render_segments("qwen", messages) if trainable)
    assert "<tool_call>" in trained and "temperature" not in trained  # the call is learnt, the result is not
    assert tok.decode(feature["input_ids"]) == render("qwen", messages)


def test_templates_without_a_tool_format_refuse_tool_turns_in_one_line():
    for name in ("llama3", "alpaca", "mistral", "chatml"):  # chatml: LLaMA-Factory's ReAct layout is not here
        with pytest.raises(TemplateError, match=rf"^chat template '{name}' has no tool-call format \(.*qwen3"):
            render(name, [ASK, CALL, RESULT, REPLY])
        with pytest.raises(TemplateError, match="has no tool-call format"):
            render(name, [ASK, REPLY], tools=TOOLS)
    assert [n for n, t in TEMPLATES.items() if t.tool_format] == ["qwen", "qwen3", "qwen3_nothink"]
    assert get_template("llama3").render([ASK, REPLY])  # no tools: renders as before


@pytest.mark.parametrize("turn, error", [
    ({"from": "function_call", "value": "get_weather(city='Zürich')"}, r"line 1: message 1: function_call: not valid JSON"),
    ({"from": "function_call", "value": '{"city": "Zürich"}'}, r'line 1: message 1: function_call: expected \{"name"'),
    ({"from": "observation", "value": "21"}, r"line 1: message 1: expected 'assistant' after user, got 'observation'"),
])
def test_bad_tool_turns_name_the_file_line_and_turn(tmp_path, turn, error):
    path = tmp_path / "bad.jsonl"
    turns = [{"from": "human", "value": "hi"}, turn] + [{"from": "gpt", "value": "ok"}] * (turn["from"] != "function_call")
    path.write_text(json.dumps({"conversations": turns}) + "\n")
    with pytest.raises(DataError, match=error):
        load_examples(path)


def test_a_tools_column_that_is_not_a_list_of_signatures_is_a_data_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    rec = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ok"}], "tools": "[get_weather]"}
    path.write_text(json.dumps(rec) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl line 1: tools: not valid JSON"):
        load_examples(path)
