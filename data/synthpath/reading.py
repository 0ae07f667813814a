"""SynthPath reading curriculum: the text skills a base LM needs before it can answer a question
about an image, generated offline (stage 0, the stand-in for the LM pretraining a real VLM inherits).

A released LM can already look an answer up in a question; a blank toy LM cannot, and SFT on
SynthPath never teaches it (see the README, "What the toy run shows"). These rows teach exactly
that, in the chat layout SFT uses, on names that carry no pathology at all:

    copy     "Repeat the text: ..."                      -> the text again (induction: copy a span)
    option   "Finding: X." + four "A) .." options        -> "Checking the options:\nA) W: no.\n..C) X: yes.
                                                            So the answer is C."  (walk the options: copy + check)
    read     "What does option B say?" + options         -> "Option B) Y."                (letter -> name)
    same     "Finding: X. Does the finding say Y?"      -> "The finding is X. The question asks about Y.
                                                            So the answer is yes|no."    (same or different)
    near     the option walk on options that share a word ("mild W", "marked W", ..), the finding
             the name itself or "W is marked": stage 0's second phase (near_rows), as SynthPath's
             tumour options ("mild pleomorphism", "marked pleomorphism") need

Each row asks several questions on one context (dense supervision). Level 0 is a terse drill of
the skill alone (options + "Finding: y." -> the walk, as above), about 50 tokens;
level 1 asks the questions turn by turn in the chat layout SFT uses, + the system prompt; level 2 + a line of
8-16 filler words where the image's 16 positions sit (the real MCQ prompt's length, ~100 tokens).
The base-LM trainer (nanopatho/base_lm.py) moves through the levels short to long.

Names are one or two of SynthPath's words ("basal crypts", "wavy") or its tissue terms; a probe name is
two of those words that stand side by side in no training text (stage 0's rows, captions, textbook, SFT
chats): a new name of the usual length, made of words whose embeddings stage 0 trains, so the probe
measures the skill, not memory.

    rows = reading_rows(np.random.default_rng(0), 1000, level=1)      # [{"messages", "skill", "level"}]
    texts = [m["content"] for row in rows for m in row["messages"]]    # + every other training text
    probe = probe_rows(np.random.default_rng(1), 200, texts)            # names never side by side in texts
    near = near_rows(np.random.default_rng(2), 1000, level=2)           # the second phase's rows
"""

import re

import numpy as np

from data.synthpath.text import (CLASS_INFO, DENSITY, GLANDS, GRADE_RULE, LETTERS, PLEO, SIZE, attribute_options,
                                  walk_options)
from nanopatho.prompts import SYSTEM_PROMPT

SKILLS = ("copy", "option", "read", "same")
LEVELS = (0, 1, 2)
FILLER_WORDS = 16  # the image's 16 positions in the real prompt
TERMS = sorted({s for _, syn, _ in CLASS_INFO.values() for s in syn})  # SynthPath tissue names and synonyms


def _words(text):
    """The words of a text as stage 0 counts them: lower-case runs of letters, and single digits (counts)."""
    return re.findall(r"[a-z]+|[0-9]", text.lower())


def _vocabulary():
    """SynthPath's own words (class names, descriptions, attribute phrases): each one BPE token, so a
    name of one or two words is as short as the real options. Every 5th word that no tissue name and no
    tumour MCQ option uses is held out of stage 0's rows, for the reading probe: a word no stage-0 row
    holds keeps an untrained embedding, so the base LM cannot copy it whatever its skill. That is why
    every word of the MCQ options ("low", "without", "mild", the counts 0-4) is a training word: held
    out, it left the tumour questions' options uncopyable (issue-15 note, session 25)."""
    texts = [t for name, syn, desc in CLASS_INFO.values() for t in [name, *syn, *desc]]
    texts += [p for table in (DENSITY, SIZE, PLEO, GLANDS) for phrases in table.values() for p in phrases]
    words = sorted({w for t in texts + [GRADE_RULE] for w in re.findall(r"[a-z]+", t.lower()) if len(w) > 2})
    options = {w for t in attribute_options() for w in _words(t)}
    kept = {w for t in TERMS for w in re.findall(r"[a-z]+", t)} | options
    probe = [w for w in words if w not in kept][::5]
    return sorted(set(words) - set(probe) | options), probe


TRAIN_WORDS, PROBE_WORDS = _vocabulary()


def word_name(rng, words):
    return " ".join(words[int(i)] for i in rng.integers(len(words), size=int(rng.integers(1, 3))))


def train_name(rng):
    """A name: a SynthPath term (1 in 4) or one or two training words."""
    if rng.random() < 0.25:
        return TERMS[int(rng.integers(len(TERMS)))]
    return word_name(rng, TRAIN_WORDS)


def unseen_pairs(texts):
    """Two-word names whose words stand side by side in none of `texts` (what the training stages read)."""
    seen = set()
    for text in texts:
        words = _words(text)
        seen.update(zip(words, words[1:]))
    return [f"{a} {b}" for a in TRAIN_WORDS for b in TRAIN_WORDS if a != b and (a, b) not in seen]


def distinct(rng, k, make):
    names = []
    while len(names) < k:
        n = make(rng)
        if n not in names:
            names.append(n)
    return names


def filler(rng, level):
    if level < 2:
        return ""
    n = int(rng.integers(FILLER_WORDS // 2, FILLER_WORDS + 1))
    return " ".join(TRAIN_WORDS[int(i)] for i in rng.integers(len(TRAIN_WORDS), size=n)) + ".\n"


def reply(think, answer):
    return f"<think>{think}</think><answer>{answer}</answer>"


def with_context(turns, level, context):
    """turns [(user, assistant), ...] -> messages; the first user turn carries the context."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}] if level >= 1 else []
    for i, (user, assistant) in enumerate(turns):
        if i == 0:
            user = context + user
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages


def lettered(names):
    return [f"{LETTERS[i]}) {n}" for i, n in enumerate(names)]


def options_block(names):
    return "\nOptions:\n" + "\n".join(lettered(names))


def copy_turns(rng, make_name):
    text = " ".join(make_name(rng) for _ in range(int(rng.integers(2, 6))))
    return [(f"Repeat the text: {text}", reply(f"The text is {text}.", text))]


def options_turns(rng, make_name, n_questions, turn):
    """Four options, then n_questions turns about them; turn(names, k) -> (question, reply) for option k.
    The options follow the first question only, as a chat would show them once."""
    names = distinct(rng, 4, make_name)
    asked = [int(i) for i in rng.permutation(4)[:n_questions]]
    turns = []
    for j, k in enumerate(asked):
        question, answer = turn(names, k)
        turns.append((question + options_block(names) if j == 0 else question, answer))
    return turns


def option_turns(rng, make_name, n_questions):
    """Finding -> the walk to its option letter (the SFT chain's MCQ closing), then more findings
    against the same options."""
    return options_turns(rng, make_name, n_questions, lambda names, k: (
        f"Finding: {names[k]}.\nWhich option matches the finding?",
        reply(f"The finding is {names[k]}. {walk_options(lettered(names), LETTERS[k])}", LETTERS[k])))


def read_turns(rng, make_name, n_questions):
    """Option letter -> the option's text."""
    return options_turns(rng, make_name, n_questions, lambda names, k: (
        f"What does option {LETTERS[k]} say?",
        reply(f"Option {LETTERS[k]}) {names[k]}. So the answer is {names[k]}.", names[k])))


def same_turns(rng, make_name, n_questions):
    """Is the named thing the finding? Half yes, half no; a 'no' may differ in one word only."""
    finding = make_name(rng)
    turns = []
    for j in range(n_questions):
        yes = rng.random() < 0.5
        other = finding if yes else distinct(rng, 1, lambda r: near_miss(r, finding, make_name))[0]
        question = f"Does the finding say {other}? Answer yes or no."
        user = f"Finding: {finding}.\n{question}" if j == 0 else question
        answer = "yes" if yes else "no"
        turns.append((user, reply(f"The finding is {finding}. The question asks about {other}. "
                                   f"So the answer is {answer}.", answer)))
    return turns


def near_miss(rng, name, make_name):
    """A different name, sharing a word with `name` half of the time (so a yes needs the whole name)."""
    words = name.split()
    if len(words) > 1 and rng.random() < 0.5:
        i = int(rng.integers(len(words)))
        words[i] = make_name(rng).split()[0]
        candidate = " ".join(words)
        if candidate != name:
            return candidate
    candidate = make_name(rng)
    return candidate if candidate != name else candidate + " " + make_name(rng)


def drill(rng, skill, make_name, n_questions):
    """Level 0: one short turn, several answers in one terse reply (no chain, no tags): the skill alone,
    at a quarter of the chat layout's length, so it forms before contexts grow."""
    names = distinct(rng, 4, make_name)
    asked = [int(i) for i in rng.permutation(4)[:n_questions]]
    if skill == "option":
        k = asked[0]
        user, answer = options_block(names).lstrip() + f"\nFinding: {names[k]}.", walk_options(lettered(names), LETTERS[k])
    elif skill == "read":
        user, answer = options_block(names).lstrip(), " ".join(f"Option {LETTERS[k]}) {names[k]}." for k in asked)
    elif skill == "same":
        finding = names[0]
        others = [finding if rng.random() < 0.5 else near_miss(rng, finding, make_name) for _ in range(n_questions)]
        user = f"Finding: {finding}."
        answer = " ".join(f"{o}: {'yes' if o == finding else 'no'}." for o in others)
    else:
        return copy_turns(rng, make_name)
    return [(user, answer)]


def reading_row(rng, skill, level, make_name=train_name):
    if level == 0:
        turns = drill(rng, skill, make_name, int(rng.integers(3, 5)))
        return {"messages": with_context(turns, 0, ""), "skill": skill, "level": 0}
    n_questions = int(rng.integers(1, 4))  # questions on one context: up to 3 answers per forward pass
    turns = {"copy": lambda: copy_turns(rng, make_name),
             "option": lambda: option_turns(rng, make_name, min(n_questions, 2)),  # a walk is ~4 lines long
             "read": lambda: read_turns(rng, make_name, n_questions),
             "same": lambda: same_turns(rng, make_name, n_questions)}[skill]()
    return {"messages": with_context(turns, level, filler(rng, level)), "skill": skill, "level": level}


MIX = {"copy": 1.0, "option": 4.0, "read": 1.0, "same": 2.0}  # the walk's check is the slowest skill to form


def reading_rows(rng, n, level, mix=None):
    """n rows of one level; skills drawn by `mix` ({skill: weight}, default MIX)."""
    mix = mix or MIX
    skills, weights = list(mix), np.array(list(mix.values()), dtype=float)
    picks = rng.choice(len(skills), size=n, p=weights / weights.sum())
    return [reading_row(rng, skills[int(i)], level) for i in picks]


def shared_word_names(rng):
    """(make_name, the shared word, the index of each name's own word) for a near-miss option list: every
    name is one shared word and one word of its own ("marked pleomorphism", "mild pleomorphism"), as
    SynthPath's tumour options are, so only the own word tells the options apart."""
    shared = TRAIN_WORDS[int(rng.integers(len(TRAIN_WORDS)))]
    own_first = bool(rng.random() < 0.5)

    def make(r):
        own = shared
        while own == shared:
            own = TRAIN_WORDS[int(r.integers(len(TRAIN_WORDS)))]
        return f"{own} {shared}" if own_first else f"{shared} {own}"
    return make, shared, 0 if own_first else 1


def unseen_shared_names(pairs):
    """shared_word_names for the probe: rng -> (make_name, shared, own index) whose names are all
    `pairs` (two-word names never side by side in training), four or more of them sharing one word."""
    groups = {}
    for pair in pairs:
        a, b = pair.split()
        groups.setdefault((b, 0), []).append(a)  # own word first: "<own> <shared>"
        groups.setdefault((a, 1), []).append(b)  # own word second: "<shared> <own>"
    keys = sorted(k for k, owns in groups.items() if len(owns) >= 4)

    def names_for(rng):
        shared, own = keys[int(rng.integers(len(keys)))]
        owns = groups[(shared, own)]

        def make(r):
            word = owns[int(r.integers(len(owns)))]
            return f"{word} {shared}" if own == 0 else f"{shared} {word}"
        return make, shared, own
    return names_for


def near_turns(rng, n_questions, names_for=shared_word_names):
    """The option walk on a near-miss list; half the findings restate the name as "<shared> is <own>"
    (the chains say "pleomorphism is marked" where the option says "marked pleomorphism")."""
    make, shared, own = names_for(rng)

    def turn(names, k):
        finding = names[k] if rng.random() < 0.5 else f"{shared} is {names[k].split()[own]}"
        return (f"Finding: {finding}.\nWhich option matches the finding?",
                reply(f"The finding is {finding}. {walk_options(lettered(names), LETTERS[k])}", LETTERS[k]))
    return options_turns(rng, make, n_questions, turn)


def near_rows(rng, n, level):
    """Stage 0's second phase: n rows of one chat level (1 or 2), half near-miss option walks
    (skill "near"), half the usual mix so the other skills stay."""
    assert level >= 1, "near-miss rows use the chat layout"
    rows = []
    for _ in range(n):
        if rng.random() < 0.5:
            turns = near_turns(rng, int(rng.integers(1, 3)))
            rows.append({"messages": with_context(turns, level, filler(rng, level)), "skill": "near", "level": level})
        else:
            rows.append(reading_rows(rng, 1, level)[0])
    return rows


def probe_rows(rng, n, train_texts):
    """Held-out items at the longest level's layout: one question each, option walk and same-or-different
    alternating, every option and finding a name from unseen_pairs(train_texts)."""
    names = unseen_pairs(train_texts)
    if len(names) < 20:
        raise ValueError(f"only {len(names)} word pairs never stand side by side in the training texts; "
                         "the probe needs new names (fewer reading rows, or more words)")

    def probe_name(r):
        return names[int(r.integers(len(names)))]
    rows = []
    for i in range(n):
        skill = ("option", "same")[i % 2]
        turns = option_turns(rng, probe_name, 1) if skill == "option" else same_turns(rng, probe_name, 1)
        rows.append({"messages": with_context(turns, 2, filler(rng, 2)), "skill": skill, "level": 2})
    return rows


def near_probe_rows(rng, n, train_texts):
    """Held-out near-miss option walks (skill "near"), at the longest level's layout: every option a name
    from unseen_pairs(train_texts), the four sharing one word, as the tumour options do ("low grade,
    with necrosis" / "low grade, without necrosis"). probe_rows' options share no word, so a check there
    can pass on the first word alone."""
    names_for = unseen_shared_names(unseen_pairs(train_texts))
    return [{"messages": with_context(near_turns(rng, 1, names_for), 2, filler(rng, 2)), "skill": "near", "level": 2}
            for _ in range(n)]
