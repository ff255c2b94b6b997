"""Chat templates: how a list of messages becomes the exact text a model was trained on.

A chat model only behaves well when it sees its conversations laid out the way it saw them
in post-training: the same role markers, the same newlines, the same end-of-turn token. Each
family invented its own layout; ``template_table.py`` writes them down, under LLaMA-Factory's
``template:`` names (its docstring says what each is), and this module renders them.

Rendering produces *segments*: ``(text, trainable)`` pairs. Everything the model must learn to
write (assistant replies and the end-of-turn token after them) is trainable; everything else
(system prompt, user turns, role headers) is context. The loss mask is then just the
concatenation of the segments' flags, token by token (see ``minitune.data.dataset``).

Tool calls (function calling, LLaMA-Factory's ShareGPT ``function_call`` / ``observation`` turns and
``tools`` column): a ``function_call`` turn takes a reply's place and is trained like one, an
``observation`` (the tool's answer) takes a user turn's place and is context. The templates with a
``tool_format`` (the ChatML family: chatml, qwen, qwen3, qwen3_nothink) write them as Qwen2.5's and
Qwen3's jinja templates do (``tool_turns``); the others refuse them with one line.

Templates such as Alpaca have no end-of-turn string of their own: the model must learn to
emit its tokenizer's EOS token. Such places hold the marker ``EOS`` (``BOS`` likewise), which
``dataset.encode_segments`` turns into the tokenizer's id and ``render`` into ``eos_text``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from ..errors import UserError
from .template_table import QWEN_DEFAULT_SYSTEM  # noqa: F401 (re-exported: the table is its home)
from .template_table import (BOS, EMPTY_THINK, EOS, LAYOUTS, QWEN_TOOL_CALL, QWEN_TOOL_RESPONSE, QWEN_TOOLS_PROMPT,
                             THINK_CLOSE, THINK_OPEN, THINKING)

ROLES = ("system", "user", "assistant", "function_call", "observation")
# A tool call stands where a reply would, the tool's answer where the user's next turn would.
SLOT_ROLES = {"user": ("user", "observation"), "assistant": ("assistant", "function_call")}


@dataclass(frozen=True)
class Template:
    """One chat layout. Format strings take ``{content}`` (and ``{round}``, ``{date}``).

    A conversation renders as::

        prefix  system  (user  assistant_start  assistant  turn_sep)*  [user  assistant_start]

    ``assistant`` (the reply plus its end-of-turn token) is the only trainable part.
    """

    name: str
    user: str
    assistant: str
    assistant_start: str = ""  # role header before a reply; also the generation prompt
    system: str = "{content}"
    turn_sep: str = ""  # glue after a reply that the model never has to produce
    prefix: str = ""
    default_system: str | None = None  # used when the conversation has no system message
    system_in_first_user: bool = False  # LLaMA-2 folds <<SYS>> into the first [INST]
    user_with_input: str | None = None  # Alpaca's separate "### Input:" block
    trim: bool = False  # the Llama jinja templates call `| trim` / `.strip()` on contents
    round_start: int = 0
    date_string: str = ""
    stop: str = ""  # text at which generation should stop (besides the tokenizer's EOS)
    bos_text: str = ""  # what BOS / EOS markers become in rendered text
    eos_text: str = ""
    tool_format: str | None = None  # "qwen": tool calls as Qwen writes them; None: no tool calls

    def segments(self, messages: list[dict], add_generation_prompt: bool = False,
                 tools: list | str | None = None) -> list[tuple[str, bool]]:
        """Render ``messages`` into ``(text, trainable)`` segments.

        ``add_generation_prompt`` appends the assistant header so a model continues with a
        reply, exactly like the ``add_generation_prompt`` flag of HF chat templates. ``tools``
        (default: the first message's ``"tools"``, where data sets put them) lists the functions
        the model may call, as the ``tools`` argument of HF chat templates.
        """
        check_roles(messages)
        messages = self.prepare(messages, tools)  # tool turns written out as plain user / assistant text
        # BEGIN EXERCISE 01.3: render a conversation into (text, trainable) segments
        clean = (lambda s: s.strip()) if self.trim else (lambda s: s)
        system, turns = split_system(messages)
        if system is None:
            system = self.default_system

        segs: list[tuple[str, bool]] = []
        prompt = self.prefix  # non-trainable text gathered until the next reply
        if system is not None and not self.system_in_first_user:
            prompt += self.system.format(content=clean(system), date=self.date_string)
        for i, msg in enumerate(turns):
            if msg["role"] == "user":
                content = msg["content"]
                extra = msg.get("input") or ""
                if extra and self.user_with_input is None:
                    content = f"{content}\n{extra}"  # templates without an Input block inline it
                if i == 0 and system is not None and self.system_in_first_user:
                    content = self.system.format(content=system) + content
                fmt = self.user_with_input if extra and self.user_with_input else self.user
                prompt += fmt.format(content=clean(content), input=clean(extra),
                                     round=i // 2 + self.round_start)
            else:
                prompt += self.assistant_start
                segs.append((prompt, False))
                segs.append((self.assistant.format(content=clean(msg["content"])), True))
                prompt = self.turn_sep
        if add_generation_prompt:
            prompt += self.assistant_start
        if prompt:
            segs.append((prompt, False))
        return [(text, trainable) for text, trainable in segs if text]
        # END EXERCISE

    def prepare(self, messages: list[dict], tools=None) -> list[dict]:
        """The conversation with only system / user / assistant turns left (see ``tool_turns``)."""
        return tool_turns(self, messages, tools)

    def render(self, messages: list[dict], add_generation_prompt: bool = False,
               bos_text: str | None = None, eos_text: str | None = None, tools=None) -> str:
        """The conversation as one string (what ``apply_chat_template(tokenize=False)`` gives)."""
        bos = self.bos_text if bos_text is None else bos_text
        eos = self.eos_text if eos_text is None else eos_text
        text = "".join(t for t, _ in self.segments(messages, add_generation_prompt, tools))
        return text.replace(BOS, bos).replace(EOS, eos)


@dataclass(frozen=True)
class ThinkingTemplate(Template):
    """A layout whose replies carry a reasoning block (Qwen3): ``think_blocks`` writes them.

    ``enable_thinking=False`` is LLaMA-Factory's and Qwen3's switch for a model that answers
    without thinking: the data's thinking is dropped and the empty block before the last reply is
    context (LLaMA-Factory puts it in the prompt), not something the model learns to write.
    """

    enable_thinking: bool = True

    def prepare(self, messages: list[dict], tools=None) -> list[dict]:
        return think_blocks(super().prepare(messages, tools), self.enable_thinking)

    def segments(self, messages: list[dict], add_generation_prompt: bool = False,
                 tools: list | str | None = None) -> list[tuple[str, bool]]:
        segs = super().segments(messages, add_generation_prompt, tools)
        if self.enable_thinking:
            return segs
        out: list[tuple[str, bool]] = []
        for text, trainable in segs:
            if trainable and text.startswith(EMPTY_THINK) and out and not out[-1][1]:
                out[-1] = (out[-1][0] + EMPTY_THINK, False)  # the empty block joins the prompt
                text = text[len(EMPTY_THINK):]
            out.append((text, trainable))
        if add_generation_prompt:  # Qwen3's template: "<|im_start|>assistant\n<think>\n\n</think>\n\n"
            out[-1] = (out[-1][0] + EMPTY_THINK, out[-1][1])
        return out


def split_system(messages: list[dict]) -> tuple[str | None, list[dict]]:
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], list(messages[1:])
    return None, list(messages)


def check_roles(messages: list[dict]) -> None:
    """Raise ``ValueError`` unless roles go: [system], user, assistant, user, assistant, ...

    Every template here assumes strict alternation; a model trained on alternating turns has
    never seen two user turns in a row, so rendering one anyway would quietly mislead it.
    A ``function_call`` stands in a reply's place, an ``observation`` in a user turn's.
    """
    if not messages:
        raise ValueError("empty conversation")
    for i, msg in enumerate(messages):
        role = msg.get("role")
        if role not in ROLES:
            raise ValueError(f"message {i}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(msg.get("content"), str):
            raise ValueError(f"message {i} ({role}): content must be a string")
    _, turns = split_system(messages)
    if not turns:
        raise ValueError("conversation has only a system message")
    for i, msg in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if msg["role"] not in SLOT_ROLES[want]:
            pos = i + (len(messages) - len(turns))
            before = turns[i - 1]["role"] if i else "the start" if pos == 0 else "the system prompt"
            raise ValueError(f"message {pos}: expected {want!r} after {before}, got {msg['role']!r} "
                             "(roles must alternate user/assistant, with an optional system message first; "
                             "a function_call takes a reply's place, an observation a user turn's)")


# ----------------------------------------------------------------------------- tool calls


def parse_tools(tools) -> list[dict]:
    """The functions a model may call, from a ``tools`` column (JSON text or a list), each as
    ``{"type": "function", "function": {...}}`` (a bare signature gets that wrapper, as OpenAI's
    API and LLaMA-Factory write it). ``None`` or empty: no tools. Raises ``ValueError``."""
    if tools is None or (isinstance(tools, str) and not tools.strip()):
        return []
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise ValueError(f"tools: not valid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ValueError("tools: expected a JSON list of function signatures (objects)")
    return [t if t.get("type") == "function" else {"type": "function", "function": t} for t in tools]


def parse_tool_calls(content: str) -> list[dict]:
    """A ``function_call`` turn's JSON (one call or a list of calls) as ``[{"name", "arguments"}]``."""
    try:
        calls = json.loads(content)
    except json.JSONDecodeError as e:
        raise ValueError(f"function_call: not valid JSON ({e.msg} at column {e.colno}); expected "
                         '{"name": ..., "arguments": {...}} or a list of them') from None
    calls = [calls] if isinstance(calls, dict) else calls
    if not isinstance(calls, list) or not calls or \
            not all(isinstance(c, dict) and isinstance(c.get("name"), str) and "arguments" in c for c in calls):
        raise ValueError('function_call: expected {"name": ..., "arguments": {...}} or a list of them')
    return [{"name": c["name"], "arguments": c["arguments"]} for c in calls]


def tool_turns(template: Template, messages: list[dict], tools=None) -> list[dict]:
    """Write ``tools``, ``function_call`` and ``observation`` turns out as Qwen's templates do.

    The tools are listed after the system prompt (the template's default one if the conversation
    has none; with neither, they are the whole system prompt); each call becomes a reply
    ``<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`` (several: one per line), each
    observation a user turn ``<tool_response>\\n...\\n</tool_response>``, marked ``"observation"``.
    JSON is written as Python's ``json.dumps(ensure_ascii=False)``, the ``tojson`` of HF templates.
    """
    tools = parse_tools(messages[0].get("tools") if tools is None else tools)
    if not tools and not any(m["role"] in ("function_call", "observation") for m in messages):
        return messages
    if template.tool_format != "qwen":
        with_tools = ", ".join(name for name, t in TEMPLATES.items() if t.tool_format)
        raise TemplateError(f"chat template {template.name!r} has no tool-call format (function_call / "
                            f"observation turns and tools need one of: {with_tools})")
    system, turns = split_system(messages)
    if tools:
        system = template.default_system if system is None else system
        listing = QWEN_TOOLS_PROMPT.replace("{tools}", "".join("\n" + json.dumps(t, ensure_ascii=False)
                                                                for t in tools))
        system = listing if system is None else f"{system}\n\n{listing}"
    out = [] if system is None else [{"role": "system", "content": system}]
    for msg in turns:
        if msg["role"] == "function_call":
            calls = [QWEN_TOOL_CALL.replace("{call}", json.dumps(c, ensure_ascii=False))
                     for c in parse_tool_calls(msg["content"])]
            out.append({"role": "assistant", "content": "\n".join(calls)})
        elif msg["role"] == "observation":
            out.append({"role": "user", "content": QWEN_TOOL_RESPONSE.replace("{content}", msg["content"]),
                        "observation": True})
        else:
            out.append(msg)
    return out


# ----------------------------------------------------------------------------- reasoning


def split_thinking(msg: dict) -> tuple[str, str]:
    """``(thinking, reply)`` of a reply written ``<think>...</think>reply`` (or with ``reasoning_content``)."""
    content = msg["content"]
    if msg.get("reasoning_content") is not None:
        return msg["reasoning_content"], content
    if "</think>" not in content:
        return "", content
    parts = content.split("</think>")  # as Qwen3's jinja: thinking before the first, reply after the last
    return parts[0].rstrip("\n").split("<think>")[-1].lstrip("\n"), parts[-1].lstrip("\n")


def think_blocks(messages: list[dict], enable_thinking: bool = True) -> list[dict]:
    """Qwen3's reasoning layout, as its jinja template writes it.

    Replies after the last real user turn (tool calls and observations may follow it) keep their
    thinking in a ``<think>\\n...\\n</think>\\n\\n`` block, and the conversation's last reply always
    gets one, empty if it has no thinking. Replies before that keep only their answer: a model
    never sees its earlier turns' reasoning, so training on it would teach what inference never shows.
    """
    queries = [i for i, m in enumerate(messages) if m["role"] == "user" and not m.get("observation")]
    last_query = queries[-1] if queries else len(messages) - 1
    out = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            out.append(msg)
            continue
        thinking, reply = split_thinking(msg)
        if not enable_thinking:
            thinking = ""
        if i > last_query and (i == len(messages) - 1 or thinking):
            reply = THINK_OPEN + thinking.strip("\n") + THINK_CLOSE + reply.lstrip("\n")
        out.append({"role": "assistant", "content": reply})
    return out


TEMPLATES: dict[str, Template] = {
    name: (ThinkingTemplate if name in THINKING else Template)(name=name, **layout)
    for name, layout in LAYOUTS.items()
}


class TemplateError(UserError):
    """A template name minitune does not have (the message lists the known ones), or input it cannot render."""


def get_template(name: str | Template) -> Template:
    """Look a template up by name (a ``Template`` passes through unchanged)."""
    if isinstance(name, Template):
        return name
    try:
        return TEMPLATES[name]
    except KeyError:
        raise TemplateError(f"unknown chat template {name!r} (known: {', '.join(TEMPLATES)})") from None


def render(template: str | Template, messages: list[dict], add_generation_prompt: bool = False,
           tools=None) -> str:
    return get_template(template).render(messages, add_generation_prompt, tools=tools)


def render_segments(template: str | Template, messages: list[dict],
                    add_generation_prompt: bool = False, tools=None) -> list[tuple[str, bool]]:
    return get_template(template).segments(messages, add_generation_prompt, tools)
