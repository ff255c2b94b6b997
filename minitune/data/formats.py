"""Reading SFT data from JSON / JSONL files in the shapes people actually publish.

Every reader normalises a record to a list of ``{"role", "content"}`` messages (roles
``system``, ``user``, ``assistant``, alternating user/assistant after an optional system):

- Alpaca (Stanford Alpaca; the multi-turn ``history`` extension from Chinese SFT datasets)::
    {"instruction": "...", "input": "...", "output": "...", "system": "...",
     "history": [["user 1", "assistant 1"], ...]}
  ``input`` is optional; when present it stays on the user message as ``"input"`` so the
  Alpaca template can print its "### Input:" block (other templates append it to the text).
- ShareGPT (ShareGPT.com dumps, used by Vicuna)::
    {"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}], "system": "..."}
  ``from`` may also be ``user`` / ``assistant``. Tool calls (LLaMA-Factory's glaive_toolcall layout):
  ``function_call`` turns (JSON ``{"name", "arguments"}``, or a list) in a reply's place, ``observation``
  turns (the tool's answer) in a user turn's, and ``"tools"`` (JSON text or a list of function
  signatures); the tools ride on the conversation's first message, under ``"tools"``.
- OpenAI chat (the fine-tuning API format)::
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}]}
(Preference pairs for DPO / reward models are read by ``minitune.data.preference``.)

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

from ..errors import UserError
from .templates import check_roles, parse_tool_calls, parse_tools

log = logging.getLogger(__name__)


class DataError(UserError):
    """A record that cannot be turned into a training example; the message says where."""


class RecordError(Exception):
    """What is wrong with one record, raised by the parsers; the loader adds file and line."""


class _Fatal(RecordError):
    """Bad in a way that hides the records after it, so ``skip_bad`` cannot step over it."""


@dataclass
class Loaded:
    """What a loader returns: the good examples plus an account of every skipped record."""

    path: str
    examples: list
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)
    format: str = ""

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):  # also makes a Loaded iterable
        return self.examples[i]


# ----------------------------------------------------------------------------- records


def read_utf8(path: str | Path) -> str:
    """The file's text. Not UTF-8 is a ``DataError`` naming the line and column of the first bad byte:
    Python's own error gives only a byte offset into a file of thousands of lines, and no file name.
    A leading byte order mark (Windows editors write one) is dropped; JSON may not start with it."""
    raw = Path(path).read_bytes().removeprefix(b"\xef\xbb\xbf")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1  # in bytes, 1-based
        raise DataError(f"{path} line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {column}; "
                        "data files must be UTF-8 encoded)") from None


def iter_records(path: str | Path) -> Iterator[tuple[int, object]]:
    """Yield ``(line_number, record)``; a record that is not JSON is yielded as a ``RecordError``."""
    text = read_utf8(path)
    if text.lstrip().startswith("["):
        yield from _iter_json_array(text)
        return
    if text.lstrip().startswith("{") and "\n" in text.strip():
        try:
            json.loads(text)
            yield 1, _Fatal("the file is one JSON object; expected JSONL (one record per line) "
                            "or a JSON array of records")
            return
        except json.JSONDecodeError:
            pass  # several objects: JSONL
    # split at "\n" only: str.splitlines() also breaks at U+2028, U+0085, ... which JSON strings may hold raw
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue  # blank lines hold no record
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            yield n, RecordError(f"not valid JSON ({e.msg} at column {e.colno})")


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
        except json.JSONDecodeError as e:  # where the rest of the array starts is unknown
            yield e.lineno, _Fatal(f"not valid JSON ({e.msg} at column {e.colno})")
            return
        yield line, obj
        pos = ws.match(text, pos).end()
        if text.startswith(",", pos):
            pos += 1
        elif not text.startswith("]", pos):
            yield text.count("\n", 0, pos) + 1, _Fatal("not valid JSON (expected ',' or ']' in the array)")
            return


# ----------------------------------------------------------------------------- parsers


def str_field(rec: dict, key: str, fmt: str, expects: str, required: bool = True) -> str:
    if key not in rec or rec[key] is None:
        if required:
            raise RecordError(f"field {key!r} missing ({fmt} format expects {expects})")
        return ""
    if not isinstance(rec[key], str):
        raise RecordError(f"field {key!r} must be a string, got {type(rec[key]).__name__}")
    return rec[key]


def check_conversation(messages: list[dict], need_reply: bool = True) -> list[dict]:
    """Roles in order, and (for SFT) at least one non-empty reply, last."""
    try:
        check_roles(messages)
    except ValueError as e:
        raise RecordError(str(e)) from None
    if need_reply and messages[-1]["role"] not in ("assistant", "function_call"):
        last = "an observation" if messages[-1]["role"] == "observation" else "a user message"
        raise RecordError(f"conversation ends with {last}, so it has no reply to train on")
    for i, m in enumerate(messages):
        if m["role"] in ("assistant", "function_call") and not m["content"].strip():
            raise RecordError(f"message {i} ({m['role']}) is empty")
        if m["role"] == "function_call":
            try:
                parse_tool_calls(m["content"])
            except ValueError as e:
                raise RecordError(f"message {i}: {e}") from None
    return messages


def parse_alpaca(rec: dict) -> list[dict]:
    expects = "instruction, input, output"
    instruction = str_field(rec, "instruction", "Alpaca", expects)
    inp = str_field(rec, "input", "Alpaca", expects, required=False)
    output = str_field(rec, "output", "Alpaca", expects)
    system = str_field(rec, "system", "Alpaca", expects, required=False)
    messages = [{"role": "system", "content": system}] if system else []
    history = rec.get("history") or []
    if not isinstance(history, list):
        raise RecordError("field 'history' must be a list of [user, assistant] pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise RecordError(f"history item {i} is not a [user, assistant] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    user = {"role": "user", "content": instruction}
    if inp:
        user["input"] = inp
    messages += [user, {"role": "assistant", "content": output}]
    return check_conversation(messages)


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "function_call": "function_call", "observation": "observation"}


def _message_list(rec: dict, key: str, fmt: str) -> list:
    if key not in rec:
        raise RecordError(f"field {key!r} missing ({fmt} format expects a {key!r} list)")
    msgs = rec[key]
    if not isinstance(msgs, list):
        raise RecordError(f"field {key!r} must be a list, got {type(msgs).__name__}")
    if not msgs:
        raise RecordError("empty conversation")
    return msgs


def parse_sharegpt(rec: dict) -> list[dict]:
    messages = []
    system = str_field(rec, "system", "ShareGPT", "", required=False)
    if system:
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(_message_list(rec, "conversations", "ShareGPT")):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise RecordError(f"conversation turn {i} needs 'from' and 'value' (ShareGPT format)")
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise RecordError(f"conversation turn {i}: unknown speaker {turn['from']!r} "
                       f"(expected one of {', '.join(SHAREGPT_ROLES)})")
        messages.append({"role": role, "content": turn["value"]})
    check_conversation(messages)
    try:
        tools = parse_tools(rec.get("tools"))
    except ValueError as e:
        raise RecordError(str(e)) from None
    if tools:
        messages[0]["tools"] = tools
    return messages


def parse_openai(rec: dict, need_reply: bool = True) -> list[dict]:
    messages = []
    for i, m in enumerate(_message_list(rec, "messages", "OpenAI")):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RecordError(f"message {i} needs 'role' and 'content' (OpenAI format)")
        messages.append({"role": m["role"], "content": m["content"]})
    return check_conversation(messages, need_reply)


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
    raise RecordError(f"cannot tell the data format from {keys}; expected Alpaca (instruction/output), "
               "ShareGPT (conversations), OpenAI (messages) or preference (chosen/rejected)")


# ----------------------------------------------------------------------------- loaders


def load_examples(path: str | Path, fmt: str = "auto", skip_bad: bool = False, transform=None) -> Loaded:
    """Read SFT conversations: a ``Loaded`` whose examples are lists of messages.

    ``fmt`` is ``alpaca``, ``sharegpt``, ``openai`` or ``auto`` (decided by the first record
    and then required of every record, so a record missing a field is reported as such
    instead of being taken for another format). ``transform(record)`` rewrites each record
    first (a registered data set's column mapping, registry.py).
    """
    return load_records(path, fmt, skip_bad, SFT_PARSERS, transform)


def load_records(path, fmt: str, skip_bad: bool, parsers: dict, transform=None) -> Loaded:
    """Run ``parsers[fmt]`` over every record of a file, with file:line on every error."""
    if fmt != "auto" and fmt not in parsers:
        raise ValueError(f"unknown format {fmt!r}; expected auto or one of {', '.join(parsers)}")
    out = Loaded(str(path), [], format="" if fmt == "auto" else fmt)
    for line, rec in iter_records(path):
        try:
            if isinstance(rec, RecordError):
                raise rec
            if not isinstance(rec, dict):
                raise RecordError(f"a record must be a JSON object, got {type(rec).__name__}")
            if transform is not None:
                rec = transform(rec)
            if not out.format:
                found = detect_format(rec)
                if found not in parsers:
                    raise RecordError(f"this looks like {found} data; expected {', '.join(parsers)}")
                out.format = found
            out.examples.append(parsers[out.format](rec))
        except RecordError as e:
            msg = f"{path} line {line}: {e}"
            if not skip_bad or isinstance(e, _Fatal):
                raise DataError(msg) from None
            out.skipped.append((line, str(e)))
    if out.skipped:
        first_line, first_reason = out.skipped[0]
        log.warning("%s: skipped %d bad record(s) of %d (first: line %d: %s)", path, len(out.skipped),
                    len(out.skipped) + len(out.examples), first_line, first_reason)
    if not out.examples:
        raise DataError(f"{path}: no usable records" + (f" ({len(out.skipped)} skipped)" if out.skipped else ""))
    return out
