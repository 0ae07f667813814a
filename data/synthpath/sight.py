"""Where a VLM's MCQ points go: to sight or to reading.

Every SynthPath MCQ chain states its finding before it walks the options (text.observations):

    "..., which is mucus."                          tissue
    "Gland formation: ..., so it is moderate."       glands
    "...: pleomorphism is marked."                   pleomorphism
    "I count three ... mitotic figures ..., so 3."   mitoses ("I see no ... mitotic figures." is 0)
    "..., so it is high grade."                      grade, and for the grade options' second half
    "... dirty necrosis is present." / "..., so no necrosis."   necrosis

and the walk then accepts the option that holds it. So each finding of a wrong answer failed in one of
four ways, counted per finding over all the questions of a type:

    sight     the reply stated the wrong finding and the answer follows its statement;
    reading   the reply stated the right finding and the answer does not follow it;
    unstated  the reply never stated the finding (the grade chains of sft_tumour.jsonl state necrosis
              only in their long form), so the walk decided it unseen;
    other     a wrong statement that the answer does not follow either.

"stated_right" is what the LM saw: the MCQ accuracy a perfect reader of its own statements would get on a
one-finding type. RL rewards the answer only, so it can lift an accuracy towards stated_right by reading, and
above it only by seeing better.

    python -m data.synthpath.sight --ckpt out/seed0/sft --data data/synthpath   # greedy replies to mcq_test, ~60 s
    python -m data.synthpath.sight --eval out/seed0/sft/eval.json --out out/seed0/sft/sight.json   # no model: the
        # replies a `nanopatho.evaluate --responses` run kept (the speedrun's), to the same items
"""

import argparse
import json
import os
import re

from data.synthpath import text
from nanopatho.rewards import extract_answer, parse_choice

WALK = "Checking the options:"  # where the chain stops stating findings and walks the options
STATEMENTS = {  # finding -> (regex of its statement in the chain, the stated value from the match)
    "tissue": (re.compile(r"which is ([a-z -]+)\."), lambda m: m.group(1)),
    "glands": (re.compile(r"Gland formation: [^.]*, so it is (good|moderate|poor)\."), lambda m: m.group(1)),
    "pleomorphism": (re.compile(r"pleomorphism is (mild|moderate|marked)\."), lambda m: m.group(1)),
    "mitoses": (re.compile(r"I see no near-black condensed mitotic figures\.|mitotic figures? with clear halos, so (\d)\."),
                lambda m: m.group(1) or "0"),
    "grade": (re.compile(r"so it is (low|high) grade\."), lambda m: m.group(1)),
    "necrosis": (re.compile(r"dirty necrosis is (present)\.|so (no) necrosis\."), lambda m: "with" if m.group(1) else "without"),
}
OPTION_VALUES = {  # question type -> {option text: {finding: value}}, the inverse of text._mcq's tables
    "glands": {o: {"glands": v} for v, o in text.GLAND_OPTIONS.items()},
    "pleomorphism": {o: {"pleomorphism": v} for v, o in text.PLEO_OPTIONS.items()},
    "mitoses": {o: {"mitoses": o} for o in text.COUNT_OPTIONS},
    "grade": {text.grade_option(g, n): {"grade": g, "necrosis": "with" if n else "without"}
              for g in ("low", "high") for n in (False, True)},
}
CAUSES = ("sight", "reading", "unstated", "other")


def stated(reply, finding):
    """The value of `finding` the reply states before its option walk, or None."""
    pattern, value = STATEMENTS[finding]
    m = pattern.search(reply.split(WALK)[0])
    return value(m) if m else None


def option_values(qtype, option):
    """{finding: value} an option text ("B) 3", "C) low grade, with necrosis", "A) mucus") stands for."""
    body = option.split(") ", 1)[1]
    return {"tissue": body} if qtype == "tissue" else OPTION_VALUES[qtype].get(body, {})


def cause(said, chosen, gold):
    """Why a chosen finding value differs from the gold one (see the module docstring)."""
    if said is None:
        return "unstated"
    if said == chosen:
        return "sight"
    return "reading" if said == gold else "other"


def split(items, replies):
    """{type: {"n", "right", "no_answer", "findings": {finding: {"stated", "stated_right", "follows", *CAUSES}}}}
    over MCQ items {"type", "options", "answer"} and their replies; shares of the type's n, except "follows"
    (of the replies that state the finding and answer, the share whose chosen option holds it)."""
    tally = {}
    for item, reply in zip(items, replies):
        qtype, options = item["type"], item["options"]
        t = tally.setdefault(qtype, {"n": 0, "right": 0, "no_answer": 0, "findings": {}})
        t["n"] += 1
        letter = parse_choice(extract_answer(reply) or "")
        gold = option_values(qtype, next(o for o in options if o.startswith(item["answer"] + ")")))
        chosen = next((option_values(qtype, o) for o in options if letter and o.startswith(letter + ")")), None)
        t["right"] += letter == item["answer"]
        t["no_answer"] += chosen is None
        for finding, value in gold.items():
            f = t["findings"].setdefault(finding, dict.fromkeys(("stated", "stated_right", "follows", "n_follows") + CAUSES, 0))
            said = stated(reply, finding)
            f["stated"] += said is not None
            f["stated_right"] += said == value
            if said is not None and chosen is not None:
                f["n_follows"] += 1
                f["follows"] += chosen.get(finding) == said
            if chosen is not None and chosen.get(finding) != value:
                f[cause(said, chosen.get(finding), value)] += 1
    for t in tally.values():
        for f in t["findings"].values():
            n_follows = f.pop("n_follows")
            f["follows"] = f["follows"] / n_follows if n_follows else None
            for k in ("stated", "stated_right") + CAUSES:
                f[k] /= t["n"]
        t["right"] /= t["n"]
        t["no_answer"] /= t["n"]
    return tally


def format_table(tally):
    lines = [f"{'type':13s} {'finding':13s} {'n':>4s} {'right':>6s} {'stated_right':>12s} {'follows':>8s}  "
             + " ".join(f"{c:>8s}" for c in CAUSES) + "   (chance 0.25)"]
    for qtype in sorted(tally):
        t = tally[qtype]
        for finding, f in t["findings"].items():
            follows = "-" if f["follows"] is None else f"{f['follows']:.3f}"
            lines.append(f"{qtype:13s} {finding:13s} {t['n']:4d} {t['right']:6.3f} {f['stated_right']:12.3f} {follows:>8s}  "
                         + " ".join(f"{f[c]:8.3f}" for c in CAUSES))
    return "\n".join(lines)


def model_replies(args, items):
    """Greedy replies of --ckpt to the items, as nanopatho.evaluate generates them."""
    from nanopatho import checkpoint
    from nanopatho.data import preload_images
    from nanopatho.evaluate import generate_answers

    model, _, tokenizer = checkpoint.load(args.ckpt, "cpu", expect="vlm")
    model.eval()
    images, items, _ = preload_images(items, model.config.vision.image_size, desc="images")
    replies, _ = generate_answers(model, tokenizer, items, images, batch_size=args.batch_size, device="cpu",
                                  max_new_tokens=args.max_new_tokens)
    return replies


def kept_replies(path, items):
    """The MCQ replies an `evaluate --responses` run kept, checked against the items they answer."""
    with open(path) as f:
        replies = json.load(f)["results"].get("mcq", {}).get("responses")
    if replies is None:
        raise SystemExit(f"{path}: no MCQ replies kept; run nanopatho.evaluate with --tasks mcq --responses")
    if len(replies) != len(items):
        raise SystemExit(f"{path}: {len(replies)} replies for {len(items)} items; pass the --data and --limit it ran with")
    return replies


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="a VLM checkpoint directory: its greedy replies are generated here")
    src.add_argument("--eval", help="an eval.json written by `nanopatho.evaluate --responses`: its kept replies")
    p.add_argument("--data", default=None, help="a SynthPath world (prepare.py's output); --eval: default its own")
    p.add_argument("--file", default="mcq_test.jsonl", help="MCQ items with a 'type', relative to --data")
    p.add_argument("--limit", type=int, default=None, help="only the first N items (--eval: default its own)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_new_tokens", type=int, default=256, help="greedy generation budget (the speedrun's eval: 256)")
    p.add_argument("--out", default=None, help="also write the table and the replies as JSON here")
    args = p.parse_args(argv)
    from nanopatho.data import load_records

    if args.eval:
        with open(args.eval) as f:
            run = json.load(f)
        args.data = args.data or run.get("data")
        args.limit = args.limit or run.get("limit")
    if not args.data:
        raise SystemExit("--data: which world's items the replies answer")
    items, _ = load_records(os.path.join(args.data, args.file), ("image", "question", "options", "answer", "type"))
    items = items[:args.limit]
    replies = kept_replies(args.eval, items) if args.eval else model_replies(args, items)
    tally = split(items, replies)
    print(f"{args.eval or args.ckpt}: where the MCQ answers of {args.file} go wrong, greedy, {len(items)} items")
    print(format_table(tally))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"source": args.eval or args.ckpt, "data": args.data, "file": args.file, "split": tally,
                       "replies": None if args.eval else replies}, f, indent=2)


if __name__ == "__main__":
    from nanopatho.training import run
    run(main)
