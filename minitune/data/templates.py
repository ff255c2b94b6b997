"""Chat templates: how a list of messages becomes the exact text a model was trained on.

A chat model only behaves well when it sees its conversations laid out the way it saw them
in post-training: the same role markers, the same newlines, the same end-of-turn token. Each
family invented its own layout, so this module writes them down:

- ``chatml`` / ``qwen``: ChatML (OpenAI's Chat Markup Language), used by Qwen.
  ``qwen`` matches the jinja ``chat_template`` shipped with Qwen2.5-*-Instruct, including its
  default system prompt "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
- ``llama2``: Meta LLaMA-2-chat, ``<s>[INST] <<SYS>>\\n...\\n<</SYS>>\\n\\n... [/INST]``,
  as in the HF ``chat_template`` of meta-llama/Llama-2-7b-chat-hf.
- ``llama3``: Meta Llama-3-Instruct header tokens (the 3.0 jinja template).
- ``llama3.1``: the Llama-3.1-8B-Instruct jinja template (without tools): it always writes a
  system block starting "Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024".
  Llama-3.2 templates put today's date there instead; pass ``date_string`` to match them.
- ``alpaca``: Stanford Alpaca, "### Instruction:" / "### Input:" / "### Response:".
- ``chatglm``: ChatGLM-6B, "[Round 0]\\n问：...\\n答：..." (rounds from 0, single newlines);
  ``chatglm2``: ChatGLM2-6B, "[Round 1]\\n\\n问：...\\n\\n答：" (rounds from 1, blank lines).
  (Their tokenizers also add "[gMASK]<sop>" tokens; that belongs to the tokenizer, not here.
  ChatGLM-6B's own ``chat()`` sends a first question with no history as the bare query;
  this template always writes the round header, as its multi-turn training data does.)
- ``human_assistant``: Anthropic HH-RLHF, "\\n\\nHuman: ...\\n\\nAssistant: ...".

Rendering produces *segments*: ``(text, trainable)`` pairs. Everything the model must learn to
write (assistant replies and the end-of-turn token after them) is trainable; everything else
(system prompt, user turns, role headers) is context. The loss mask is then just the
concatenation of the segments' flags, token by token (see ``minitune.data.dataset``).

Templates such as Alpaca have no end-of-turn string of their own: the model must learn to
emit its tokenizer's EOS token. Such places hold the marker ``EOS`` (``BOS`` likewise), which
``dataset.encode_segments`` turns into the tokenizer's id and ``render`` into ``eos_text``.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError

# Private-use characters: they cannot clash with anything a real tokenizer or dataset writes.
BOS = "\ue000BOS\ue001"
EOS = "\ue000EOS\ue001"

ROLES = ("system", "user", "assistant")


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

    def segments(self, messages: list[dict], add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
        """Render ``messages`` into ``(text, trainable)`` segments.

        ``add_generation_prompt`` appends the assistant header so a model continues with a
        reply, exactly like the ``add_generation_prompt`` flag of HF chat templates.
        """
        check_roles(messages)
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

    def render(self, messages: list[dict], add_generation_prompt: bool = False,
               bos_text: str | None = None, eos_text: str | None = None) -> str:
        """The conversation as one string (what ``apply_chat_template(tokenize=False)`` gives)."""
        bos = self.bos_text if bos_text is None else bos_text
        eos = self.eos_text if eos_text is None else eos_text
        text = "".join(t for t, _ in self.segments(messages, add_generation_prompt))
        return text.replace(BOS, bos).replace(EOS, eos)


def split_system(messages: list[dict]) -> tuple[str | None, list[dict]]:
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], list(messages[1:])
    return None, list(messages)


def check_roles(messages: list[dict]) -> None:
    """Raise ``ValueError`` unless roles go: [system], user, assistant, user, assistant, ...

    Every template here assumes strict alternation; a model trained on alternating turns has
    never seen two user turns in a row, so rendering one anyway would quietly mislead it.
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
        if msg["role"] != want:
            pos = i + (len(messages) - len(turns))
            before = turns[i - 1]["role"] if i else "the start" if pos == 0 else "the system prompt"
            raise ValueError(f"message {pos}: expected {want!r} after {before}, got {msg['role']!r} "
                             "(roles must alternate user/assistant, with an optional system message first)")


QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
ALPACA_SYSTEM = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.")

_CHATML = dict(
    system="<|im_start|>system\n{content}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n",
    assistant_start="<|im_start|>assistant\n",
    assistant="{content}<|im_end|>",
    turn_sep="\n",  # after <|im_end|> the model stops; the newline is only layout
    stop="<|im_end|>",
)
_LLAMA3 = dict(
    system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
    user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
    assistant_start="<|start_header_id|>assistant<|end_header_id|>\n\n",
    assistant="{content}<|eot_id|>",
    prefix=BOS, trim=True, stop="<|eot_id|>", bos_text="<|begin_of_text|>",
)

TEMPLATES: dict[str, Template] = {
    "chatml": Template(name="chatml", **_CHATML),
    "qwen": Template(name="qwen", default_system=QWEN_DEFAULT_SYSTEM, **_CHATML),
    "llama2": Template(
        name="llama2",
        system="<<SYS>>\n{content}\n<</SYS>>\n\n",
        system_in_first_user=True,
        user=BOS + "[INST] {content} [/INST]",
        assistant=" {content} " + EOS,
        trim=True, stop="</s>", bos_text="<s>", eos_text="</s>",
    ),
    "llama3": Template(name="llama3", **_LLAMA3),
    "llama3.1": Template(
        name="llama3.1", default_system="", date_string="26 Jul 2024",
        **{**_LLAMA3, "system": "<|start_header_id|>system<|end_header_id|>\n\n"
                                "Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n"
                                "{content}<|eot_id|>"},
    ),
    "alpaca": Template(
        name="alpaca",
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
    "chatglm": Template(
        name="chatglm",
        user="[Round {round}]\n问：{content}\n",
        assistant_start="答：",
        assistant="{content}" + EOS,
        turn_sep="\n",
        stop="[Round",
    ),
    "chatglm2": Template(
        name="chatglm2",
        user="[Round {round}]\n\n问：{content}\n\n",
        assistant_start="答：",
        assistant="{content}" + EOS,
        turn_sep="\n\n",
        round_start=1,
        stop="[Round",
    ),
    "human_assistant": Template(
        name="human_assistant",
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


class TemplateError(UserError):
    """A template name minitune does not have; the message lists the known ones."""


def get_template(name: str | Template) -> Template:
    """Look a template up by name (a ``Template`` passes through unchanged)."""
    if isinstance(name, Template):
        return name
    try:
        return TEMPLATES[name]
    except KeyError:
        raise TemplateError(f"unknown chat template {name!r} (known: {', '.join(TEMPLATES)})") from None


def render(template: str | Template, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return get_template(template).render(messages, add_generation_prompt)


def render_segments(template: str | Template, messages: list[dict],
                    add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    return get_template(template).segments(messages, add_generation_prompt)
