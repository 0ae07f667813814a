"""nanopatho.rewards: hand cases for format / letters / yes-no / short answers, and a fuzz
that any string gives a number in range, fast.

    python -m pytest -q tests/test_rewards.py
"""

import random
import time

import pytest

from nanopatho.rewards import (accuracy_reward, extract_answer, format_reward, normalize_short, parse_choice,
                               parse_yesno, reward)


def wrap(answer, think="the nuclei are enlarged"):
    return f"<think>{think}</think><answer>{answer}</answer>"

# -----------------------------------------------------------------------------
# format and extraction


@pytest.mark.parametrize("text", [
    wrap("B"),
    "  \n<think>x</think>\n\n<answer> B </answer>\n ",
    "<think></think><answer>yes</answer>",                              # empty reasoning is allowed
])
def test_format_ok(text):
    assert format_reward(text) == 1.0


@pytest.mark.parametrize("text", [
    "",
    "B",
    "<answer>B</answer>",                                               # no think
    "<think>x</think>",                                                 # no answer
    "<answer>B</answer><think>x</think>",                               # wrong order
    "<think>x</think>so<answer>B</answer>",                             # text between blocks
    "hi <think>x</think><answer>B</answer>",                            # text before
    "<think>x</think><answer>B</answer> bye",                           # text after
    "<think>x</think><answer>B</answer><answer>C</answer>",             # two answers
    "<think><think>x</think></think><answer>B</answer>",                # nested think
    "<think>x<answer>A</answer></think><answer>B</answer>",             # answer inside think
    "<think>x</think><answer>B",                                        # unclosed
    "<think>x</think><answer>  </answer>",                              # blank answer
    "<THINK>x</THINK><ANSWER>B</ANSWER>",                               # tags are exact
])
def test_format_rejects(text):
    assert format_reward(text) == 0.0


def test_extract_answer():
    assert extract_answer(wrap(" B) Fibrosis ")) == "B) Fibrosis"
    assert extract_answer("<answer>A</answer> wait <answer>C</answer>") == "C"   # the final block
    assert extract_answer("<answer>A</answer><answer>C") is None                 # final block unclosed
    assert extract_answer("<answer><answer>B</answer></answer>") == "B"
    assert extract_answer("no tags") is None
    assert extract_answer("</answer>B<answer>") is None
    assert extract_answer("<answer></answer>") == ""

# -----------------------------------------------------------------------------
# parsing the three answer kinds


@pytest.mark.parametrize("answer,letter", [
    ("B", "B"), ("b", "B"), ("(B)", "B"), ("B.", "B"), ("B:", "B"), ("B)", "B"),
    ("B) Fibrosis", "B"), ("b. fibrosis", "B"), ("(c) necrosis", "C"), ("option B", "B"),
    ("Option b", "B"), ("the answer is B", "B"), ("Answer: (d)", "D"), ("answer: b.", "B"),
    ("Option B is correct", "B"), ("It is (B)", "B"), ("B) fibrosis (b)", "B"), ("  z  ", "Z"),
    # traps
    ("A cell with large nuclei", None),     # the article "A" is not option A
    ("I think so", None),                   # nor is the pronoun "I"
    ("the answer is a lesion", None),       # lower-case letter followed by a word
    ("B and C", None), ("A) x B) y", None), ("(A) or (B)", None),  # ambiguous
    ("\u212a", None), ("\u017f", None),     # Kelvin sign / long s fold to K / s under IGNORECASE
    ("\u00c5", None), ("1", None), ("", None), ("AB", None), ("fibrosis", None),
])
def test_parse_choice(answer, letter):
    assert parse_choice(answer) == letter


@pytest.mark.parametrize("answer,value", [
    ("yes", "yes"), ("No.", "no"), ("YES, it is malignant", "yes"), ("no evidence of invasion", "no"),
    ("Yes, no doubt", "yes"),               # the first whole word wins
    ("I know it is no tumour", "no"),       # "know" is not "no"
    ("I know", None), ("not normal", None), ("nothing", None), ("yesterday", None), ("nope", None),
    ("eyes", None), ("", None), ("noé", None),
])
def test_parse_yesno(answer, value):
    assert parse_yesno(answer) == value


def test_normalize_short():
    assert normalize_short("The  Nucleus!") == "nucleus"
    assert normalize_short("an «apple», a pear") == "apple pear"
    assert normalize_short("Squamous-cell carcinoma.") == "squamous cell carcinoma"
    assert normalize_short("theory") == "theory"                       # articles are whole words only

# -----------------------------------------------------------------------------
# accuracy and the combined reward


def test_accuracy_reward_hand_cases():
    assert accuracy_reward(wrap("B) Fibrosis"), "B", "mcq") == 1.0
    assert accuracy_reward(wrap("(b)"), "B) Fibrosis", "mcq") == 1.0   # gold parsed the same way
    assert accuracy_reward(wrap("C"), "B", "mcq") == 0.0
    assert accuracy_reward(wrap("B or C"), "B", "mcq") == 0.0
    assert accuracy_reward(wrap("No, it is benign"), "no", "yesno") == 1.0
    assert accuracy_reward(wrap("I know"), "no", "yesno") == 0.0
    assert accuracy_reward(wrap("The Mitotic figure."), "mitotic figure", "short") == 1.0
    assert accuracy_reward(wrap("mitotic figures"), "mitotic figure", "short") == 0.0
    assert accuracy_reward(wrap("!!!"), "...", "short") == 0.0          # empty never matches empty
    assert accuracy_reward("B", "B", "mcq") == 0.0                      # no answer block
    assert accuracy_reward("<answer>B</answer>", "B", "mcq") == 1.0     # accuracy ignores the format
    with pytest.raises(ValueError):
        accuracy_reward(wrap("B"), "B", "multiple-choice")


def test_reward_weights():
    assert reward(wrap("B"), "B", "mcq") == pytest.approx(1.0)
    assert reward(wrap("C"), "B", "mcq") == pytest.approx(0.1)
    assert reward("<answer>B</answer>", "B", "mcq") == pytest.approx(0.9)
    assert reward("B", "B", "mcq") == 0.0
    assert reward(wrap("B"), "B", "mcq", w_format=0.5, w_acc=2.0) == pytest.approx(2.5)

# -----------------------------------------------------------------------------
# fuzz: never raises, always in range, always fast

PIECES = ["<think>", "</think>", "<answer>", "</answer>", "<answer", "answer>", "<", ">", "/", " ", "\n",
          "A", "b", "(", ")", ".", "option ", "yes", "no", "know", "the ", "é", "\u212a", "\u017f", "🔬",
          "\u0000", "\ud800", "\u202e", "Ω", "\t", "B) ", "(((", ")))", "answer is "]


def random_text(rng):
    if rng.random() < 0.5:
        return "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 40)))
    return "".join(chr(rng.randint(0, 0x2FFFF)) for _ in range(rng.randint(0, 60)))


def test_fuzz_thousands_of_strings():
    rng = random.Random(0)
    seen = set()
    start = time.perf_counter()
    for i in range(3000):
        text = random_text(rng) if i % 2 else wrap(random_text(rng), random_text(rng))
        gold = rng.choice(["B", "yes", "no", "mitotic figure", random_text(rng)])
        for kind in ("mcq", "yesno", "short"):
            r = reward(text, gold, kind)
            assert isinstance(r, float) and 0.0 <= r <= 1.0
            seen.add(round(r, 6))
    assert time.perf_counter() - start < 10
    assert {0.0, 0.1, 0.9, 1.0} <= seen                                 # every branch was reached


ADVERSARIAL = {   # built lazily, named so test ids stay short
    "1MB_think": lambda: "<think>" + "x" * 1_000_000 + "</think><answer>B</answer>",
    "200k_open_answer": lambda: "<answer>" * 200_000,
    "1MB_parens_in_answer": lambda: "<think></think><answer>" + "(" * 1_000_000 + "</answer>",
    "150k_option_words": lambda: "<think></think><answer>" + "option " * 150_000 + "B</answer>",
    "250k_yes_words": lambda: "<think></think><answer>" + "yes " * 250_000 + "</answer>",
    "100k_close_tags": lambda: "<answer>" + "a" * 999 + "</answer>" + "</answer>" * 100_000,
    "nested_answers_in_think": lambda: ("<think>" + "<answer>" * 50_000 + "</think>") * 3,
    "1M_lone_surrogates": lambda: "\ud800" * 1_000_000,
    "emoji_letters": lambda: "<think>x</think><answer>" + "🔬 b) " * 200 + "</answer>",
}


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_adversarial_huge_inputs_fast(name):
    text = ADVERSARIAL[name]()
    start = time.perf_counter()
    for kind in ("mcq", "yesno", "short"):
        r = reward(text, "B", kind)
        assert 0.0 <= r <= 1.0
    assert time.perf_counter() - start < 1.0


def test_long_correct_reasoning_still_scores():
    # a 1 MB chain of thought with a short correct answer is fine: only the answer block is parsed
    assert reward("<think>" + "x" * 1_000_000 + "</think><answer>B</answer>", "B", "mcq") == pytest.approx(1.0)
