"""Preference pairs for reward models and DPO: a prompt, a chosen and a rejected reply.

Two shapes are read from JSON / JSONL (see ``minitune.data.formats`` for files and errors):

- ``{"prompt": ..., "chosen": ..., "rejected": ..., "system": ...}``: the prompt is a string
  or a list of OpenAI-style messages ending with a user turn; each reply is a string, or a
  list of messages ending with the assistant reply (as in UltraFeedback-style datasets).
- Anthropic HH-RLHF: ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}``,
  two whole dialogues that share everything up to the last Assistant reply; they are split
  into the shared prompt (as messages) and the two replies.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .formats import Loaded, RecordError, check_conversation, str_field, load_records, parse_openai


@dataclass
class PreferenceExample:
    prompt: list[dict]  # messages, ending with a user turn
    chosen: str
    rejected: str


def parse_preference(rec: dict) -> PreferenceExample:
    for key in ("chosen", "rejected"):
        if key not in rec:
            raise RecordError(f"field {key!r} missing (preference format expects prompt, chosen, rejected)")
    if "prompt" not in rec:
        if isinstance(rec["chosen"], str) and isinstance(rec["rejected"], str):
            return split_hh(rec["chosen"], rec["rejected"])
        raise RecordError("field 'prompt' missing (preference format expects prompt, chosen, rejected)")
    system = str_field(rec, "system", "preference", "", required=False)
    prompt = rec["prompt"]
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list):
        messages = parse_openai({"messages": prompt}, need_reply=False)
    else:
        raise RecordError(f"field 'prompt' must be a string or a list of messages, got {type(prompt).__name__}")
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    check_conversation(messages, need_reply=False)
    if messages[-1]["role"] != "user":
        raise RecordError("the prompt must end with a user message")
    return _pair(messages, _response(rec, "chosen"), _response(rec, "rejected"))


def _pair(prompt: list[dict], chosen: str, rejected: str) -> PreferenceExample:
    if chosen == rejected:
        raise RecordError("chosen and rejected are the same response, so the pair teaches nothing")
    return PreferenceExample(prompt, chosen, rejected)


def _response(rec: dict, key: str) -> str:
    value = rec[key]
    if isinstance(value, list) and value and isinstance(value[-1], dict):  # [..., reply] form
        last = value[-1]
        value = last.get("content") if last.get("role") == "assistant" else None
    if not isinstance(value, str):
        raise RecordError(f"field {key!r} must be a string or end with an assistant message")
    if not value.strip():
        raise RecordError(f"field {key!r} is empty")
    return value


HH_SPLIT = re.compile(r"\n\n(Human|Assistant): ?")


def split_hh(chosen: str, rejected: str) -> PreferenceExample:
    """Split an HH-RLHF pair into the shared prompt dialogue and the two final replies."""
    marker = "\n\nAssistant:"
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    cut = chosen.rfind(marker, 0, n)  # the last reply starts after the last shared marker
    if cut < 0:
        raise RecordError("chosen and rejected share no '\\n\\nAssistant:' prefix "
                          "(HH-RLHF form expects two dialogues differing only in the last reply)")
    head, end = chosen[:cut], cut + len(marker)
    parts = HH_SPLIT.split(head)
    if parts[0].strip():
        raise RecordError("HH-RLHF dialogue must start with '\\n\\nHuman:'")
    messages = [{"role": "user" if who == "Human" else "assistant", "content": text}
                for who, text in zip(parts[1::2], parts[2::2])]
    check_conversation(messages, need_reply=False)
    if messages[-1]["role"] != "user":
        raise RecordError("HH-RLHF prompt must end with a Human turn before the final Assistant reply")
    strip1 = lambda s: s[1:] if s.startswith(" ") else s  # the space after "Assistant:"
    return _pair(messages, _response({"chosen": strip1(chosen[end:])}, "chosen"),
                 _response({"rejected": strip1(rejected[end:])}, "rejected"))


def load_preferences(path: str | Path, skip_bad: bool = False) -> Loaded:
    """Read preference pairs: a ``Loaded`` whose examples are ``PreferenceExample``s."""
    return load_records(path, "preference", skip_bad, {"preference": parse_preference})
