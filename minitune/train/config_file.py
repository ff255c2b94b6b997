"""Reading a training config: a config file and the command line, into a checked TrainConfig.

Two file forms are read:

* JSON (a `.json` file, or any file whose text starts with `{`): one object of key: value pairs;
* the flat subset of YAML that LLaMA-Factory's example configs use: `key: value` lines,
  `# comments`, `[a, b]` lists and block lists (`key:` then `  - item` lines). We parse it by
  hand (`parse_yaml_subset`), so there is no PyYAML dependency; nesting is refused.

Every value is checked against the type annotation of its TrainConfig field (`coerce`): what is
safe is converted (1 -> 1.0; a flag, always a string on the command line, is read as a YAML
scalar first), anything else stops the run. An error names where the value came from, the file
(and line, for a YAML line that is not `key: value`) or the `--flag`, and the key; an unknown key
gets the closest known one as a hint. `load_config` layers defaults < file < flags and then runs
TrainConfig.validate, naming the source of the key that failed.
"""

import dataclasses
import difflib
import json
import sys
import types
import typing
from pathlib import Path

from .config import TrainConfig, TrainConfigError

# keys of LLaMA-Factory example configs that change nothing here; accepted with a note, so its files load
IGNORED_KEYS = ("do_train", "do_eval", "overwrite_cache", "preprocessing_num_workers",
                "dataloader_num_workers", "report_to", "ddp_timeout", "trust_remote_code", "save_only_model",
                "eval_strategy", "evaluation_strategy", "save_strategy", "logging_strategy")

# the keys a file or a flag may set, each with its type annotation
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


# ----------------------------------------------------------------------------- values and types


def parse_scalar(text: str):
    """One YAML-subset scalar: null/true/false, int, float, quoted or bare string, [a, b] list."""
    text = text.strip()
    if text[:1] == "[" and text[-1:] == "]":
        return [parse_scalar(t) for t in text[1:-1].split(",") if t.strip()]
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    low = text.lower()
    if low in ("null", "none", "~", ""):
        return None
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def coerce(key: str, value, source: str):
    """Check `value` against the annotation of field `key`; convert what is safe (1 -> 1.0)."""
    if key not in FIELDS:
        close = difflib.get_close_matches(key, FIELDS, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(FIELDS)}"
        raise TrainConfigError(f"{source}: unknown key {key!r}{hint}")
    hint = FIELDS[key].type
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise TrainConfigError(f"{source}: {key} must not be null")
    if isinstance(value, str) and str not in options:  # a flag on the command line is always a string
        value = parse_scalar(value)
    for want in options:
        if want is bool and isinstance(value, bool):
            return value
        if want is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if want is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if want is str and isinstance(value, str):
            return value
        if typing.get_origin(want) is list and isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    names = " or ".join("null" if t is type(None) else getattr(t, "__name__", str(t)) for t in options)
    raise TrainConfigError(f"{source}: {key} must be {names}, got {value!r} ({type(value).__name__})")


# ----------------------------------------------------------------------------- files and flags


def parse_yaml_subset(text: str, source: str) -> dict:
    """`key: value` lines, `# comments`, and block lists (`key:` then `  - item` lines)."""
    out, list_key = {}, None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split(" #")[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not line.strip():
            continue
        if line.lstrip().startswith("- ") and list_key is not None:
            out[list_key].append(parse_scalar(line.lstrip()[2:]))
            continue
        key, sep, value = line.partition(":")
        if not sep or line[0].isspace() or not key.strip():
            raise TrainConfigError(f"{source}:{n}: expected `key: value`, got {raw.strip()!r} "
                                   "(minitune reads a flat key: value subset of YAML)")
        key = key.strip()
        if value.strip():
            out[key], list_key = parse_scalar(value), None
        else:
            out[key], list_key = [], key  # a block list follows (or an empty value)
    return {k: (None if v == [] else v) for k, v in out.items()}


def read_config_file(path) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TrainConfigError(f"{path}: config file not found") from None
    if path.suffix == ".json" or text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise TrainConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise TrainConfigError(f"{path}: expected a JSON object of key: value pairs")
        return data
    return parse_yaml_subset(text, str(path))


def load_config(path=None, overrides: dict | None = None) -> TrainConfig:
    """Defaults, then the file at `path`, then `overrides` ({key: value or flag string})."""
    values, sources, ignored = {}, {}, []
    if path is not None:
        for key, value in read_config_file(path).items():
            if key in IGNORED_KEYS:
                ignored.append(key)
                continue
            values[key], sources[key] = coerce(key, value, str(path)), str(path)
    if ignored:
        print(f"note: {path}: ignoring {', '.join(ignored)} (no effect in minitune)", file=sys.stderr)
    for key, value in (overrides or {}).items():
        values[key], sources[key] = coerce(key, value, f"command line (--{key})"), f"command line (--{key})"
    cfg = TrainConfig.__new__(TrainConfig)  # fill first, then validate with the right source named
    for name, f in FIELDS.items():
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        setattr(cfg, name, values.get(name, default))
    try:
        cfg.validate("config")
    except TrainConfigError as e:
        key = str(e).split(": ")[1]
        where = sources.get(key) or (sources.get("fp16") if key == "bf16" else None) or "defaults"
        raise TrainConfigError(str(e).replace("config:", f"{where}:", 1)) from None
    return cfg


def flag_help() -> dict[str, str]:
    """field -> its comment in the TrainConfig class body (config.py), for `minitune train --help`."""
    import inspect

    helps = {}
    for line in inspect.getsource(TrainConfig).splitlines():
        name, _, rest = line.strip().partition(":")
        if name in FIELDS and "#" in rest:
            helps[name] = rest.split("#", 1)[1].strip()
    return helps
