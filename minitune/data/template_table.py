"""The chat layouts themselves, as data: one dict of ``Template`` fields per template name.

``templates.py`` holds the machinery (how a layout renders a conversation); this file holds only
the strings each model family was trained on. A name means what it means in LLaMA-Factory's
``template:`` key (docs/llamafactory.md); where a model ships its own jinja ``chat_template``,
the strings here are written so that rendering equals it (tests/test_templates.py,
tests/test_templates_real.py).

- ``chatml`` / ``qwen``: ChatML (OpenAI's Chat Markup Language), used by Qwen.
  ``qwen`` matches the jinja ``chat_template`` shipped with Qwen2.5-*-Instruct, including its
  default system prompt "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
- ``qwen3``: Qwen3's hybrid-thinking template: ChatML without a default system prompt, the last
  reply written as ``<think>\\n{thinking}\\n</think>\\n\\n{reply}`` (an empty block when it has no
  thinking), earlier replies without their thinking (see ``think_blocks``). ``enable_thinking=False``
  (``dataclasses.replace``) trains a model that does not think: thinking in the data is dropped, the
  empty block is context, and the generation prompt ends with it, as Qwen3's template then writes.
  ``qwen3_nothink``: the same ChatML with no thinking at all (Qwen3-Instruct-2507).
- ``llama2``: Meta LLaMA-2-chat, ``<s>[INST] <<SYS>>\\n...\\n<</SYS>>\\n\\n... [/INST]``,
  as in the HF ``chat_template`` of meta-llama/Llama-2-7b-chat-hf. ``mistral``: Mistral-Instruct,
  ``<s>[INST] ...[/INST] reply</s>``, the system prompt folded into the first ``[INST]``.
- ``llama3``: Meta Llama-3-Instruct header tokens (the 3.0 jinja template).
- ``llama3.1``: the Llama-3.1-8B-Instruct jinja template (without tools): it always writes a
  system block starting "Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024".
  Llama-3.2 templates put today's date there instead; pass ``date_string`` to match them.
- ``alpaca``: Stanford Alpaca, "### Instruction:" / "### Input:" / "### Response:".
- ``default`` ("Human: ...EOS\\nAssistant:...") and ``empty`` (the texts back to back):
  LLaMA-Factory's layouts for models that have none of their own.
- ``chatglm``: ChatGLM-6B, "[Round 0]\\n问：...\\n答：..." (rounds from 0, single newlines);
  ``chatglm2``: ChatGLM2-6B, "[Round 1]\\n\\n问：...\\n\\n答：" (rounds from 1, blank lines);
  ``chatglm3``: ChatGLM3-6B's role tokens, "[gMASK]sop<|user|>\\n ...<|assistant|>\\n ...".
  (ChatGLM-6B's own ``chat()`` sends a first question with no history as the bare query;
  this template always writes the round header, as its multi-turn training data does.)
- ``deepseek3``: DeepSeek-V3 / R1, "<｜begin▁of▁sentence｜>{system}<｜User｜>...<｜Assistant｜>...".
- ``human_assistant``: Anthropic HH-RLHF, "\\n\\nHuman: ...\\n\\nAssistant: ...".

Format strings take ``{content}`` (and ``{round}``, ``{date}``, ``{input}``). ``BOS`` / ``EOS``
mark the tokenizer's own begin / end tokens: ``dataset.encode_segments`` turns them into ids.
"""
from __future__ import annotations

# Private-use characters: they cannot clash with anything a real tokenizer or dataset writes.
BOS = "\ue000BOS\ue001"
EOS = "\ue000EOS\ue001"

QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
ALPACA_SYSTEM = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.")

# Qwen's tool layout (Qwen2.5-Instruct's and Qwen3's jinja templates write exactly this):
# the function signatures go into the system prompt, one JSON object per line between <tools> tags;
# a call is a JSON object between <tool_call> tags in the reply; a result comes back in a user turn
# between <tool_response> tags. ``{tools}`` is replaced (not str.format: the JSON has braces).
QWEN_TOOLS_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)
QWEN_TOOL_CALL = "<tool_call>\n{call}\n</tool_call>"
QWEN_TOOL_RESPONSE = "<tool_response>\n{content}\n</tool_response>"

# Qwen3's reasoning block around a reply's thinking; an empty one means "no thinking here".
THINK_OPEN, THINK_CLOSE = "<think>\n", "\n</think>\n\n"
EMPTY_THINK = THINK_OPEN + THINK_CLOSE  # "<think>\n\n</think>\n\n"

CHATML = dict(
    system="<|im_start|>system\n{content}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n",
    assistant_start="<|im_start|>assistant\n",
    assistant="{content}<|im_end|>",
    turn_sep="\n",  # after <|im_end|> the model stops; the newline is only layout
    stop="<|im_end|>",
    tool_format="qwen",
)
LLAMA3 = dict(
    system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
    user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
    assistant_start="<|start_header_id|>assistant<|end_header_id|>\n\n",
    assistant="{content}<|eot_id|>",
    prefix=BOS, trim=True, stop="<|eot_id|>", bos_text="<|begin_of_text|>",
)

LAYOUTS: dict[str, dict] = {
    # LLaMA-Factory's chatml writes tools in its ReAct-style layout, which minitune does not have:
    # tool turns under chatml are refused (use qwen / qwen3), not rendered in another layout
    "chatml": {**CHATML, "tool_format": None},
    "qwen": {**CHATML, "default_system": QWEN_DEFAULT_SYSTEM},
    # Qwen3 hybrid thinking: ChatML, no default system, and the last reply wrapped in a <think> block
    # (templates.ThinkingTemplate; the names in THINKING below get that class).
    "qwen3": CHATML,
    "qwen3_nothink": CHATML,  # Qwen3 without reasoning blocks (the Instruct-2507 models): plain ChatML
    "llama2": dict(
        system="<<SYS>>\n{content}\n<</SYS>>\n\n",
        system_in_first_user=True,
        user=BOS + "[INST] {content} [/INST]",
        assistant=" {content} " + EOS,
        trim=True, stop="</s>", bos_text="<s>", eos_text="</s>",
    ),
    "llama3": LLAMA3,
    "llama3.1": {
        **LLAMA3, "default_system": "", "date_string": "26 Jul 2024",
        "system": "<|start_header_id|>system<|end_header_id|>\n\n"
                  "Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n{content}<|eot_id|>",
    },
    # Mistral-7B-Instruct v0.1-v0.3 as LLaMA-Factory lays it out: one BOS, the system prompt folded
    # into the first [INST] (Mistral's own v0.3 jinja puts it into the last one), no spaces inside [/INST].
    "mistral": dict(
        prefix=BOS,
        system="{content}\n\n",
        system_in_first_user=True,
        user="[INST] {content}[/INST]",
        assistant=" {content}" + EOS,
        stop="</s>", bos_text="<s>", eos_text="</s>",
    ),
    "alpaca": dict(
        prefix=BOS,
        system="{content}\n\n",
        default_system=ALPACA_SYSTEM,
        user="### Instruction:\n{content}\n\n",
        user_with_input="### Instruction:\n{content}\n\n### Input:\n{input}\n\n",
        assistant_start="### Response:\n",
        assistant="{content}" + EOS,
        turn_sep="\n\n",
        stop="### Instruction:",
    ),
    # LLaMA-Factory's fallback layouts, for models without a chat format of their own:
    # `default` writes "Human: ... / Assistant: ..." lines ending each turn with the tokenizer's EOS,
    # `empty` concatenates the texts with nothing between them (a base model continuing raw text).
    "default": dict(
        system="System: {content}" + EOS + "\n",
        user="Human: {content}" + EOS + "\n",
        assistant_start="Assistant:",
        assistant="{content}" + EOS,
        turn_sep="\n",
    ),
    "empty": dict(user="{content}", assistant="{content}"),
    "chatglm": dict(
        user="[Round {round}]\n问：{content}\n",
        assistant_start="答：",
        assistant="{content}" + EOS,
        turn_sep="\n",
        stop="[Round",
    ),
    "chatglm2": dict(
        user="[Round {round}]\n\n问：{content}\n\n",
        assistant_start="答：",
        assistant="{content}" + EOS,
        turn_sep="\n\n",
        round_start=1,
        stop="[Round",
    ),
    # ChatGLM3-6B: role tokens, "[gMASK]sop" once at the start. The space after each "\n" is how
    # its jinja template writes the SentencePiece word boundary the content tokens start with.
    # ChatGLM3 ends a reply by writing the next role token; here the reply is trained to end with
    # the tokenizer's EOS (rendered as nothing, as in the jinja text), like chatglm / chatglm2.
    "chatglm3": dict(
        prefix="[gMASK]sop",
        system="<|system|>\n {content}",
        user="<|user|>\n {content}",
        assistant_start="<|assistant|>",
        assistant="\n {content}" + EOS,
        stop="<|user|>",
    ),
    # DeepSeek-V3 / R1 chat layout: the system prompt bare after BOS, full-width-bar role markers.
    "deepseek3": dict(
        prefix=BOS,
        user="<｜User｜>{content}",
        assistant_start="<｜Assistant｜>",
        assistant="{content}" + EOS,
        bos_text="<｜begin▁of▁sentence｜>", eos_text="<｜end▁of▁sentence｜>",
    ),
    "human_assistant": dict(
        prefix=BOS,
        user="\n\nHuman: {content}",
        # The prompt ends at "Assistant:" (as in HH-RLHF); the space opens the reply, because
        # BPE vocabularies spell words with their leading space (" Paris") and a prompt
        # ending in a bare space pushes the model onto rare tokens.
        assistant_start="\n\nAssistant:",
        assistant=" {content}" + EOS,
        stop="\n\nHuman:",
    ),
}

THINKING = ("qwen3",)  # layouts whose last reply carries a <think> block (templates.ThinkingTemplate)
