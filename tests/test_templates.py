"""Chat templates render exactly what the models' own jinja chat_templates produce.

The oracle is `transformers`' `apply_chat_template(tokenize=False)` reading the real
`chat_template` strings from a tokenizer_config.json written here (with a tiny byte-level
tokenizer.json built with HF `tokenizers`): Qwen2.5-Instruct, Llama-3.1-8B-Instruct,
Meta-Llama-3-8B-Instruct and Llama-2-7b-chat-hf.
"""
import json

import pytest

from minitune.data.templates import (BOS, EOS, QWEN_DEFAULT_SYSTEM, TEMPLATES, TemplateError, get_template,
                                     render, render_segments)

# Qwen/Qwen2.5-7B-Instruct tokenizer_config.json "chat_template" (same for all Qwen2.5 Instruct sizes).
QWEN25_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# meta-llama/Llama-3.1-8B-Instruct tokenizer_config.json "chat_template" (fixed date string).
LLAMA31_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# meta-llama/Meta-Llama-3-8B-Instruct tokenizer_config.json "chat_template".
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# meta-llama/Llama-2-7b-chat-hf tokenizer_config.json "chat_template".
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

ORACLES = {  # our template name -> (jinja, bos_token, eos_token)
    "qwen": (QWEN25_TEMPLATE, None, "<|im_end|>"),
    "llama3.1": (LLAMA31_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>"),
    "llama3": (LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>"),
    "llama2": (LLAMA2_TEMPLATE, "<s>", "</s>"),
}


def _hf_tokenizer(tmp_path, jinja, bos, eos):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([t for t in (bos, eos) if t])
    tok.save(str(tmp_path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
              "chat_template": jinja}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return AutoTokenizer.from_pretrained(str(tmp_path))


SYS = {"role": "system", "content": "You are a terse assistant.\nAnswer in one line. "}
U1 = {"role": "user", "content": "What is 2+2?"}
A1 = {"role": "assistant", "content": "4"}
U2 = {"role": "user", "content": "  And 3+3? {braces} stay  "}
A2 = {"role": "assistant", "content": "6.\n\nDone.\n"}
U3 = {"role": "user", "content": "你好！🙂 Tabs\tand\r\nCRLF"}
A3 = {"role": "assistant", "content": "你好 👋"}

CONVERSATIONS = {
    "single user turn": [U1],
    "one exchange": [U1, A1],
    "system + one exchange": [SYS, U1, A1],
    "three turns": [U1, A1, U2, A2, U3, A3],
    "system + three turns": [SYS, U1, A1, U2, A2, U3, A3],
    "system + multi-turn ending in user": [SYS, U1, A1, U2],
    "empty system prompt": [{"role": "system", "content": ""}, U1, A1],
}


@pytest.mark.parametrize("name", list(ORACLES))
def test_rendering_equals_the_models_own_jinja_chat_template(tmp_path, name):
    hf = _hf_tokenizer(tmp_path, *ORACLES[name])
    checked = 0
    for label, messages in CONVERSATIONS.items():
        for gen in (False, True):
            # (LLaMA-2 has no generation prompt: its "[/INST]" already is one; both ignore the flag.)
            want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            got = render(name, messages, add_generation_prompt=gen)
            assert got == want, f"{name} / {label} / add_generation_prompt={gen}"
            checked += 1
    assert checked == 2 * len(CONVERSATIONS)


def test_qwen_uses_its_default_system_prompt_only_when_none_is_given():
    assert render("qwen", [U1]).startswith(f"<|im_start|>system\n{QWEN_DEFAULT_SYSTEM}<|im_end|>\n")
    assert QWEN_DEFAULT_SYSTEM not in render("qwen", [SYS, U1])
    assert "<|im_start|>system" not in render("chatml", [U1])  # plain ChatML has no default


def test_llama31_date_line_can_follow_a_llama32_style_date():
    from dataclasses import replace

    t = replace(get_template("llama3.1"), date_string="01 Jan 2025")
    assert "Cutting Knowledge Date: December 2023\nToday Date: 01 Jan 2025\n\n<|eot_id|>" in t.render([U1])


def test_segments_mark_exactly_the_replies_and_their_end_tokens_trainable():
    segs = render_segments("qwen", [SYS, U1, A1, U2, A2])
    assert [t for t, trainable in segs if trainable] == ["4<|im_end|>", "6.\n\nDone.\n<|im_end|>"]
    assert "".join(t for t, _ in segs) == render("qwen", [SYS, U1, A1, U2, A2])

    segs = render_segments("llama3", [U1, A1])
    assert [t for t, trainable in segs if trainable] == ["4<|eot_id|>"]
    assert segs[0][0].startswith(BOS)  # the tokenizer's own BOS id, not the text, when tokenised


def test_templates_without_an_end_of_turn_string_train_the_tokenizers_eos():
    for name in ("alpaca", "chatglm", "chatglm2", "human_assistant", "llama2"):
        trained = [t for t, trainable in render_segments(name, [U1, A1, U2, A2]) if trainable]
        assert len(trained) == 2 and all(t.endswith(EOS) for t in trained), name


def test_alpaca_renders_instruction_input_and_response_blocks():
    messages = [{"role": "user", "content": "Translate to English.", "input": "今天天气真好"},
                {"role": "assistant", "content": "The weather is nice today."}]
    text = get_template("alpaca").render(messages, eos_text="</s>")
    assert text == ("Below is an instruction that describes a task. Write a response that appropriately "
                    "completes the request.\n\n### Instruction:\nTranslate to English.\n\n### Input:\n"
                    "今天天气真好\n\n### Response:\nThe weather is nice today.</s>\n\n")
    # Templates without an Input block keep the input as part of the user's text.
    assert "Translate to English.\n今天天气真好" in render("chatml", messages)


def test_chatglm_rounds_and_human_assistant_layouts():
    assert render("chatglm", [U1, A1, U2], add_generation_prompt=True) == (
        "[Round 0]\n问：What is 2+2?\n答：4\n[Round 1]\n问：  And 3+3? {braces} stay  \n答：")
    assert render("chatglm2", [U1, A1, U2], add_generation_prompt=True) == (
        "[Round 1]\n\n问：What is 2+2?\n\n答：4\n\n[Round 2]\n\n问：  And 3+3? {braces} stay  \n\n答：")
    assert render("human_assistant", [U1, A1, U1], add_generation_prompt=True) == (
        "\n\nHuman: What is 2+2?\n\nAssistant: 4\n\nHuman: What is 2+2?\n\nAssistant:")
    # the reply carries its leading space, so the prompt ends at "Assistant:" as in HH-RLHF
    assert render_segments("human_assistant", [U1, A1])[-1] == (" 4" + EOS, True)


@pytest.mark.parametrize("messages, error", [
    ([], "empty conversation"),
    ([SYS], "conversation has only a system message"),
    ([A1, U1], "message 0: expected 'user' after the start, got 'assistant'"),
    ([U1, U2], "message 1: expected 'assistant' after user, got 'user'"),
    ([SYS, U1, A1, SYS], "message 3: expected 'user' after assistant, got 'system'"),
    ([{"role": "tool", "content": "x"}], "unknown role 'tool'"),
])
def test_out_of_order_roles_are_refused(messages, error):
    for name in TEMPLATES:
        with pytest.raises(ValueError, match=error.replace("+", r"\+")):
            render(name, messages)


def test_get_template_names_the_known_templates_on_a_typo():
    with pytest.raises(TemplateError, match=r"known: chatml, qwen"):
        get_template("qwen2")
