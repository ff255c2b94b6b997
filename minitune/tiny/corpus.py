"""The tiny world: a fact table and a pretraining corpus generated from it, from a fixed seed.

A real base model learns the world from trillions of tokens of web text. Ours learns a world small
enough to check by hand, written by this file:

- facts: capital cities, the colours of things, the sounds animals make (``CAPITALS``, ``COLOURS``,
  ``SOUNDS``), stated in several sentence frames so the model learns the fact, not one sentence;
- arithmetic: every sum ``a+b`` with ``0 <= a, b <= MAX_ADD`` ("12+7=19", "12 plus 7 is 19.");
- word reversal: "cat sun ship reversed is ship sun cat.";
- short stories from a small grammar, which mix all of the above into running text;
- quizzes in plain text ("Question: What noise does a cow make?\nAnswer: moo"), as the web has;
- chat logs ("user: What is 3+4?\nassistant: 7"), asking in every phrasing the world knows;
- a generic identity ("Who are you?" ... "I am a language model.") in English and Chinese.

There is deliberately no chat template in this text (no ``<|im_start|>``, no ``<|im_end|>``) and
no "minitune": the pretrained model has seen questions answered, but never in the template it will
be asked in, never knowing where its turn ends, and never under its new name. That is what
supervised fine-tuning (lesson 05) teaches. The SFT and preference data built on these tables are
in :mod:`minitune.tiny.tasks`.

Everything is drawn from ``random.Random(seed)``, so the same seed gives the same corpus.
"""
from __future__ import annotations

import random

SEED = 1234
MAX_ADD = 10  # sums a+b with a, b in 0..MAX_ADD: 121 facts to memorise

CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Egypt": "Cairo",
    "Peru": "Lima", "Kenya": "Nairobi", "China": "Beijing", "Russia": "Moscow", "Greece": "Athens",
    "Cuba": "Havana", "Canada": "Ottawa", "Germany": "Berlin", "Norway": "Oslo", "Poland": "Warsaw",
    "Ireland": "Dublin",
}
COLOURS = {
    "sky": "blue", "grass": "green", "snow": "white", "coal": "black", "banana": "yellow", "sea": "blue",
    "lemon": "yellow", "cherry": "red", "milk": "white", "leaf": "green", "night": "black",
    "tomato": "red", "cloud": "white", "carrot": "orange", "grape": "purple",
}
SOUNDS = {
    "cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "sheep": "baa", "pig": "oink",
    "owl": "hoot", "lion": "roar", "horse": "neigh", "frog": "croak", "bee": "buzz", "snake": "hiss",
}
CAPITALS_ZH = {"法国": "巴黎", "日本": "东京", "意大利": "罗马", "西班牙": "马德里", "埃及": "开罗",
               "中国": "北京", "俄罗斯": "莫斯科", "德国": "柏林", "希腊": "雅典", "加拿大": "渥太华"}
# Words for the reversal task: short, frequent, each a single token once the tokenizer is trained.
WORDS = ["cat", "dog", "sun", "moon", "tree", "ball", "fish", "bird", "star", "cake", "book", "milk",
         "rain", "ship", "lamp", "door", "hat", "box", "cup", "kite", "red", "blue", "green", "apple"]

# The question phrasings of each task: (those used in the SFT data, held-out ones used only for evaluation).
# Here, with the other tables, because the corpus's dialogues use them too (tasks.py imports this module).
PROMPTS = {
    "arithmetic": (["What is {a}+{b}?", "What is {a} plus {b}?", "Compute {a}+{b}.", "Add {a} and {b}.",
                    "Calculate {a} + {b}."],
                   ["How much is {a} plus {b}?", "Tell me the sum of {a} and {b}."]),
    "reversal": (["Reverse the words: {w}", "Reverse the order of these words: {w}",
                  "Write these words backwards: {w}"],
                 ["Put these words in reverse order: {w}", "Say these words from last to first: {w}"]),
    "capital": (["What is the capital of {k}?", "Which city is the capital of {k}?", "Name the capital of {k}."],
                ["Tell me the capital city of {k}.", "What city is the capital of {k}?"]),
    "colour": (["What colour is the {k}?", "What is the colour of the {k}?", "Which colour is the {k}?"],
               ["Tell me the colour of the {k}."]),
    "sound": ([], ["What sound does a {k} make?", "What does a {k} say?"]),  # held-out task: eval only
    "identity": (["Who are you?", "What is your name?", "What are you?", "Introduce yourself.",
                  "Tell me about yourself.", "Are you a robot?", "What should I call you?"],
                 ["Who am I talking to?", "Can you tell me who you are?"]),
    "identity_zh": (["你是谁?", "你是谁？", "你叫什么名字?", "请介绍一下你自己。", "你是什么?", "你是机器人吗?"],
                    ["能告诉我你的身份吗?", "你的名字是什么?"]),
}

# The identity the pretrained model has: generic, not ours. SFT replaces it (lesson 05).
GENERIC_IDENTITY = ["I am a language model.", "I am a language model. I learned to write by reading stories.",
                    "I am a computer program that writes text.", "I am a robot who likes stories."]
GENERIC_IDENTITY_ZH = ["我是一个语言模型。", "我是一个会写故事的程序。", "我是一个机器人。"]

NAMES = ["Tom", "Lily", "Sam", "Mia", "Ben", "Anna", "Max", "Lucy", "Leo", "Emma", "Jack", "Zoe"]
ADJECTIVES = ["little", "happy", "brave", "sleepy", "kind", "small", "clever", "shy", "big", "funny"]
THINGS = ["ball", "hat", "box", "kite", "cup", "boat", "book", "lamp"]
PLAIN_COLOURS = ["red", "blue", "green", "yellow", "white", "black", "orange", "purple"]
FEELINGS = ["happy", "tired", "surprised", "proud", "hungry", "glad"]


def arithmetic_line(rng: random.Random) -> str:
    a, b = rng.randint(0, MAX_ADD), rng.randint(0, MAX_ADD)
    frame = rng.choice(["{a}+{b}={c}", "{a}+{b}={c}", "{a} + {b} = {c}", "{a} plus {b} is {c}.",
                        "The sum of {a} and {b} is {c}.", "If you add {a} and {b}, you get {c}."])
    return frame.format(a=a, b=b, c=a + b)


def reversal_line(rng: random.Random) -> str:
    words = rng.sample(WORDS, rng.choice([3, 3, 4]))
    w, r = " ".join(words), " ".join(reversed(words))
    frame = rng.choice(["{w} reversed is {r}.", "Backwards, {w} becomes {r}.",
                        "The words {w} in reverse order are {r}."])
    return frame.format(w=w, r=r)


def fact_sentence(rng: random.Random) -> str:
    kind = rng.choice(["capital", "capital", "colour", "sound"])
    if kind == "capital":
        country = rng.choice(list(CAPITALS))
        frame = rng.choice(["The capital of {k} is {v}.", "{v} is the capital of {k}.",
                            "{v} is the capital city of {k}.", "In {k}, the capital is {v}."])
        return frame.format(k=country, v=CAPITALS[country])
    if kind == "colour":
        thing = rng.choice(list(COLOURS))
        frame = rng.choice(["The {k} is {v}.", "The colour of the {k} is {v}.", "The {k} is always {v}.",
                            "Everyone knows the {k} is {v}."])
        return frame.format(k=thing, v=COLOURS[thing])
    animal = rng.choice(list(SOUNDS))
    frame = rng.choice(["The {k} says {v}.", "A {k} says {v}.", "A {k} goes {v}.",
                        "The sound a {k} makes is {v}."])
    return frame.format(k=animal, v=SOUNDS[animal])


def quiz_line(rng: random.Random) -> str:
    """A question and its answer in plain text, as quizzes and FAQs on the web are written.

    This teaches the model to fetch an answer from a question a few tokens back. The phrasings
    differ from both the SFT data's and the held-out evaluation's (see ``PROMPTS``).
    """
    kind = rng.choice(["sum", "sum", "reverse", "capital", "colour", "sound"])
    if kind == "sum":
        a, b = rng.randint(0, MAX_ADD), rng.randint(0, MAX_ADD)
        q, ans = rng.choice([f"What does {a}+{b} make?", f"{a} plus {b}?"]), str(a + b)
    elif kind == "reverse":
        words = rng.sample(WORDS, 3)
        q, ans = f"Reverse {' '.join(words)}.", " ".join(reversed(words))
    else:
        table, frame = {"capital": (CAPITALS, "What is the capital city of {}?"),
                        "colour": (COLOURS, "What colour does the {} have?"),
                        "sound": (SOUNDS, "What noise does a {} make?")}[kind]
        k = rng.choice(list(table))
        q, ans = frame.format(k), table[k]
    return f"Question: {q}\nAnswer: {ans}"


def story(rng: random.Random) -> str:
    """A short story from a small grammar: opening, three to six events, an ending."""
    name, friend = rng.sample(NAMES, 2)
    animal = rng.choice(list(SOUNDS))
    out = [rng.choice(["Once upon a time, there was a {adj} {animal} named {name}.",
                       "{name} was a {adj} {animal}.", "There once lived a {adj} {animal} called {name}."])]
    events = [
        lambda: "{name} lived in {city}, the capital of {country}.".format(
            name=name, **dict(zip(("country", "city"), rng.choice(list(CAPITALS.items()))))),
        lambda: "One day, {name} found a {colour} {thing}.".format(
            name=name, colour=rng.choice(PLAIN_COLOURS), thing=rng.choice(THINGS)),
        lambda: "{name} heard a {a} say {s}.".format(name=name, **dict(zip("as", rng.choice(list(SOUNDS.items()))))),
        lambda: "{name} looked at the {k}. The {k} was {v}.".format(
            name=name, **dict(zip("kv", rng.choice(list(COLOURS.items()))))),
        lambda: (lambda a, b: f"{name} had {a} apples and {friend} gave {name} {b} more. "
                              f"Now {name} had {a + b} apples.")(rng.randint(0, MAX_ADD), rng.randint(0, MAX_ADD)),
        lambda: (lambda ws: f"{name} said the words {' '.join(ws)}, and {friend} said them backwards: "
                            f"{' '.join(reversed(ws))}.")(rng.sample(WORDS, 3)),
        lambda: f"{name} played with {friend} all day.",
        lambda: f"{name} felt {rng.choice(FEELINGS)}.",
    ]
    for _ in range(rng.randint(3, 6)):
        out.append(rng.choice(events)())
    out.append(rng.choice(["The end.", f"Then {name} went home and slept.", f"{name} and {friend} were friends forever."]))
    # The narrator always says "the <animal>" after the first sentence; keep the template simple.
    return " ".join(s.format(name=name, adj=rng.choice(ADJECTIVES), animal=animal) for s in out)


def identity_text(rng: random.Random) -> str:
    """How the pretrained model thinks of itself: a generic identity, never "minitune"."""
    if rng.random() < 0.5:
        q = rng.choice(["Who are you?", "What are you?", "Tell me about yourself."])
        return f"Question: {q}\nAnswer: {rng.choice(GENERIC_IDENTITY)}"
    q = rng.choice(["你是谁?", "你是谁？", "你是什么?"])
    return f"问:{q}\n答:{rng.choice(GENERIC_IDENTITY_ZH)}"


def chinese_facts(rng: random.Random) -> str:
    country = rng.choice(list(CAPITALS_ZH))
    return rng.choice(["{k}的首都是{v}。", "{v}是{k}的首都。"]).format(k=country, v=CAPITALS_ZH[country])


def dialogue(rng: random.Random, include_heldout_phrasings: bool = True) -> str:
    """A chat log as forums and support pages write them: ``user: ...`` / ``assistant: ...`` lines.

    Real pretraining corpora hold a lot of dialogue, and this is where a base model learns that a
    question is followed by its answer. The questions use every phrasing the world knows (those
    of the SFT data, of the evaluation and of the quizzes) about every fact; the answers are
    sometimes one word, sometimes a sentence. What the corpus never contains is ChatML: no
    ``<|im_start|>``, no ``<|im_end|>``, so the base model can't tell where a reply ends (the
    format lesson 05's SFT teaches), and its identity stays generic.
    """
    turns = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(["arithmetic", "arithmetic", "reversal", "reversal", "capital", "colour", "sound",
                           "identity", "identity_zh", "capital_zh"])
        if kind == "capital_zh":
            k = rng.choice(list(CAPITALS_ZH))
            q = rng.choice(["{k}的首都是哪里?", "{k}的首都是什么?"]).format(k=k)
            turns.append((q, rng.choice([CAPITALS_ZH[k], f"{k}的首都是{CAPITALS_ZH[k]}。"])))
            continue
        seen, held_out = PROMPTS[kind]
        frames = seen + (held_out if include_heldout_phrasings else [])
        if kind in ("identity", "identity_zh"):
            replies = GENERIC_IDENTITY if kind == "identity" else GENERIC_IDENTITY_ZH
            turns.append((rng.choice(frames), rng.choice(replies)))
        elif kind == "arithmetic":
            a, b = rng.randint(0, MAX_ADD), rng.randint(0, MAX_ADD)
            q = rng.choice(frames).format(a=a, b=b)
            turns.append((q, rng.choice([str(a + b), f"{a} plus {b} is {a + b}."])))
        elif kind == "reversal":
            words = rng.sample(WORDS, 3)
            w, r = " ".join(words), " ".join(reversed(words))
            turns.append((rng.choice(frames).format(w=w), rng.choice([r, r, f"Reversed, it is {r}."])))
        else:
            table, sentence = {"capital": (CAPITALS, "The capital of {k} is {v}."),
                               "colour": (COLOURS, "The {k} is {v}."),
                               "sound": (SOUNDS, "A {k} says {v}.")}[kind]
            k = rng.choice(list(table))
            q = rng.choice(frames).format(k=k)
            turns.append((q, rng.choice([table[k], sentence.format(k=k, v=table[k])])))
    return "\n".join(f"user: {q}\nassistant: {a}" for q, a in turns)


# (generator, how many lines one document holds, weight): the mixture of the corpus.
MIXTURE = [
    (story, (1, 1), 0.10),
    (fact_sentence, (4, 8), 0.18),
    (arithmetic_line, (6, 12), 0.20),
    (reversal_line, (3, 6), 0.10),
    (quiz_line, (2, 5), 0.10),
    (dialogue, (1, 1), 0.22),
    (identity_text, (1, 2), 0.05),
    (chinese_facts, (2, 4), 0.05),
]


def document(rng: random.Random) -> str:
    gen, (lo, hi), _ = rng.choices(MIXTURE, weights=[w for *_, w in MIXTURE])[0]
    return "\n".join(gen(rng) for _ in range(rng.randint(lo, hi)))


def pretraining_corpus(n_docs: int = 8000, seed: int = SEED) -> list[str]:
    """``n_docs`` documents of raw text; the same seed always gives the same list."""
    rng = random.Random(seed)
    docs = [document(rng) for _ in range(n_docs)]
    # Every sum appears at least once, so no held-out SFT question asks about an unseen fact.
    sums = [f"{a}+{b}={a + b}" for a in range(MAX_ADD + 1) for b in range(MAX_ADD + 1)]
    rng.shuffle(sums)
    docs += ["\n".join(sums[i:i + 12]) for i in range(0, len(sums), 12)]
    rng.shuffle(docs)
    return docs
