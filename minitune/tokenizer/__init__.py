"""Tokenizers: text <-> token ids, the same ids the model's own tokenizer gives.

Two kinds of files cover the models minitune loads:

* ``tokenizer.json`` with a byte-level BPE (Qwen2/2.5/3, LLaMA-3, GPT-2): read
  and run in pure Python by :mod:`minitune.tokenizer.bpe` (the text cut before
  BPE: :mod:`minitune.tokenizer.pre_tokenizer`);
* ``tokenizer.model``, a SentencePiece model (LLaMA-2): run by the
  ``sentencepiece`` package through :mod:`minitune.tokenizer.spm`.

Both sit behind one small class, :class:`Tokenizer`. ``load_tokenizer(path)``
picks the kind from the files in the folder, and reads the BOS/EOS/PAD tokens
the way transformers does: ``tokenizer_config.json`` first (``eos_token`` etc.,
a string or an AddedToken dict; an explicit null means "none"), then
``special_tokens_map.json``, and only for a token named nowhere the ids in
``generation_config.json`` and ``config.json`` (a list there gives its first id).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .bpe import ByteLevelBPE, TokenizerFileError
from .spm import SentencePieceModel

__all__ = ["Tokenizer", "load_tokenizer", "TokenizerFileError", "ByteLevelBPE", "SentencePieceModel"]

_ROLES = ("bos", "eos", "pad")


@dataclass
class Tokenizer:
    """One interface over a byte-level BPE or a SentencePiece backend."""

    backend: ByteLevelBPE | SentencePieceModel
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    chat_template: str | None = None
    config: dict = field(default_factory=dict)  # tokenizer_config.json as read, rewritten by save()
    # the ids that end a generation, as transformers' generate() takes them: the eos_token_id of
    # generation_config.json (else config.json), which may list several (Qwen2.5-Instruct: <|im_end|>
    # and <|endoftext|>; LLaMA-3.1-Instruct: three), plus eos_id
    stop_ids: list[int] = field(default_factory=list)

    def encode(self, text: str) -> list[int]:
        """Text -> ids. No BOS/EOS is added; special-token strings in the text become their ids."""
        return self.backend.encode(text)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if hasattr(ids, "tolist"):  # a torch tensor or numpy array
            ids = ids.tolist()
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        if isinstance(self.backend, ByteLevelBPE):
            return self.backend.id_to_token.get(i)
        return self.backend.id_to_added.get(i) or self.backend.sp.id_to_piece(i)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (max id + 1, added tokens included)."""
        return self.backend.vocab_size

    def save(self, directory: str | Path) -> Path:
        """Write tokenizer.json or tokenizer.model plus tokenizer_config.json, loadable by
        ``transformers.AutoTokenizer.from_pretrained(directory)``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = dict(self.config)
        if isinstance(self.backend, ByteLevelBPE):
            (directory / "tokenizer.json").write_text(json.dumps(self.backend.spec, ensure_ascii=False, indent=1),
                                                      encoding="utf-8")
            config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        else:
            self.backend.save_files(directory)
            config.setdefault("tokenizer_class", "LlamaTokenizer")
            # Without these, transformers' LlamaTokenizer would add <s> itself; "legacy" makes it
            # put the "▁" prefix on the text after a special token too, as sentencepiece does.
            config.setdefault("add_bos_token", False)
            config.setdefault("add_eos_token", False)
            config.setdefault("legacy", True)
        config.setdefault("clean_up_tokenization_spaces", False)  # else decode() may change spaces
        for role in _ROLES:
            i = getattr(self, f"{role}_id")
            config[f"{role}_token"] = self.id_to_token(i) if i is not None else None
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2),
                                                         encoding="utf-8")
        return directory

    def __len__(self) -> int:
        return self.vocab_size


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerFileError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise TokenizerFileError(f"{path}: expected a JSON object")
    return data


def _token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as "<s>" or {"content": "<s>", ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _first_id(value) -> int | None:
    # generation_config may list several eos ids (LLaMA-3 instruct); the first is the main one.
    if isinstance(value, list):
        return int(value[0]) if value else None
    return int(value) if isinstance(value, int) else None


def _added_from_config(config: dict) -> tuple[dict[str, int], set[str]]:
    added, special = {}, set()
    for i, tok in (config.get("added_tokens_decoder") or {}).items():
        added[tok["content"]] = int(i)
        if tok.get("special", True):
            special.add(tok["content"])
    return added, special


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load the tokenizer in a model folder (or a tokenizer.json / tokenizer.model file itself)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer path {path} does not exist")
    folder = path if path.is_dir() else path.parent
    json_file = path if path.is_file() and path.suffix == ".json" else folder / "tokenizer.json"
    model_file = path if path.is_file() and path.suffix == ".model" else folder / "tokenizer.model"
    config = _read_json(folder / "tokenizer_config.json")

    backend = None
    if json_file.is_file():
        try:
            backend = ByteLevelBPE.from_file(json_file)
        except TokenizerFileError:
            # LLaMA-2 folders also carry a tokenizer.json, in SentencePiece style (Metaspace,
            # byte fallback) that the byte-level reader does not run; its .model file does.
            if not model_file.is_file():
                raise
    if backend is None:
        if not model_file.is_file():
            present = sorted(p.name for p in folder.iterdir())
            raise FileNotFoundError(f"no tokenizer in {folder}: expected tokenizer.json (byte-level BPE) or "
                                    f"tokenizer.model (SentencePiece); found {present}")
        backend = SentencePieceModel(model_file, *_added_from_config(config))

    chat_template = config.get("chat_template")
    if isinstance(chat_template, list):  # the named form: [{"name": "default", "template": ...}, ...]
        named = {t["name"]: t["template"] for t in chat_template}
        chat_template = named.get("default", next(iter(named.values()), None))
    if chat_template is None and (folder / "chat_template.jinja").is_file():
        chat_template = (folder / "chat_template.jinja").read_text(encoding="utf-8")

    gen_file = folder / "generation_config.json"
    generation = _read_json(gen_file) if gen_file.is_file() else None  # None: no file (not an empty one)
    model_config = _read_json(folder / "config.json")
    ids = _resolve_special_ids(folder, config, backend, generation or {}, model_config)
    return Tokenizer(backend, chat_template=chat_template, config=config, **ids,
                     stop_ids=_generation_stop_ids(generation, model_config, ids["eos_id"]))


def _generation_stop_ids(generation: dict | None, model_config: dict, eos_id: int | None) -> list[int]:
    """generation_config.json's eos_token_id when that file exists (even without one: transformers'
    generate() then has none), else config.json's; an id or a list. Plus the tokenizer's eos_id; sorted."""
    listed = (model_config if generation is None else generation).get("eos_token_id")
    listed = listed if isinstance(listed, list) else [listed]
    return sorted({int(i) for i in listed if isinstance(i, int)} | ({eos_id} if eos_id is not None else set()))


def _resolve_special_ids(folder: Path, config: dict, backend, generation: dict,
                         model_config: dict) -> dict[str, int | None]:
    """bos/eos/pad ids; generation and model_config: generation_config.json and config.json as read."""
    special_map = _read_json(folder / "special_tokens_map.json")
    out: dict[str, int | None] = {}
    for role in _ROLES:
        key = f"{role}_token"
        text = _token_text(config[key]) if key in config else _token_text(special_map.get(key))
        if text is not None:
            i = backend.token_to_id(text)
            if i is None:
                raise TokenizerFileError(f"{folder}: {key} {text!r} is not in the vocabulary")
        elif key in config:
            # Written as null on purpose (Qwen: "bos_token": null). transformers then has no such
            # token either, even if generation_config.json lists an id for it.
            i = None
        else:  # not named at all: the ids that generation uses, as transformers' generate() does
            i = _first_id(generation.get(f"{role}_token_id"))
            if i is None:
                i = _first_id(model_config.get(f"{role}_token_id"))
            if i is None and isinstance(backend, SentencePieceModel):
                i = backend.special_id(role)
        out[f"{role}_id"] = i
    return out
