"""Stage 0's reading curriculum (data/synthpath/reading.py) and the base-LM trainer's pieces
(nanopatho/base_lm.py): every row's answer is right by construction, the probe's names are never
trained on, the levels have the layout they promise, and the curriculum sampler is a pure function.

    python -m pytest -q tests/test_reading.py
"""

import re

import numpy as np
import pytest

from data.synthpath import reading as R
from nanopatho import base_lm
from nanopatho.prompts import SYSTEM_PROMPT

OPTION = re.compile(r"^([A-D])\) (.+)$", re.MULTILINE)
REPLY = re.compile(r"^<think>(.*)</think><answer>(.*)</answer>$", re.S)


def turns(row):
    """[(user text, think, answer)] of a chat-layout conversation (level 1 or 2)."""
    msgs = [m for m in row["messages"] if m["role"] != "system"]
    out = []
    for user, assistant in zip(msgs[::2], msgs[1::2]):
        assert user["role"] == "user" and assistant["role"] == "assistant"
        think, answer = REPLY.match(assistant["content"]).groups()
        out.append((user["content"], think, answer))
    return out


def test_same_seed_same_rows_other_seed_differs():
    a = R.reading_rows(np.random.default_rng(0), 50, 2)
    assert a == R.reading_rows(np.random.default_rng(0), 50, 2)
    assert a != R.reading_rows(np.random.default_rng(1), 50, 2)


@pytest.mark.parametrize("level", R.LEVELS)
def test_level_layout(level):
    for row in R.reading_rows(np.random.default_rng(level), 40, level):
        has_system = row["messages"][0]["role"] == "system"
        assert has_system == (level >= 1)
        if has_system:
            assert row["messages"][0]["content"] == SYSTEM_PROMPT
        first_user = next(m["content"] for m in row["messages"] if m["role"] == "user")
        first_line = first_user.split("\n")[0]
        has_filler = not first_line.startswith(("Finding:", "What does", "Repeat", "Which", "Options:"))
        assert has_filler == (level == 2), first_user


def walk_of(options, finding):
    """The option walk a reply must end on: each option line up to the finding's, checked, then its letter."""
    lines = []
    for letter in sorted(options):
        lines.append(f"{letter}) {options[letter]}: {'yes' if options[letter] == finding else 'no'}.")
        if options[letter] == finding:
            return "Checking the options:\n" + "\n".join(lines) + f"\nSo the answer is {letter}."
    raise AssertionError(f"{finding!r} is not an option")


def test_option_rows_answer_the_finding_letter():
    """Property: in every 'option' turn, the answer letter is the option whose text is the finding,
    reached by walking the options in order and stopping at the match."""
    rng = np.random.default_rng(3)
    n = 0
    for _ in range(200):
        row = R.reading_row(rng, "option", 1)
        options = None
        for user, think, answer in turns(row):
            options = dict((name, letter) for letter, name in OPTION.findall(user)) or options
            finding = re.search(r"Finding: (.+)\.\n", user).group(1)
            assert options[finding] == answer
            assert think.endswith(" " + walk_of({v: k for k, v in options.items()}, finding))
            n += 1
    assert n > 200  # several questions per context


def test_near_rows_walk_options_that_share_a_word():
    """Property: a near-miss list's names share one word and differ in the other; the answer is the
    option the finding names, itself or restated as "<shared> is <own>"; the rest of the rows is the
    usual mix, at the row's chat level."""
    rows = R.near_rows(np.random.default_rng(8), 300, 2)
    near = [r for r in rows if r["skill"] == "near"]
    assert 0.4 < len(near) / len(rows) < 0.6 and {r["skill"] for r in rows} - {"near"} <= set(R.SKILLS)
    assert all(r["level"] == 2 for r in rows)
    restated = 0
    for row in near:
        options = None
        for user, think, answer in turns(row):
            options = {letter: name for letter, name in OPTION.findall(user)} or options
            words = [name.split() for name in options.values()]
            shared = set(words[0]).intersection(*words[1:])
            assert len(shared) == 1 and len({w for ws in words for w in ws}) == 5  # one shared word, 4 own ones
            finding = re.search(r"Finding: (.+)\.\n", user).group(1)
            if " is " in finding:
                word, own = finding.split(" is ")
                assert {word} == shared and own in options[answer].split()
                restated += 1
            else:
                assert options[answer] == finding
            assert think == f"The finding is {finding}. " + walk_of(options, options[answer])
    assert restated > 50


def test_near_probe_walks_new_names_that_share_a_word():
    """The probe's near-miss walks: the four options share one word at one place and are all names whose two
    words stand side by side in no training text; one question each, at the longest level; the gold walk
    stops at the option the finding names. Same seed, same rows."""
    train = [m["content"] for level in R.LEVELS for row in R.reading_rows(np.random.default_rng(6), 300, level)
             for m in row["messages"]]
    unseen = set(R.unseen_pairs(train))
    rows = R.near_probe_rows(np.random.default_rng(9), 60, train)
    assert rows == R.near_probe_rows(np.random.default_rng(9), 60, train)
    shared_words = set()
    for row in rows:
        assert row["skill"] == "near" and row["level"] == 2
        (user, think, answer), = turns(row)
        options = {letter: name for letter, name in OPTION.findall(user)}
        assert len(options) == 4 and set(options.values()) <= unseen
        places = [{i for i, w in enumerate(name.split()) if all(w == o.split()[i] for o in options.values())}
                  for name in options.values()]
        assert all(p == places[0] and len(p) == 1 for p in places)  # the same word at the same place in all four
        finding = re.search(r"Finding: (.+)\.\n", user).group(1)
        assert finding == options[answer] or finding.split(" is ")[1] in options[answer].split()
        assert think.endswith(walk_of(options, options[answer]))
        shared_words.add(options["A"].split()[places[0].pop()])
    assert len(shared_words) > 20  # the shared word changes from item to item


def test_read_and_same_rows_are_right():
    rng = np.random.default_rng(4)
    yes = no = 0
    for _ in range(200):
        row = R.reading_row(rng, "read", 1)
        options = None
        for user, _, answer in turns(row):
            options = {letter: name for letter, name in OPTION.findall(user)} or options
            assert answer == options[re.search(r"option ([A-D]) say", user).group(1)]
        row = R.reading_row(rng, "same", 1)
        finding = re.search(r"Finding: (.+)\.\n", turns(row)[0][0]).group(1)
        for user, think, answer in turns(row):
            asked = re.search(r"Does the finding say (.+)\? Answer", user).group(1)
            assert answer == ("yes" if asked == finding else "no")
            assert think == f"The finding is {finding}. The question asks about {asked}. So the answer is {answer}."
            yes, no = yes + (answer == "yes"), no + (answer == "no")
    assert 0.35 < yes / (yes + no) < 0.65  # balanced: always-yes stays at chance


def test_copy_rows_repeat_the_text():
    for row in R.reading_rows(np.random.default_rng(5), 30, 1, mix={"copy": 1.0}):
        (user, think, answer), = turns(row)
        assert user == f"Repeat the text: {answer}" and think == f"The text is {answer}."


def test_probe_names_never_in_training_names():
    train = [m["content"] for level in R.LEVELS for row in R.reading_rows(np.random.default_rng(6), 300, level)
             for m in row["messages"]]
    side_by_side = set()
    for text in train:
        words = re.findall(r"[a-z]+|[0-9]", text.lower())
        side_by_side |= set(zip(words, words[1:]))
    hand = R.unseen_pairs(["Finding: Basal crypts."])
    assert "basal crypts" not in hand and "crypts basal" in hand and "finding basal" not in hand
    assert len(hand) == len(R.TRAIN_WORDS) * (len(R.TRAIN_WORDS) - 1) - 1  # 'finding' is not a training word
    trained = {w for pair in side_by_side for w in pair}
    assert not trained & set(R.PROBE_WORDS) and len(R.PROBE_WORDS) >= 20  # held out of stage 0 (see _vocabulary)
    probe = R.probe_rows(np.random.default_rng(7), 40, train)
    assert {r["skill"] for r in probe} == {"option", "same"}
    for row in probe:
        (user, _, _), = turns(row)
        names = [n for _, n in OPTION.findall(user)] or [re.search(r"Finding: (.+)\.\n", user).group(1)]
        for name in names:
            first, second = name.split()
            assert (first, second) not in side_by_side and {first, second} <= set(R.TRAIN_WORDS)
    with pytest.raises(ValueError, match="never stand side by side"):
        R.probe_rows(np.random.default_rng(7), 4, [f"{a} {b}" for a in R.TRAIN_WORDS for b in R.TRAIN_WORDS])


def test_every_tumour_option_word_is_trained_in_stage_0():
    """The tumour MCQs' option texts are text.attribute_options(), and every word of them stands in stage 0's
    rows, never among the probe's held-out words: a word no stage-0 row holds keeps an untrained embedding,
    which the base LM cannot copy ("low grade, without necrosis" stayed uncopyable until session 25)."""
    from data.synthpath import text as T
    from data.synthpath.world import sample_attributes

    rng = np.random.default_rng(8)
    asked = {o[3:] for qtype in ("grade", "mitoses", "glands", "pleomorphism") for _ in range(60)
             for o in T.ask(rng, qtype, "mcq", "TUM", sample_attributes(rng, "TUM"))["options"]}
    assert asked == set(T.attribute_options())
    words = {w for text in asked for w in re.findall(r"[a-z]+|[0-9]", text)}
    assert {"low", "without", "mild", "poorly", "0", "4"} <= words
    assert words <= set(R.TRAIN_WORDS) and not words & set(R.PROBE_WORDS)
    rows = " ".join(m["content"] for level in R.LEVELS for row in R.reading_rows(np.random.default_rng(9), 300, level)
                    for m in row["messages"])
    assert words <= set(re.findall(r"[a-z]+|[0-9]", rows.lower()))


def test_level_at_hand_case():
    assert [base_lm.level_at(s, [3, 2]) for s in range(7)] == [0, 0, 0, 1, 1, 2, 2]
    assert base_lm.level_at(10**6, []) == 0


class _Cfg:
    seed, batch_size, replay, level_steps, level_batch = 0, 8, 0.25, "2,2", ""


def test_curriculum_sampler_levels_replay_and_determinism():
    levels = [0] * 10 + [1] * 10 + [2] * 10
    sample = base_lm.curriculum_sampler(_Cfg, levels)
    assert sample(0, 0) == sample(0, 0) and sample(0, 0) != sample(1, 0)
    assert all(levels[i] == 0 for i in sample(1, 0))  # level 0: nothing earlier to replay
    at_two = sample(4, 0)
    assert len(at_two) == 8
    assert sum(levels[i] == 2 for i in at_two) == 6  # (1 - replay) of the batch from the step's level
    assert all(levels[i] < 2 for i in at_two[6:])


def test_curriculum_sampler_walks_the_levels_a_file_holds():
    """reading_near.jsonl holds levels 1 and 2 only: the first level_steps[0] steps draw level 1, then
    level 2 with level 1 replayed."""
    levels = [1] * 10 + [2] * 10
    sample = base_lm.curriculum_sampler(_Cfg, levels)
    assert all(levels[i] == 1 for s in (0, 1) for i in sample(s, 0))
    at_two = sample(2, 0)
    assert [levels[i] for i in at_two] == [2] * 6 + [1] * 2


def test_level0_drills_answer_in_one_terse_reply():
    rng = np.random.default_rng(8)
    for _ in range(100):
        (user, reply), = [(m["content"] for m in R.reading_row(rng, "option", 0)["messages"])]
        options = dict(OPTION.findall(user))
        finding = re.search(r"\nFinding: (.+)\.$", user).group(1)
        assert reply == walk_of(options, finding)
        (user, reply), = [(m["content"] for m in R.reading_row(rng, "same", 0)["messages"])]
        finding = re.fullmatch(r"Finding: (.+)\.", user).group(1)
        for name, answer in re.findall(r"([a-z0-9 -]+?): (yes|no)\.", reply):
            assert answer == ("yes" if name.strip() == finding else "no")
