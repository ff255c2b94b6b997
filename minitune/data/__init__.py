"""Data for post-training: chat templates, dataset readers, tokenised examples and batches.

- ``templates``: how each model family lays out a conversation, as (text, trainable) segments.
- ``formats``: Alpaca / ShareGPT / OpenAI / preference JSON and JSONL to lists of messages.
- ``dataset``: messages to ``input_ids`` + ``labels`` (-100 off the replies), splits, batches.
- ``kto``: unpaired replies labelled desirable / undesirable (stage kto), with their mismatched pairs.
- ``pretrain``: raw text, EOS-ended documents packed into cutoff_len blocks (stage pt).
"""
from .dataset import (IGNORE_INDEX, DataReport, PaddingCollator, PreferenceCollator, SFTData,
                      encode_segments, pack, prepare_sft, show_loss_mask, split_train_val,
                      tokenize_all, tokenize_conversation, tokenize_preference)
from .formats import DataError, Loaded, load_examples
from .preference import PreferenceExample, load_preferences
from .templates import BOS, EOS, TEMPLATES, Template, get_template, render, render_segments

__all__ = [
    "BOS", "EOS", "IGNORE_INDEX", "TEMPLATES", "DataError", "DataReport", "Loaded", "PaddingCollator",
    "PreferenceCollator", "PreferenceExample", "SFTData", "Template", "encode_segments", "get_template",
    "load_examples", "load_preferences", "pack", "prepare_sft", "render", "render_segments",
    "show_loss_mask", "split_train_val", "tokenize_all", "tokenize_conversation", "tokenize_preference",
]
