"""Readers for Alpaca / ShareGPT / OpenAI / preference data, and their errors for bad data."""
import json
import logging
import re

import pytest

from minitune.data.formats import DataError, load_examples
from minitune.data.preference import PreferenceExample, load_preferences


def write_jsonl(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)
                              for r in records) + "\n", encoding="utf-8")
    return path


def msg(role, content):
    return {"role": role, "content": content}


ALPACA = {"instruction": "Translate to English:", "input": "今天天气真好", "output": "The weather is nice today.",
          "system": "You are a translator.", "history": [["Hi", "Hello!"], ["Who are you?", "A translator."]]}


def test_alpaca_record_with_history_input_and_system_becomes_alternating_messages(tmp_path):
    loaded = load_examples(write_jsonl(tmp_path / "a.jsonl", [ALPACA, {"instruction": "Say hi", "output": "hi"}]))
    assert loaded.format == "alpaca" and len(loaded) == 2 and loaded.skipped == []
    assert loaded[0] == [
        msg("system", "You are a translator."),
        msg("user", "Hi"), msg("assistant", "Hello!"),
        msg("user", "Who are you?"), msg("assistant", "A translator."),
        {"role": "user", "content": "Translate to English:", "input": "今天天气真好"},
        msg("assistant", "The weather is nice today."),
    ]
    assert loaded[1] == [msg("user", "Say hi"), msg("assistant", "hi")]  # input is optional


def test_a_json_array_file_reads_like_jsonl(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([ALPACA, {"instruction": "Say hi", "output": "hi"}], indent=2, ensure_ascii=False))
    assert load_examples(path).examples == load_examples(write_jsonl(tmp_path / "a.jsonl", [
        ALPACA, {"instruction": "Say hi", "output": "hi"}])).examples


def test_sharegpt_speakers_map_to_roles(tmp_path):
    records = [
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                           {"from": "gpt", "value": "Hello"}, {"from": "human", "value": "Bye"},
                           {"from": "gpt", "value": "Bye!"}]},
        {"conversations": [{"from": "user", "value": "Q"}, {"from": "assistant", "value": "A"}],
         "system": "Top-level system"},
    ]
    loaded = load_examples(write_jsonl(tmp_path / "s.jsonl", records))
    assert loaded.format == "sharegpt"
    assert loaded[0] == [msg("system", "Be brief."), msg("user", "Hi"), msg("assistant", "Hello"),
                         msg("user", "Bye"), msg("assistant", "Bye!")]
    assert loaded[1] == [msg("system", "Top-level system"), msg("user", "Q"), msg("assistant", "A")]


def test_openai_messages_pass_through(tmp_path):
    messages = [msg("system", "S"), msg("user", "U"), msg("assistant", "A")]
    loaded = load_examples(write_jsonl(tmp_path / "o.jsonl", [{"messages": messages, "id": 7}]))
    assert loaded.format == "openai" and loaded.examples == [messages]


def test_preference_pairs_in_prompt_chosen_rejected_form(tmp_path):
    records = [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": [msg("user", "Hi"), msg("assistant", "Hello"), msg("user", "2+2?")],
         "chosen": [msg("user", "2+2?"), msg("assistant", "4")], "rejected": [msg("assistant", "5")],
         "system": "Be right."},
    ]
    loaded = load_preferences(write_jsonl(tmp_path / "p.jsonl", records))
    assert loaded[0] == PreferenceExample([msg("user", "2+2?")], "4", "5")
    assert loaded[1] == PreferenceExample(
        [msg("system", "Be right."), msg("user", "Hi"), msg("assistant", "Hello"), msg("user", "2+2?")], "4", "5")


def test_hh_rlhf_dialogues_split_into_shared_prompt_and_two_replies(tmp_path):
    prompt = "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?"
    record = {"chosen": prompt + "\n\nAssistant: 6.", "rejected": prompt + "\n\nAssistant: I won't say."}
    # The replies can share a start ("I ...") without it leaking into the prompt.
    record2 = {"chosen": "\n\nHuman: Hi\n\nAssistant: I am fine.", "rejected": "\n\nHuman: Hi\n\nAssistant: I am bad."}
    loaded = load_preferences(write_jsonl(tmp_path / "hh.jsonl", [record, record2]))
    assert loaded[0] == PreferenceExample(
        [msg("user", "What is 2+2?"), msg("assistant", "4."), msg("user", "And 3+3?")], "6.", "I won't say.")
    assert loaded[1] == PreferenceExample([msg("user", "Hi")], "I am fine.", "I am bad.")


GOOD = {"instruction": "Say hi", "input": "", "output": "hi"}


@pytest.mark.parametrize("bad_line, reason", [
    ('{"instruction": "Say hi", "output": ', "not valid JSON"),
    ({"instruction": "Say hi", "input": ""},
     "field 'output' missing (Alpaca format expects instruction, input, output)"),
    ({"instruction": "Say hi", "output": 3}, "field 'output' must be a string, got int"),
    ({"instruction": "Say hi", "output": "  "}, "message 1 (assistant) is empty"),
    ({"instruction": "Q", "output": "A", "history": [["only one"]]},
     "history item 0 is not a [user, assistant] pair of strings"),
    ('[1, 2]', "a record must be a JSON object, got list"),
])
def test_bad_alpaca_line_names_file_and_line(tmp_path, bad_line, reason):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, GOOD, bad_line, GOOD])
    with pytest.raises(DataError, match="^" + re.escape(f"{path} line 3: {reason}")):
        load_examples(path)


@pytest.mark.parametrize("bad_record, reason", [
    ({"conversations": []}, "empty conversation"),
    ({"conversations": [{"from": "gpt", "value": "Hi"}, {"from": "human", "value": "Hello"}]},
     "message 0: expected 'user' after the start, got 'assistant'"),
    ({"conversations": [{"from": "human", "value": "A"}, {"from": "human", "value": "B"},
                        {"from": "gpt", "value": "C"}]},
     "message 1: expected 'assistant' after user, got 'user'"),
    ({"conversations": [{"from": "human", "value": "A"}]},
     "conversation ends with a user message, so it has no reply to train on"),
    ({"conversations": [{"from": "bard", "value": "A"}]}, "conversation turn 0: unknown speaker 'bard'"),
    ({"conversations": [{"from": "human"}]}, "conversation turn 0 needs 'from' and 'value' (ShareGPT format)"),
    ({"messages": [{"role": "user", "content": "Q"}]}, "field 'conversations' missing"),
])
def test_bad_sharegpt_record_names_file_and_line(tmp_path, bad_record, reason):
    good = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [good, bad_record])
    with pytest.raises(DataError, match="^" + re.escape(f"{path} line 2: {reason}")):
        load_examples(path)


def test_bad_openai_record_reports_its_line(tmp_path):
    path = write_jsonl(tmp_path / "o.jsonl", [
        {"messages": [msg("user", "Q"), msg("assistant", "A")]}, "",
        {"messages": [msg("user", "Q"), msg("tool", "A")]}])
    with pytest.raises(DataError, match=re.escape(f"{path} line 3: message 1: unknown role 'tool'")):
        load_examples(path)


def test_bad_record_in_a_json_array_reports_the_line_it_starts_on(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c"},\n'
                    '  {"instruction": "e", "output": "f"}\n]\n')
    with pytest.raises(DataError, match=re.escape(f"{path} line 3: field 'output' missing")):
        load_examples(path)
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]')
    with pytest.raises(DataError, match=re.escape(f"{path} line 3: not valid JSON")):
        load_examples(path)


@pytest.mark.parametrize("bad_record, reason", [
    ({"prompt": "Q", "chosen": "A"}, "field 'rejected' missing (preference format expects prompt, chosen, rejected)"),
    ({"prompt": "Q", "chosen": "A", "rejected": ""}, "field 'rejected' is empty"),
    ({"prompt": [msg("user", "Q"), msg("assistant", "A")], "chosen": "B", "rejected": "C"},
     "the prompt must end with a user message"),
    ({"chosen": "\n\nHuman: Hi\n\nAssistant: A", "rejected": "totally different"},
     "chosen and rejected share no '\\n\\nAssistant:' prefix"),
    ({"chosen": "\n\nAssistant: A\n\nAssistant: B", "rejected": "\n\nAssistant: A\n\nAssistant: C"},
     "message 0: expected 'user' after the start, got 'assistant'"),
    ({"prompt": "Q", "chosen": "A", "rejected": "A"},
     "chosen and rejected are the same response, so the pair teaches nothing"),
])
def test_bad_preference_record_names_file_and_line(tmp_path, bad_record, reason):
    path = write_jsonl(tmp_path / "pref.jsonl", [{"prompt": "Q", "chosen": "A", "rejected": "B"}, bad_record])
    with pytest.raises(DataError, match="^" + re.escape(f"{path} line 2: {reason}")):
        load_preferences(path)


def test_skip_bad_keeps_the_good_records_and_counts_every_skipped_line(tmp_path, caplog):
    path = write_jsonl(tmp_path / "train.jsonl", [
        GOOD, "not json", {"instruction": "x"}, GOOD, {"instruction": "x", "output": ""}, GOOD])
    with caplog.at_level(logging.WARNING, logger="minitune.data.formats"):
        loaded = load_examples(path, skip_bad=True)
    assert len(loaded) == 3
    assert [line for line, _ in loaded.skipped] == [2, 3, 5]
    assert "field 'output' missing" in loaded.skipped[1][1]
    assert f"{path}: skipped 3 bad record(s) of 6 (first: line 2: not valid JSON" in caplog.text


def test_skip_bad_cannot_step_over_broken_json_that_hides_the_records_after_it(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"},\n'
                    '  {"instruction": "e", "output": "f"}\n]')
    with pytest.raises(DataError, match=re.escape(f"{path} line 3: not valid JSON")):
        load_examples(path, skip_bad=True)
    path.write_text(json.dumps({"data": [GOOD, GOOD]}, indent=2))
    with pytest.raises(DataError, match=re.escape(f"{path} line 1: the file is one JSON object; expected JSONL")):
        load_examples(path, skip_bad=True)


def test_a_file_with_nothing_usable_is_an_error_even_with_skip_bad(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", ["oops", "nope"])
    with pytest.raises(DataError, match=re.escape(f"{path}: no usable records (2 skipped)")):
        load_examples(path, skip_bad=True)


def test_format_is_fixed_by_the_first_record_so_a_stray_shape_is_reported(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [GOOD, {"messages": [msg("user", "Q"), msg("assistant", "A")]}])
    with pytest.raises(DataError, match=re.escape(f"{path} line 2: field 'instruction' missing")):
        load_examples(path)
    path = write_jsonl(tmp_path / "pref.jsonl", [{"prompt": "Q", "chosen": "A", "rejected": "B"}])
    with pytest.raises(DataError, match="line 1: this looks like preference data"):
        load_examples(path)
    path = write_jsonl(tmp_path / "what.jsonl", [{"text": "plain pretraining text"}])
    with pytest.raises(DataError, match=re.escape("line 1: cannot tell the data format from ['text']")):
        load_examples(path)
