"""Data sets by name: LLaMA-Factory's `data/dataset_info.json` registry.

A LLaMA-Factory config says `dataset: identity,alpaca_en_demo` and `dataset_dir: data`; the names
are keys of `<dataset_dir>/dataset_info.json`, each saying where the file is and how its records
are laid out:

    "identity":   {"file_name": "identity.json"}                       # Alpaca columns, the default
    "glaive":     {"file_name": "glaive.json", "formatting": "sharegpt",
                   "columns": {"messages": "conversations", "tools": "tools"}}
    "dpo_en":     {"file_name": "dpo_en.json", "formatting": "sharegpt", "ranking": true,
                   "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}}

`columns` maps the registry's canonical names (prompt, query, response, history, system, messages,
chosen, rejected, kto_tag: the boolean label of stage kto's unpaired data) to the record's own keys; `tags` does the same for the keys and speaker names
inside a ShareGPT turn (role_tag "from", content_tag "value", user_tag "human", assistant_tag "gpt",
system_tag "system"). `normalize` rewrites each record into the layout minitune's parsers read
(formats.py: Alpaca `instruction/input/output`, ShareGPT `conversations` of `from/value`;
preference.py: `prompt/chosen/rejected`), so everything after it is the same code for a named data
set as for a file given by path, which still works.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .formats import DataError, Loaded, RecordError, iter_records, load_examples

INFO_FILE = "dataset_info.json"
# LLaMA-Factory's defaults (its data/README.md), per formatting
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": "history",
                  "system": "system", "chosen": "chosen", "rejected": "rejected"}
SHAREGPT_COLUMNS = {"messages": "conversations", "system": "system", "tools": "tools", "chosen": "chosen",
                    "rejected": "rejected"}
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
UNSUPPORTED_SOURCES = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")


@dataclass
class DatasetSpec:
    """One data set: its file and how to read its records (formatting None: guessed from the records)."""

    name: str
    file: Path
    formatting: str | None = None  # alpaca | sharegpt
    ranking: bool = False  # preference pairs (chosen / rejected)
    columns: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)


def read_registry(dataset_dir) -> dict[str, DatasetSpec]:
    """Every entry of `<dataset_dir>/dataset_info.json`, checked; {} when the file is absent."""
    path = Path(dataset_dir) / INFO_FILE
    if not path.exists():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(info, dict):
        raise UserError(f"{path}: expected an object of data set name -> entry")
    specs = {}
    for name, entry in info.items():
        where = f"{path}: {name!r}"
        if not isinstance(entry, dict):
            raise UserError(f"{where}: expected an object with file_name")
        if "file_name" not in entry:
            remote = [k for k in UNSUPPORTED_SOURCES if k in entry]
            specs[name] = None if remote else entry  # a hub data set: an error only if a config asks for it
            continue
        formatting = entry.get("formatting", "alpaca")
        if formatting not in ("alpaca", "sharegpt"):
            raise UserError(f"{where}: formatting {formatting!r} (expected alpaca or sharegpt)")
        for key in ("columns", "tags"):
            if not isinstance(entry.get(key, {}), dict):
                raise UserError(f"{where}: {key} must be an object of name -> field")
        specs[name] = DatasetSpec(name, Path(dataset_dir) / entry["file_name"], formatting,
                                  bool(entry.get("ranking", False)), entry.get("columns", {}), entry.get("tags", {}))
    return specs


def resolve_datasets(names: list[str], dataset_dir="data") -> list[DatasetSpec]:
    """Each `dataset` item as a DatasetSpec: a registered name, or else a path to a data file."""
    registry = read_registry(dataset_dir)
    specs = []
    for name in names:
        if name in registry:
            if registry[name] is None:
                raise UserError(f"{Path(dataset_dir) / INFO_FILE}: {name!r} is a hub data set; minitune reads "
                                "local files only (download it and give it a file_name)")
            specs.append(registry[name])
        elif Path(name).exists():
            specs.append(DatasetSpec(name, Path(name)))
        else:
            known = ", ".join(registry) if registry else f"none: {Path(dataset_dir) / INFO_FILE} does not exist"
            raise UserError(f"dataset {name!r}: neither a file nor a data set registered in "
                            f"{Path(dataset_dir) / INFO_FILE} (registered: {known})")
    return specs


def _get(rec: dict, spec: DatasetSpec, canonical: str, defaults: dict, required: bool = True):
    key = spec.columns.get(canonical, defaults.get(canonical, canonical))
    if key not in rec:
        if required:
            how = "columns" if canonical in spec.columns else "the default column"
            raise RecordError(f"{how} maps {canonical!r} to field {key!r}, which this record lacks "
                              f"(its fields: {', '.join(sorted(rec))})")
        return None
    return rec[key]


def _sharegpt_turns(turns, spec: DatasetSpec, where: str) -> list[dict]:
    tags = {**SHAREGPT_TAGS, **spec.tags}
    roles = {tags["user_tag"]: "human", tags["assistant_tag"]: "gpt", tags["system_tag"]: "system",
             tags["observation_tag"]: "observation", tags["function_tag"]: "function_call"}  # tool-call turns
    if not isinstance(turns, list):
        raise RecordError(f"{where} must be a list of turns")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or tags["role_tag"] not in turn or tags["content_tag"] not in turn:
            raise RecordError(f"{where} turn {i} needs {tags['role_tag']!r} and {tags['content_tag']!r} (tags)")
        role = turn[tags["role_tag"]]
        if role not in roles:
            raise RecordError(f"{where} turn {i}: speaker {role!r} is none of the tags {sorted(roles)}")
        out.append({"from": roles[role], "value": turn[tags["content_tag"]]})
    return out


def normalize(rec: dict, spec: DatasetSpec) -> dict:
    """One record in minitune's own layout (see the module docstring); unknown layouts pass through."""
    if spec.formatting is None or not isinstance(rec, dict):
        return rec  # a file given by path: the parsers guess its format
    if spec.formatting == "alpaca":
        out = {"instruction": _get(rec, spec, "prompt", ALPACA_COLUMNS)}
        for canonical, ours in (("query", "input"), ("history", "history"), ("system", "system")):
            value = _get(rec, spec, canonical, ALPACA_COLUMNS, required=False)
            if value is not None:
                out[ours] = value
        if not spec.ranking:
            out["output"] = _get(rec, spec, "response", ALPACA_COLUMNS)
            return out
        # preference pairs: the prompt (and its input, joined by a newline as LLaMA-Factory does) and two replies
        prompt = out["instruction"] + ("\n" + out["input"] if out.get("input") else "")
        pair = {"prompt": prompt, "chosen": _get(rec, spec, "chosen", ALPACA_COLUMNS),
                "rejected": _get(rec, spec, "rejected", ALPACA_COLUMNS)}
        return {**pair, **({"system": out["system"]} if out.get("system") else {})}
    turns = _sharegpt_turns(_get(rec, spec, "messages", SHAREGPT_COLUMNS), spec, "messages")
    system = _get(rec, spec, "system", SHAREGPT_COLUMNS, required=False)
    if not spec.ranking:
        tools = _get(rec, spec, "tools", SHAREGPT_COLUMNS, required="tools" in spec.columns)
        return {"conversations": turns, **({"system": system} if system else {}), **({"tools": tools} if tools else {})}
    role = {"human": "user", "gpt": "assistant", "system": "system", "function_call": "function_call",
            "observation": "observation"}
    prompt = ([{"role": "system", "content": system}] if system else []) + \
             [{"role": role[t["from"]], "content": t["value"]} for t in turns]
    tags = {**SHAREGPT_TAGS, **spec.tags}
    replies = {}
    for key in ("chosen", "rejected"):
        reply = _get(rec, spec, key, SHAREGPT_COLUMNS)
        replies[key] = reply[tags["content_tag"]] if isinstance(reply, dict) and tags["content_tag"] in reply else reply
    return {"prompt": prompt, **replies}


def normalize_kto(rec: dict, spec: DatasetSpec) -> dict:
    """A KTO record (stage kto, data/kto.py): normalize's layout plus "label", read from the field that
    `columns.kto_tag` names (kto_en_demo: "label"), the boolean that says whether the reply is desirable."""
    out = normalize(rec, spec)
    key = spec.columns.get("kto_tag", "label")
    if spec.formatting is not None and isinstance(rec, dict) and key in rec:
        out = {**out, "label": rec[key]}
    return out


def load_sft(spec: DatasetSpec, max_samples: int | None = None) -> Loaded:
    """A data set's conversations (the first max_samples of them, as LLaMA-Factory's max_samples)."""
    loaded = load_examples(spec.file, transform=lambda rec: normalize(rec, spec))
    if max_samples is not None:
        loaded.examples = loaded.examples[:max_samples]
    return loaded


def load_pair_records(spec: DatasetSpec, max_samples: int | None = None) -> list[dict]:
    """A ranking data set's records in preference.py's layout (prompt, chosen, rejected)."""
    records = []
    for line, rec in iter_records(spec.file):
        try:
            if isinstance(rec, RecordError):
                raise rec
            records.append(normalize(rec, spec))
        except RecordError as e:
            raise DataError(f"{spec.file} line {line}: {e}") from None
        if max_samples is not None and len(records) >= max_samples:
            break
    return records
