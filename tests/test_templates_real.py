"""Templates by LLaMA-Factory's names render what the real models' own jinja chat templates render.

Oracle: transformers' `apply_chat_template(tokenize=False)` running the `chat_template` (with the
`bos_token` / `eos_token`) of the real tokenizer_config.json files in ../shared/real (its README says
where each file comes from), on a tiny byte-level tokenizer built here (test_templates._hf_tokenizer).
Those tests skip when the folder is absent (a user's clone does not have it).

Where no real template is at hand (`default`, `empty`, `mistral`, DeepSeek-V3's own), the expected
text is the layout LLaMA-Factory's `register_template` defines for that name (its
src/llamafactory/data/template.py), written out in the test.
"""
import json
from dataclasses import replace
from pathlib import Path

import pytest
from test_templates import A1, A2, CONVERSATIONS, SYS, U1, U2, _hf_tokenizer

from minitune.data.templates import EOS, get_template, render, render_segments

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "real"
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason=f"{REAL} is absent: the real tokenizer_config.json "
                                                          "files are not part of a clone (see its README)")

# our template name -> the real file whose chat_template it must reproduce
REAL_FILES = {
    "qwen": "qwen2.5-instruct/tokenizer_config.json",
    "qwen3": "qwen3/tokenizer_config.json",
    "llama3": "llama3-instruct/tokenizer_config.json",
    "chatglm3": "chat-templates/chatglm3.tokenizer_config.json",
    "deepseek3": "chat-templates/deepseek.tokenizer_config.json",
}

THINK_A1 = {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n4"}
THINK_A2 = {"role": "assistant", "content": "<think>\n3 and 3 make 6.\n\n</think>\n\n\n6."}
THINKING_CONVERSATIONS = {
    "earlier thinking dropped, last kept": [U1, THINK_A1, U2, THINK_A2],
    "system + thinking in every turn": [SYS, U1, THINK_A1, U2, THINK_A2],
    "thinking only in an earlier turn": [U1, THINK_A1, U2, A2],
    "thinking, then a new question": [U1, THINK_A1, U2],
    "thinking as reasoning_content": [U1, A1, U2, {"role": "assistant", "content": "6.", "reasoning_content": "Add."}],
}


def _token(value):
    return value.get("content") if isinstance(value, dict) else value  # AddedToken dicts in older files


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """name -> an HF tokenizer carrying that real file's chat template and special tokens."""
    cache = {}

    def get(name):
        if name not in cache:
            config = json.loads((REAL / REAL_FILES[name]).read_text(encoding="utf-8"))
            jinja = config["chat_template"]
            folder = tmp_path_factory.mktemp(name)
            cache[name] = _hf_tokenizer(folder, jinja, _token(config.get("bos_token")), _token(config.get("eos_token")))
        return cache[name]
    return get


def _check(hf, name, conversations, gens=(False, True), template=None, **kwargs):
    template = template or get_template(name)
    checked = 0
    for label, messages in conversations.items():
        for gen in gens:
            want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, **kwargs)
            assert template.render(messages, add_generation_prompt=gen) == want, f"{name} / {label} / gen={gen}"
            checked += 1
    return checked


@needs_real
@pytest.mark.parametrize("name", ["qwen", "qwen3", "llama3", "chatglm3"])
def test_rendering_equals_the_real_tokenizer_configs_chat_template(real, name):
    assert _check(real(name), name, CONVERSATIONS) == 2 * len(CONVERSATIONS)


@needs_real
def test_qwen3_keeps_only_the_last_replys_thinking_as_its_jinja_does(real):
    assert _check(real("qwen3"), "qwen3", THINKING_CONVERSATIONS) == 2 * len(THINKING_CONVERSATIONS)
    # the last reply always gets a block, an empty one when it has no thinking
    assert render("qwen3", [U1, A1]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n4<|im_end|>\n")


@needs_real
def test_qwen3_enable_thinking_off_ends_the_generation_prompt_with_an_empty_block(real):
    off = replace(get_template("qwen3"), enable_thinking=False)
    _check(real("qwen3"), "qwen3", CONVERSATIONS, template=off, enable_thinking=False)
    assert off.render([U1], add_generation_prompt=True).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # training without thinking: the data's thinking is dropped and the empty block is context, not learnt
    segs = off.segments([U1, THINK_A1, U2, THINK_A2])
    assert [t for t, trainable in segs if trainable] == ["4<|im_end|>", "6.<|im_end|>"]
    assert segs[-3] == ("\n<|im_start|>user\n  And 3+3? {braces} stay  <|im_end|>\n<|im_start|>assistant\n"
                        "<think>\n\n</think>\n\n", False)
    # with thinking on, the last reply's block (thinking included) is what the model learns to write
    on = render_segments("qwen3", [U1, THINK_A1, U2, THINK_A2])
    assert [t for t, trainable in on if trainable] == ["4<|im_end|>", "<think>\n3 and 3 make 6.\n</think>\n\n6.<|im_end|>"]


@needs_real
def test_qwen3_nothink_is_qwen3s_chatml_without_think_blocks(real):
    # Equal to Qwen3's jinja wherever that writes no block (the conversation ends with a question) ...
    questions = {k: v for k, v in CONVERSATIONS.items() if v[-1]["role"] == "user"}
    assert _check(real("qwen3"), "qwen3_nothink", questions) == 2 * len(questions)
    # ... and to Qwen2.5's wherever a system prompt is given (Qwen2.5 only adds its default one).
    with_system = {k: v for k, v in CONVERSATIONS.items() if v[0]["role"] == "system"}
    assert _check(real("qwen"), "qwen3_nothink", with_system) == 2 * len(with_system)
    # no reasoning layout (as LLaMA-Factory's): no block is added, a reply is written as it is
    assert render("qwen3_nothink", [U1, A1]).endswith("<|im_start|>assistant\n4<|im_end|>\n")
    assert render("qwen3_nothink", [U1]).startswith("<|im_start|>user")  # no default system prompt


@needs_real
def test_deepseek3_equals_deepseeks_template_but_opens_no_think_block(real):
    # The DeepSeek file here is DeepSeek-R1's template: the same layout as V3's, except that its
    # generation prompt opens a reasoning block ("<｜Assistant｜><think>\n"); V3's (deepseek3) does not.
    hf = real("deepseek3")
    _check(hf, "deepseek3", CONVERSATIONS, gens=(False,))
    for label, messages in CONVERSATIONS.items():
        want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render("deepseek3", messages, add_generation_prompt=True) + "<think>\n" == want, label


# ----------------------------------------------------------------------------- no real jinja here


def test_qwen3_layout_written_out_for_clones_without_the_real_files():
    # what Qwen3's jinja gives (checked above where ../shared/real exists): earlier thinking gone, last kept
    assert render("qwen3", [U1, THINK_A1, U2, THINK_A2]) == (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\n  And 3+3? {braces} stay  <|im_end|>\n"
        "<|im_start|>assistant\n<think>\n3 and 3 make 6.\n</think>\n\n6.<|im_end|>\n")
    off = replace(get_template("qwen3"), enable_thinking=False)
    assert off.render([U1], add_generation_prompt=True) == \
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


U = {"role": "user", "content": "Hi"}
A = {"role": "assistant", "content": "Hello!"}
S = {"role": "system", "content": "Be brief."}
Q = {"role": "user", "content": "Bye"}


def test_default_template_is_llamafactorys_human_assistant_layout_with_eos():
    # LLaMA-Factory template "default": user "Human: {{content}}" eos "\nAssistant:", assistant "{{content}}" eos "\n",
    # system "System: {{content}}" eos "\n", no prefix.
    text = get_template("default").render([S, U, A, Q], add_generation_prompt=True, eos_text="</s>")
    assert text == "System: Be brief.</s>\nHuman: Hi</s>\nAssistant:Hello!</s>\nHuman: Bye</s>\nAssistant:"
    trained = [t for t, trainable in render_segments("default", [U, A]) if trainable]
    assert trained == ["Hello!" + EOS]


def test_empty_template_writes_the_texts_back_to_back():
    # LLaMA-Factory template "empty": every slot is "{{content}}" (no EOS: format_assistant is given).
    assert render("empty", [S, U, A, Q], add_generation_prompt=True) == "Be brief.HiHello!Bye"
    assert [t for t, trainable in render_segments("empty", [U, A]) if trainable] == ["Hello!"]


def test_mistral_template_is_llamafactorys_layout():
    # LLaMA-Factory template "mistral" (Llama2Template: the system prompt joins the FIRST user turn):
    # prefix bos, user "[INST] {{content}}[/INST]", assistant " {{content}}" eos, system "{{content}}\n\n".
    t = get_template("mistral")
    assert t.render([S, U, A, Q], add_generation_prompt=True) == \
        "<s>[INST] Be brief.\n\nHi[/INST] Hello!</s>[INST] Bye[/INST]"
    assert t.render([U, A]) == "<s>[INST] Hi[/INST] Hello!</s>"
    assert [x for x, trainable in t.segments([U, A, Q, A]) if trainable] == [" Hello!" + EOS] * 2


def test_deepseek3_template_is_llamafactorys_layout():
    # LLaMA-Factory template "deepseek3": prefix bos, user "<｜User｜>{{content}}<｜Assistant｜>",
    # assistant "{{content}}" eos, system "{{content}}".
    assert render("deepseek3", [S, U, A, Q], add_generation_prompt=True) == (
        "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜>Hello!<｜end▁of▁sentence｜><｜User｜>Bye<｜Assistant｜>")


def test_chatglm3_layout_and_what_it_trains():
    # ChatGLM3's jinja (checked above against the real file) writes a space after each role line's "\n".
    text = render("chatglm3", [S, U, A, Q], add_generation_prompt=True)
    assert text == "[gMASK]sop<|system|>\n Be brief.<|user|>\n Hi<|assistant|>\n Hello!<|user|>\n Bye<|assistant|>"
    assert [t for t, trainable in render_segments("chatglm3", [U, A]) if trainable] == ["\n Hello!" + EOS]


def test_llamafactory_template_names_are_all_known():
    for name in ("default", "empty", "alpaca", "chatml", "qwen", "qwen3", "qwen3_nothink", "llama2", "llama3",
                 "mistral", "chatglm3", "deepseek3"):
        assert get_template(name).name == name
