"""Verifiable rewards for RL on pathology questions (stage 3, train_rl.py).

A completion is expected in the R1 format

    <think> reasoning </think> <answer> final answer </answer>

and is scored as  reward = w_format * format_reward + w_acc * accuracy_reward
(defaults 0.1 and 0.9, as in Patho-R1 / R1-V style rule-based rewards).

Answer kinds (the "kind" field of rl_train.jsonl):
    "mcq"    a letter A-Z: "B", "B) text", "(B)", "B.", "option B", "the answer is B"
    "yesno"  the first whole word yes|no ("know" is not "no", "not" is neither)
    "short"  normalised exact match (lowercase, no punctuation, no articles a/an/the)

Model text is only ever searched with str methods and small linear regexes: never
evaluated, never executed. Any str gives a float in [0, w_format + w_acc] in bounded
time: tag search is linear (str.find), and answers longer than MAX_ANSWER_CHARS are
not parsed at all (no real answer is that long), so regexes only see short strings.

Usage:
    from nanopatho.rewards import reward
    reward("<think>pink nuclei</think><answer>B</answer>", "B", "mcq")   # 1.0
"""

import re
import string
import unicodedata

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
KINDS = ("mcq", "yesno", "short")
MAX_ANSWER_CHARS = 1000  # longer answer blocks are never correct; keeps parsing O(1)

# MCQ letter forms. re.ASCII matters: with IGNORECASE alone, [A-Z] also matches the
# Kelvin sign (U+212A) and the long s (U+017F) through Unicode case folding.
_FLAGS = re.IGNORECASE | re.ASCII
_LETTER_ALONE = re.compile(r"\(?([A-Z])\)?[.:]?", _FLAGS)                  # "B", "(B)", "B.", "B:"
_LETTER_LEAD = re.compile(r"\(?([A-Z])(?:\)|[.:]\s)", _FLAGS)              # "B) text", "B. text", "(B) text"
_LETTER_PAREN = re.compile(r"(?<![A-Z0-9])\(([A-Z])\)", _FLAGS)            # "(B)" anywhere
_LETTER_MARK = re.compile(r"(?<![A-Z0-9(])([A-Z])\)", _FLAGS)             # "B)" anywhere
# "option B", "answer is (B)", "answer: b." -- a lower-case letter only when parenthesised
# or followed by punctuation / the end, so "the answer is a lesion" names no letter.
_LETTER_NAMED = re.compile(
    r"\b(?i:option|choice|answer)(?:\s+is)?\s*[:\-]?\s*"
    r"(?:\(([A-Za-z])\)|([A-Z])\b|([a-z])(?=\s*(?:[.,;:!?)]|$)))", re.ASCII)
_YESNO = re.compile(r"\b(yes|no)\b")                                       # on lower-cased text
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")


def extract_answer(text: str) -> str | None:
    """Content of the final <answer>…</answer> block, stripped; None if absent or unclosed.

    The final block is the one opened by the last "<answer>"; if that one has no
    "</answer>" after it the answer is unclosed and there is none.
    """
    start = text.rfind(ANSWER_OPEN)
    if start < 0:
        return None
    start += len(ANSWER_OPEN)
    end = text.find(ANSWER_CLOSE, start)
    if end < 0:
        return None
    return text[start:end].strip()


def format_reward(text: str) -> float:
    """1.0 iff text is exactly <think>…</think><answer>…</answer> up to outer whitespace.

    Strict: each of the four tags occurs exactly once, in that order, only whitespace
    between </think> and <answer> and around the whole, and a non-blank answer (the
    reasoning may be empty). str.count / str.find only: linear time on any input.
    """
    if any(text.count(tag) != 1 for tag in TAGS):
        return 0.0
    s = text.strip()
    if not (s.startswith(THINK_OPEN) and s.endswith(ANSWER_CLOSE)):
        return 0.0
    think_end = s.find(THINK_CLOSE)
    answer_start = s.find(ANSWER_OPEN)
    if think_end > answer_start or s[think_end + len(THINK_CLOSE):answer_start].strip():
        return 0.0
    if not s[answer_start + len(ANSWER_OPEN):-len(ANSWER_CLOSE)].strip():
        return 0.0
    return 1.0


def parse_choice(answer: str) -> str | None:
    """The MCQ letter (upper case) an answer names, or None if none or more than one.

    Forms: the whole answer is a letter ("B", "(B)", "b.", "B:"); it starts with a
    marked letter ("B) text", "B. text", "(B) text"); it contains "(B)", "B)" or
    "option / choice / answer [is] B". Several different letters -> ambiguous -> None. A bare
    leading word is not a letter: "A cell" and "I think" are not answers A and I.
    """
    s = answer.strip()
    if len(s) > MAX_ANSWER_CHARS:
        return None
    whole = _LETTER_ALONE.fullmatch(s)
    if whole:
        return whole.group(1).upper()
    letters = set()
    lead = _LETTER_LEAD.match(s)
    if lead:
        letters.add(lead.group(1).upper())
    letters.update(m.upper() for m in _LETTER_PAREN.findall(s))
    letters.update(m.upper() for m in _LETTER_MARK.findall(s))
    letters.update("".join(m).upper() for m in _LETTER_NAMED.findall(s))
    return letters.pop() if len(letters) == 1 else None


def parse_yesno(answer: str) -> str | None:
    """"yes" or "no": the first whole word yes|no, case-insensitive; None if neither.

    Whole words only ("know", "nothing", "yesterday" are neither); "not" is not "no".
    """
    if len(answer) > MAX_ANSWER_CHARS:
        return None
    m = _YESNO.search(answer.lower())
    return m.group(1) if m else None


def normalize_short(answer: str) -> str:
    """SQuAD-style normalisation: lowercase, drop punctuation and a/an/the, squeeze spaces."""
    s = answer.lower()
    s = "".join(" " if unicodedata.category(c).startswith("P") or c in string.punctuation else c for c in s)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _parse(answer: str, kind: str) -> str | None:
    if kind == "mcq":
        return parse_choice(answer)
    if kind == "yesno":
        return parse_yesno(answer)
    if len(answer) > MAX_ANSWER_CHARS:
        return None
    return normalize_short(answer) or None


def accuracy_reward(text: str, answer: str, kind: str) -> float:
    """1.0 iff the <answer> block of text parses to the same value as the gold answer.

    The gold answer is parsed with the same rules (so "B) Fibrosis" as gold is "B").
    Accuracy does not require a valid format: format_reward scores that separately.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown answer kind {kind!r}; expected one of {KINDS}")
    predicted = extract_answer(text)
    if predicted is None:
        return 0.0
    gold = _parse(answer, kind)
    return 1.0 if gold is not None and _parse(predicted, kind) == gold else 0.0


def reward(text: str, answer: str, kind: str, w_format: float = 0.1, w_acc: float = 0.9) -> float:
    """r = w_format * format_reward(text) + w_acc * accuracy_reward(text, answer, kind)."""
    return w_format * format_reward(text) + w_acc * accuracy_reward(text, answer, kind)
