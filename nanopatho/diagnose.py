"""Where inside its answers does a VLM lose? Teacher-forced per-token loss of a checkpoint on
the SFT *validation* conversations (every `--val_every`-th row, the rows train_sft.py holds
out; never a test set), grouped by the role of the token being predicted:

    option letter (reasoning)   the letter that closes the MCQ option walk, "So the answer is B."
    MCQ letter in <answer>      the letter right after <answer>
    yes/no decision (reasoning) "yes" or "no" in the chain's closing "So the answer is yes."
    yes/no in <answer>          "yes" or "no" right after <answer> (a copy once the chain has decided)
    option check (reasoning)    "yes" or "no" after an option line of the walk, "B) mucus: yes."
    option text copied          the walk's option text and its ":" ("B) mucus:"), a copy of the prompt's line
    other assistant tokens      everything else the model is trained on

For each group: mean NLL, top-1 accuracy of the next-token prediction, and chance (uniform
over the options: 1/n and ln n). A letter group at chance while the rest of the reply is
near zero loss means the model writes fluent reasoning but cannot tie it to the question:
that is the toy VLM's failure on SynthPath (see the README, "What the toy run shows").

    python -m nanopatho.diagnose --ckpt out/sft --data data/synthpath
    python -m nanopatho.diagnose --ckpt out/sft --data data/synthpath --limit 100 --out diag.json
    python -m nanopatho.diagnose --ckpt out/base_lm --probe reading_probe.jsonl     # stage 0: the probe only
    python -m nanopatho.diagnose --ckpt out/base_lm --probe reading_probe.jsonl --require check=0.8   # exit 3 below

`--probe` also scores the reading probe (data/synthpath/reading.py): held-out option walks (copy
each option, check it, name the letter) and same-or-different judgements on names never trained on, text only, for the base LM, stage 1 and SFT.
Besides the token roles it scores whole walks, one per conversation (the gold walk says "no" until the
matching option, then "yes"):

    walk    every check of the walk top-1 right, so the letter it ends on is the answer (chance: a coin per
            line, 0.5^lines; a position rule, "yes on the third line", scores the share of walks that end there)
    match   the "yes" on the matching line ("always no" scores 0 here while its check top-1 is ~0.6)

and the probe's near-miss walks (skill "near": four options sharing a word, "lining compact" / "lining
variable", as the tumour options do) apart, as near_check and near_walk.
"""

import argparse
import collections
import json
import math
import os
import re
import sys

import torch
import torch.nn.functional as F

from nanopatho import checkpoint
from nanopatho.data import collate_lm, load_conversations, load_records, preload_images, to_float

ROLES = ("option letter (reasoning)", "MCQ letter in <answer>", "yes/no decision (reasoning)", "yes/no in <answer>",
         "option check (reasoning)", "option text copied", "other assistant tokens")
OTHER = len(ROLES) - 1
OPTION_LINE = re.compile(r"^\s*\(?[A-Z][).]\s", re.MULTILINE)  # "A) text", "(B) text", "C. text"
WALK_TEXT = re.compile(r"[A-Z]\)[^:\n]*")      # a walk line so far, inside its option text: "B) muc"
WALK_CHECKED = re.compile(r"[A-Z]\)[^:\n]*:")  # a walk line up to its check: "B) mucus:"


def _yes_no_next(pieces, t):
    return re.match(r"(yes|no)\b", "".join(pieces[t:t + 3]).strip().lower()) is not None


def token_roles(pieces, mask, ids, answer_ids, is_mcq):
    """Role index (into ROLES) of each predicted token ids[t], or -1 outside the loss mask.
    pieces[t] is the decoded text of ids[t]; answer_ids = (<answer> id, </answer> id). Inside
    <answer> only the first token is scored as the decision ("yes" may be two tokens, "y" "es").
    A walk line is a reply line that starts "B)"; its roles need is_mcq (options in the question)."""
    start, end = answer_ids
    roles = [-1] * len(ids)
    line = pieces[0].rsplit("\n", 1)[-1]  # the text of the current line before token t
    for t in range(1, len(ids)):
        if mask[t]:
            roles[t] = _role(pieces, ids, t, line, start, end, is_mcq)
        line = (line + pieces[t]).rsplit("\n", 1)[-1]
    return roles


def _role(pieces, ids, t, line, start, end, is_mcq):
    if ids[t - 1] == start:
        stop = ids.index(end, t) if end in ids[t:] else len(ids)
        answer = "".join(pieces[t:stop]).strip()
        if is_mcq and re.fullmatch(r"[A-Z]", answer):
            return 1
        return 3 if answer.lower() in ("yes", "no") else OTHER
    if "".join(pieces[max(0, t - 4):t]).lower().endswith("the answer is"):
        if is_mcq and re.fullmatch(r"[A-Z]", pieces[t].strip()):
            return 0
        return 2 if _yes_no_next(pieces, t) else OTHER
    if is_mcq and WALK_CHECKED.fullmatch(line.strip()) and _yes_no_next(pieces, t):
        return 4
    if is_mcq and WALK_TEXT.fullmatch(line):
        return 5
    return OTHER


def chance(role, n_options):
    """(accuracy, NLL) of a uniform guess for a token of this role; None for free text."""
    n = {0: n_options, 1: n_options, 2: 2, 3: 2, 4: 2}.get(role)
    return (1.0 / n, math.log(n)) if n else None


def summarize(nll, correct, roles, n_options):
    """Per-role mean NLL and top-1 accuracy over flat lists of equal length (-1 roles ignored)."""
    out = {}
    for r, name in enumerate(ROLES):
        sel = [i for i, role in enumerate(roles) if role == r]
        if not sel:
            continue
        ref = [chance(r, n_options[i]) for i in sel]
        out[name] = {"n": len(sel), "nll": sum(nll[i] for i in sel) / len(sel),
                     "top1": sum(correct[i] for i in sel) / len(sel),
                     "chance_top1": None if ref[0] is None else sum(c[0] for c in ref) / len(ref),
                     "chance_nll": None if ref[0] is None else sum(c[1] for c in ref) / len(ref)}
    return out


def held_out(path, val_every, limit):
    """The conversations train_sft.py holds out for validation (row n, n % val_every == val_every-1),
    with one image or none."""
    convs, _ = load_conversations(path)
    rows = [c for n, c in enumerate(convs) if n % val_every == val_every - 1 and len(c["images"]) <= 1]
    return rows[:limit] if limit else rows


Scores = collections.namedtuple("Scores", "nll correct roles n_options conv")


@torch.no_grad()
def score(model, tokenizer, convs, batch_size=16):
    """Scores: flat per-token lists over every conversation: NLL, top-1 correct, role, options in its
    question, and the index of the conversation the token belongs to."""
    model.eval()
    is_vlm = hasattr(model, "vision")  # else a text-only LM (stage 0's base LM)
    max_len = (model.config.lm if is_vlm else model.config).max_seq_len
    n_image_tokens = model.n_image_tokens if is_vlm else 0
    with_image = [n for n, c in enumerate(convs) if c["images"]]
    assert is_vlm or not with_image, "a text-only LM cannot score conversations with images"
    images = preload_images([{"image": convs[n]["images"][0], "source": convs[n]["source"]} for n in with_image],
                            model.config.vision.image_size, desc="images")[0] if with_image else None
    slot = {n: k for k, n in enumerate(with_image)}  # conversation -> row of images
    nll, correct, roles, n_options, conv = [], [], [], [], []
    for i in range(0, len(convs), batch_size):
        chunk = convs[i:i + batch_size]
        seqs = [tokenizer.render_chat(c["messages"], n_image_tokens) for c in chunk]
        seqs = [(ids[:max_len], mask[:max_len]) for ids, mask in seqs]
        batch = collate_lm(seqs, tokenizer.pad_id)  # each (B, T-1)
        rows = [slot[n] for n in range(i, i + len(chunk)) if n in slot]
        pixels = to_float(images[rows]) if rows else None  # (N_img, 3, S, S), in batch order
        extra = {} if pixels is None else {"pixel_values": pixels}
        logits, _ = model(batch["input_ids"], attention_mask=batch["attention_mask"], **extra)  # (B, T-1, V)
        logp = F.log_softmax(logits.float(), dim=-1)  # (B, T-1, V)
        for b, (ids, mask) in enumerate(seqs):
            n = len(ids) - 1
            tgt = torch.tensor(ids[1:])  # (n,)
            row_nll = -logp[b, :n].gather(-1, tgt[:, None])[:, 0]  # (n,)
            row_hit = logp[b, :n].argmax(-1) == tgt  # (n,)
            pieces = [tokenizer.decode([t], skip_special=False) for t in ids]
            user = " ".join(m["content"] for m in chunk[b]["messages"] if m["role"] == "user")
            k = len(OPTION_LINE.findall(user))
            row_roles = token_roles(pieces, mask, ids, (tokenizer.answer_id, tokenizer.answer_end_id), k >= 2)[1:]
            nll += row_nll.tolist()
            correct += row_hit.tolist()
            roles += row_roles
            n_options += [k] * n
            conv += [i + b] * n
    return Scores(nll, correct, roles, n_options, conv)


def role_stats(s):
    """summarize() of a Scores."""
    return summarize(s.nll, s.correct, s.roles, s.n_options)


def walk_stats(correct, roles, conv):
    """{"walk", "match"} over the conversations with an option walk (one walk each, checks in order, the
    last one the matching option's "yes"), in summarize's layout; {} when none has a walk."""
    check, checks = ROLES.index("option check (reasoning)"), {}
    for ok, role, c in zip(correct, roles, conv):
        if role == check:
            checks.setdefault(c, []).append(bool(ok))
    if not checks:
        return {}
    walks = list(checks.values())
    stat = lambda top1, chance: {"n": len(walks), "nll": None, "top1": top1, "chance_top1": chance,  # noqa: E731
                                 "chance_nll": None}
    return {"walk": stat(sum(all(w) for w in walks) / len(walks), sum(0.5 ** len(w) for w in walks) / len(walks)),
            "match": stat(sum(w[-1] for w in walks) / len(walks), 0.5)}


PROBE_ROLES = {"copy": ROLES[5], "check": ROLES[4], "option": ROLES[0], "same": ROLES[2]}  # short name -> role
PROBE_SKILLS = (*PROBE_ROLES, "walk", "match", "near_check", "near_walk")  # what --require can name


def load_probe(path):
    """The reading probe (data/synthpath/reading.py:probe_rows, near_probe_rows): text-only conversations,
    each with its row's "skill" ("option", "same", "near")."""
    convs, _ = load_conversations(path)
    rows, _ = load_records(path, ("messages",), image_key=None)
    return [dict(c, skill=r.get("skill", "")) for c, r in zip(convs, rows)]


def probe_stats(model, tokenizer, convs):
    """The reading probe's stats, each {"n", "nll", "top1", ...}: "copy" option text, "check" option checks,
    "option" answer letter, "same" yes/no, "walk" / "match" whole walks (walk_stats) on the probe's
    disjoint options; "near_check" / "near_walk" on its near-miss walks."""
    was_training = model.training
    near = [c for c in convs if c["skill"] == "near"]
    plain = [c for c in convs if c["skill"] != "near"]
    scores = score(model, tokenizer, plain)
    stats = role_stats(scores)
    out = {short: stats[role] for short, role in PROBE_ROLES.items() if role in stats}
    out.update(walk_stats(scores.correct, scores.roles, scores.conv))
    if near:
        near_scores = score(model, tokenizer, near)
        near_stats = {"near_check": role_stats(near_scores).get(PROBE_ROLES["check"]),
                      "near_walk": walk_stats(near_scores.correct, near_scores.roles, near_scores.conv).get("walk")}
        out.update({k: v for k, v in near_stats.items() if v})
    model.train(was_training)
    return out


def parse_require(spec):
    """--require "check=0.8,same=0.8" -> [("check", 0.8), ("same", 0.8)]; ValueError names a bad item."""
    required = []
    for item in filter(None, spec.split(",")):
        skill, _, low = item.partition("=")
        if skill not in PROBE_SKILLS:
            raise ValueError(f"--require {item!r}: the probe scores {', '.join(PROBE_SKILLS)}, not {skill!r}")
        try:
            required.append((skill, float(low)))
        except ValueError:
            raise ValueError(f"--require {item!r}: expected SKILL=MIN, e.g. check=0.8") from None
    return required


def unmet(probe, required):
    """The probe skills whose top-1 is below their minimum, as "check 0.698 < 0.8" lines."""
    missed = []
    for skill, low in required:
        if skill not in probe:
            missed.append(f"{skill}: no probe item has that role")
        elif probe[skill]["top1"] < low:
            missed.append(f"{skill} {probe[skill]['top1']:.3f} < {low:g}")
    return missed


def format_table(stats):
    lines = [f"{'token role':28s} {'n':>6s} {'NLL':>7s} {'chance':>7s} {'top-1':>7s} {'chance':>7s}"]
    for name, s in stats.items():
        nll, c_nll, c_top = (("" if s[k] is None else f"{s[k]:.3f}") for k in ("nll", "chance_nll", "chance_top1"))
        lines.append(f"{name:28s} {s['n']:6d} {nll:>7s} {c_nll:>7s} {s['top1']:7.3f} {c_top:>7s}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="VLM checkpoint directory, or an LM one (stage 0) with --probe")
    p.add_argument("--data", default="data/synthpath", help="directory holding the SFT conversations")
    p.add_argument("--train_file", default="sft_train.jsonl", help="conversations (relative to --data)")
    p.add_argument("--val_every", type=int, default=20, help="train_sft.py's --val_every: which rows are held out")
    p.add_argument("--limit", type=int, default=0, help="use only the first N held-out conversations (0 = all)")
    p.add_argument("--probe", default="", help="also score this reading probe (relative to --data), "
                                               "e.g. reading_probe.jsonl; the only table for an LM checkpoint")
    p.add_argument("--require", default="", help="with --probe: SKILL=MIN,... (e.g. check=0.8): exit with status 3 "
                                                 "when a probe top-1 is below its minimum, after writing --out")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = p.parse_args(argv)
    if args.require and not args.probe:
        p.error("--require needs --probe")
    try:
        required = parse_require(args.require)
    except ValueError as e:
        p.error(str(e))
    model, config, tokenizer = checkpoint.load(args.ckpt)
    if config["model_type"] not in ("vlm", "lm") or (config["model_type"] == "lm" and not args.probe):
        raise checkpoint.CheckpointError(f"{args.ckpt}: holds a {config['model_type']!r} model; diagnose needs a "
                                         f"VLM, or an LM with --probe")
    result = {"ckpt": args.ckpt}
    if config["model_type"] == "vlm":
        convs = held_out(os.path.join(args.data, args.train_file), args.val_every, args.limit)
        scores = score(model, tokenizer, convs, args.batch_size)
        result.update(conversations=len(convs), roles=role_stats(scores),
                      walks=walk_stats(scores.correct, scores.roles, scores.conv))
        print(f"{args.ckpt}: {len(convs)} held-out conversations of {args.train_file}")
        print(format_table({**result["roles"], **{f"whole walks: {k}": v for k, v in result["walks"].items()}}))
    if args.probe:
        probe = load_probe(os.path.join(args.data, args.probe))
        result["probe"] = probe_stats(model, tokenizer, probe)
        print(f"reading probe ({args.probe}, {len(probe)} items, names never trained on):")
        print(format_table({f"probe {k}": v for k, v in result["probe"].items()}))
    missed = unmet(result.get("probe", {}), required)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    if missed:
        print(f"{args.ckpt}: reading probe below --require: {'; '.join(missed)}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    from nanopatho.training import run
    run(main)
