"""Reading training data from JSON / JSONL files in the shapes people actually publish.

Every reader normalises a record to a list of ``{"role", "content"}`` messages (roles
``system``, ``user``, ``assistant``, alternating user/assistant after an optional system):

- Alpaca (Stanford Alpaca; the multi-turn ``history`` extension from Chinese SFT datasets)::
    {"instruction": "...", "input": "...", "output": "...", "system": "...",
     "history": [["user 1", "assistant 1"], ...]}
  ``input`` is optional; when present it stays on the user message as ``"input"`` so the
  Alpaca template can print its "### Input:" block (other templates append it to the text).
- ShareGPT (ShareGPT.com dumps, used by Vicuna)::
    {"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}], "system": "..."}
  ``from`` may also be ``user`` / ``assistant``.
- OpenAI chat (the fine-tuning API format)::
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}]}
- Preference pairs (DPO / reward models)::
    {"prompt": "..." or [messages], "chosen": "..." or [messages], "rejected": ..., "system": "..."}
  and Anthropic HH-RLHF, where ``chosen`` and ``rejected`` are whole dialogues
  ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` that share everything up to the last reply.

A file is either JSONL (one record per line) or one JSON array of records. Bad data never
vanishes: by default the first bad record raises ``DataError`` naming file and line; with
``skip_bad=True`` bad records are collected in ``Loaded.skipped`` and summarised in a warning.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from .templates import check_roles

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A record that cannot be turned into a training example; the message says where."""


class _Bad(Exception):
    """Raised by the parsers; the loader adds file and line."""


@dataclass
class PreferenceExample:
    prompt: list[dict]  # messages, ending with a user turn
    chosen: str
    rejected: str


@dataclass
class Loaded:
    """What a loader returns: the good examples plus an account of every skipped record."""

    path: str
    examples: list
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)
    format: str = ""

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self):
        return iter(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


# ----------------------------------------------------------------------------- records


def iter_records(path: str | Path) -> Iterator[tuple[int, object]]:
    """Yield ``(line_number, record)``; a record that is not JSON is yielded as a ``_Bad``."""
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        yield from _iter_json_array(text)
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue  # blank lines hold no record
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            yield n, _Bad(f"not valid JSON ({e.msg} at column {e.colno})")


def _iter_json_array(text: str) -> Iterator[tuple[int, object]]:
    # Decode element by element rather than json.loads(text), so each record keeps its line.
    dec = json.JSONDecoder()
    pos = text.index("[") + 1
    ws = re.compile(r"\s*")
    while True:
        pos = ws.match(text, pos).end()
        if text.startswith("]", pos):
            return
        line = text.count("\n", 0, pos) + 1
        try:
            obj, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            yield e.lineno, _Bad(f"not valid JSON ({e.msg} at column {e.colno})")
            return  # the rest of the array cannot be located reliably
        yield line, obj
        pos = ws.match(text, pos).end()
        if text.startswith(",", pos):
            pos += 1
        elif not text.startswith("]", pos):
            yield text.count("\n", 0, pos) + 1, _Bad("not valid JSON (expected ',' or ']' in the array)")
            return


# ----------------------------------------------------------------------------- parsers


def _str_field(rec: dict, key: str, fmt: str, expects: str, required: bool = True) -> str:
    if key not in rec or rec[key] is None:
        if required:
            raise _Bad(f"field {key!r} missing ({fmt} format expects {expects})")
        return ""
    if not isinstance(rec[key], str):
        raise _Bad(f"field {key!r} must be a string, got {type(rec[key]).__name__}")
    return rec[key]


def _finish(messages: list[dict], need_reply: bool = True) -> list[dict]:
    try:
        check_roles(messages)
    except ValueError as e:
        raise _Bad(str(e)) from None
    if need_reply and messages[-1]["role"] != "assistant":
        raise _Bad("conversation ends with a user message, so it has no reply to train on")
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            raise _Bad(f"message {i} (assistant) is empty")
    return messages


def parse_alpaca(rec: dict) -> list[dict]:
    expects = "instruction, input, output"
    instruction = _str_field(rec, "instruction", "Alpaca", expects)
    inp = _str_field(rec, "input", "Alpaca", expects, required=False)
    output = _str_field(rec, "output", "Alpaca", expects)
    system = _str_field(rec, "system", "Alpaca", expects, required=False)
    messages = [{"role": "system", "content": system}] if system else []
    history = rec.get("history") or []
    if not isinstance(history, list):
        raise _Bad("field 'history' must be a list of [user, assistant] pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise _Bad(f"history item {i} is not a [user, assistant] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    user = {"role": "user", "content": instruction}
    if inp:
        user["input"] = inp
    messages += [user, {"role": "assistant", "content": output}]
    return _finish(messages)


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


def _message_list(rec: dict, key: str, fmt: str) -> list:
    if key not in rec:
        raise _Bad(f"field {key!r} missing ({fmt} format expects a {key!r} list)")
    msgs = rec[key]
    if not isinstance(msgs, list):
        raise _Bad(f"field {key!r} must be a list, got {type(msgs).__name__}")
    if not msgs:
        raise _Bad("empty conversation")
    return msgs


def parse_sharegpt(rec: dict) -> list[dict]:
    messages = []
    system = _str_field(rec, "system", "ShareGPT", "", required=False)
    if system:
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(_message_list(rec, "conversations", "ShareGPT")):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise _Bad(f"conversation turn {i} needs 'from' and 'value' (ShareGPT format)")
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise _Bad(f"conversation turn {i}: unknown speaker {turn['from']!r} "
                       f"(expected one of {', '.join(SHAREGPT_ROLES)})")
        messages.append({"role": role, "content": turn["value"]})
    return _finish(messages)


def parse_openai(rec: dict, need_reply: bool = True) -> list[dict]:
    messages = []
    for i, m in enumerate(_message_list(rec, "messages", "OpenAI")):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise _Bad(f"message {i} needs 'role' and 'content' (OpenAI format)")
        messages.append({"role": m["role"], "content": m["content"]})
    return _finish(messages, need_reply)


def parse_preference(rec: dict) -> PreferenceExample:
    for key in ("chosen", "rejected"):
        if key not in rec:
            raise _Bad(f"field {key!r} missing (preference format expects prompt, chosen, rejected)")
    if "prompt" not in rec:
        if isinstance(rec["chosen"], str) and isinstance(rec["rejected"], str):
            return split_hh(rec["chosen"], rec["rejected"])
        raise _Bad("field 'prompt' missing (preference format expects prompt, chosen, rejected)")
    system = _str_field(rec, "system", "preference", "", required=False)
    prompt = rec["prompt"]
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list):
        messages = parse_openai({"messages": prompt}, need_reply=False)
    else:
        raise _Bad(f"field 'prompt' must be a string or a list of messages, got {type(prompt).__name__}")
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    _finish(messages, need_reply=False)
    if messages[-1]["role"] != "user":
        raise _Bad("the prompt must end with a user message")
    return PreferenceExample(messages, _response(rec, "chosen"), _response(rec, "rejected"))


def _response(rec: dict, key: str) -> str:
    value = rec[key]
    if isinstance(value, list) and value and isinstance(value[-1], dict):  # [..., reply] form
        last = value[-1]
        value = last.get("content") if last.get("role") == "assistant" else None
    if not isinstance(value, str):
        raise _Bad(f"field {key!r} must be a string or end with an assistant message")
    if not value.strip():
        raise _Bad(f"field {key!r} is empty")
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
        raise _Bad("chosen and rejected share no '\\n\\nAssistant:' prefix "
                   "(HH-RLHF form expects two dialogues differing only in the last reply)")
    head, end = chosen[:cut], cut + len(marker)
    parts = HH_SPLIT.split(head)
    if parts[0].strip():
        raise _Bad("HH-RLHF dialogue must start with '\\n\\nHuman:'")
    messages = [{"role": "user" if who == "Human" else "assistant", "content": text}
                for who, text in zip(parts[1::2], parts[2::2])]
    _finish(messages, need_reply=False)
    if messages[-1]["role"] != "user":
        raise _Bad("HH-RLHF prompt must end with a Human turn before the final Assistant reply")
    strip1 = lambda s: s[1:] if s.startswith(" ") else s  # the space after "Assistant:"
    return PreferenceExample(messages, _response({"c": strip1(chosen[end:])}, "c"),
                             _response({"r": strip1(rejected[end:])}, "r"))


SFT_PARSERS: dict[str, Callable[[dict], list[dict]]] = {
    "alpaca": parse_alpaca, "sharegpt": parse_sharegpt, "openai": parse_openai}


def detect_format(rec: object) -> str:
    if isinstance(rec, dict):
        if "chosen" in rec and "rejected" in rec:
            return "preference"
        for fmt, key in (("openai", "messages"), ("sharegpt", "conversations"), ("alpaca", "instruction")):
            if key in rec:
                return fmt
    keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
    raise _Bad(f"cannot tell the data format from {keys}; expected Alpaca (instruction/output), "
               "ShareGPT (conversations), OpenAI (messages) or preference (chosen/rejected)")


# ----------------------------------------------------------------------------- loaders


def load_examples(path: str | Path, fmt: str = "auto", skip_bad: bool = False) -> Loaded:
    """Read SFT conversations: a ``Loaded`` whose examples are lists of messages.

    ``fmt`` is ``alpaca``, ``sharegpt``, ``openai`` or ``auto`` (decided by the first record
    and then required of every record, so a record missing a field is reported as such
    instead of being taken for another format).
    """
    return _load(path, fmt, skip_bad, SFT_PARSERS)


def load_preferences(path: str | Path, skip_bad: bool = False) -> Loaded:
    """Read preference pairs: a ``Loaded`` whose examples are ``PreferenceExample``s."""
    return _load(path, "preference", skip_bad, {"preference": parse_preference})


def _load(path, fmt: str, skip_bad: bool, parsers: dict) -> Loaded:
    if fmt != "auto" and fmt not in parsers:
        raise ValueError(f"unknown format {fmt!r}; expected auto or one of {', '.join(parsers)}")
    out = Loaded(str(path), [], format="" if fmt == "auto" else fmt)
    for line, rec in iter_records(path):
        try:
            if isinstance(rec, _Bad):
                raise rec
            if not isinstance(rec, dict):
                raise _Bad(f"a record must be a JSON object, got {type(rec).__name__}")
            if not out.format:
                found = detect_format(rec)
                if found not in parsers:
                    raise _Bad(f"this looks like {found} data; expected {', '.join(parsers)}")
                out.format = found
            out.examples.append(parsers[out.format](rec))
        except _Bad as e:
            msg = f"{path} line {line}: {e}"
            if not skip_bad:
                raise DataError(msg) from None
            out.skipped.append((line, str(e)))
    if out.skipped:
        first_line, first_reason = out.skipped[0]
        log.warning("%s: skipped %d bad record(s) of %d (first: line %d: %s)", path, len(out.skipped),
                    len(out.skipped) + len(out.examples), first_line, first_reason)
    if not out.examples:
        raise DataError(f"{path}: no usable records" + (f" ({len(out.skipped)} skipped)" if out.skipped else ""))
    return out
