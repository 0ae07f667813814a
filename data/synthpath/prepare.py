"""Prepare SynthPath: the offline procedural H&E world every nanopatho stage trains and is scored on.

    python data/synthpath/prepare.py --out data/synthpath --seed 0                 # toy: 5,200 tiles at 64 px
    python data/synthpath/prepare.py --out /data/sp --n_train 100000 --image_size 224 --workers 16

Writes under --out (image paths in every manifest are relative to --out):
    images/<hash>.png                     tiles named by an opaque hash, never by label
    captions_train.jsonl / captions_val.jsonl   {"image", "caption"} (several captions per image)
    textbook.jsonl                        {"text"}: the world's rules, stated in prose
    zeroshot_prompts.json                 CONCH format {"0": {"classnames": {label: [synonyms]}, "templates": [...]}}
    zeroshot_test.jsonl                   {"image", "label"} class-balanced
    retrieval_test.jsonl                  {"image", "caption"} one per image
    sft_train.jsonl                       {"messages": [system, user, assistant "<think>..</think><answer>..</answer>"], "images"}
    rl_train.jsonl                        {"image", "question", "options", "answer", "kind", "type"} answer-only, verifiable
    mcq_test.jsonl                        {"image", "question", "options": ["A) .."], "answer": letter, "type"}
    vqa_test.jsonl                        {"image", "question", "answer", "answer_type": CLOSED|OPEN, "type"}
    reading_train.jsonl                   {"messages", "skill", "level"}: stage 0's text-only reading curriculum
    reading_probe.jsonl                   {"messages", "skill", "level"}: held-out reading items, unseen names
                                          (1.4: + near-miss walks, skill "near")
    reading_near.jsonl                    (1.2) stage 0's second phase: near-miss option walks + the usual mix
    captions_findings.jsonl               (1.2) {"image", "caption"}: train tumours' findings by level word
    sft_tumour.jsonl                      (1.2) more SFT conversations per train tumour, about its attributes
    sft_tissue_tumour.jsonl               (1.5) a tissue MCQ per train tumour, short chain: RL's ptx rows
    meta.json, contact_sheet.png, tokenizer.json
Splits: train images feed captions_train / sft / rl, val images captions_val, and the test images
(zero-shot + retrieval, and a tumour-rich MCQ + VQA pool) are never used for training. The same
seed gives byte-identical files. Rendering is in world.py, the text in text.py.
"""

import argparse
import hashlib
import json
import multiprocessing
import os
import sys
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from data.synthpath import reading as R  # noqa: E402
from data.synthpath import text as T  # noqa: E402
from data.synthpath.world import CLASSES, GLANDS, LEVELS, MAX_MITOSES, PLEO, SIZES, render, sample_attributes  # noqa: E402
from nanopatho.prompts import SYSTEM_PROMPT, format_question  # noqa: E402

VERSION = "synthpath-1.5"  # 1.1: larger mitotic figures with halos, giant nuclei for pleomorphism; 1.2: + the
                           # three files marked 1.2 above (the probe's names avoid their words too); 1.3: the
                           # reading files' words include every word of the tumour MCQ options (reading.py);
                           # 1.4: reading_probe.jsonl + near-miss walks (skill "near"), the first 400 rows the same;
                           # 1.5: + sft_tissue_tumour.jsonl, every other file byte-identical
PIXELS = "synthpath-1.1"   # the renderer's version, in every tile's name: 1.2 draws the same tiles
TRAIN_CLASS_P = {c: (0.28 if c == "TUM" else 0.09) for c in CLASSES}   # tumours oversampled for SFT / RL
HIST_BINS = 8                                                           # per channel, colour baseline


@dataclass
class Config:
    out: str = "data/synthpath"
    seed: int = 0
    image_size: int = 64        # multiple of 16
    n_train: int = 4000         # images for captions_train, sft_train, rl_train
    n_val: int = 300            # images for captions_val
    n_test: int = 450           # class-balanced zero-shot / retrieval images (rounded down to a multiple of 9)
    n_test_qa: int = 450        # MCQ + VQA images, half of them tumours
    captions_per_image: int = 2
    rl_per_image: int = 2       # RL questions per train image (SFT has one conversation per image)
    textbook_examples: int = 400
    reading_per_level: int = 12000   # stage 0's reading curriculum rows per level (reading.py)
    reading_probe: int = 400        # held-out reading probe items
    reading_probe_near: int = 200   # + held-out near-miss option walks (options sharing a word), 1.4
    reading_near_per_level: int = 3000  # reading_near.jsonl rows at each chat level (1, 2)
    findings_per_tumour: int = 4    # captions_findings.jsonl captions per train tumour
    sft_per_tumour: int = 3         # sft_tumour.jsonl conversations per train tumour
    vocab_size: int = 4096
    no_tokenizer: bool = False
    workers: int = 2


def _counts(n, probs):
    """Integer counts summing to n, proportional to probs (largest remainder)."""
    raw = np.array(probs) * n
    c = np.floor(raw).astype(int)
    c[np.argsort(-(raw - c), kind="stable")[: n - c.sum()]] += 1
    return c


def _classes_for(rng, n, probs):
    labels = np.repeat(np.arange(len(CLASSES)), _counts(n, probs))
    return [CLASSES[i] for i in rng.permutation(labels)]


def plan_images(cfg):
    """Every image: global index, opaque id, split, class and attributes (no pixels yet)."""
    rng = np.random.default_rng([cfg.seed, 1])
    per_class = cfg.n_test // len(CLASSES)
    qa_p = [0.5 if c == "TUM" else 0.5 / (len(CLASSES) - 1) for c in CLASSES]
    plan = [("train", c) for c in _classes_for(rng, cfg.n_train, list(TRAIN_CLASS_P.values()))]
    plan += [("val", c) for c in _classes_for(rng, cfg.n_val, list(TRAIN_CLASS_P.values()))]
    plan += [("test", c) for c in _classes_for(rng, per_class * len(CLASSES), [1 / len(CLASSES)] * len(CLASSES))]
    plan += [("test_qa", c) for c in _classes_for(rng, cfg.n_test_qa, qa_p)]
    records = []
    for idx, (split, cls) in enumerate(plan):
        image_id = hashlib.sha1(f"{PIXELS}/{cfg.seed}/{cfg.image_size}/{idx}".encode()).hexdigest()[:16]
        attrs = sample_attributes(np.random.default_rng([cfg.seed, idx, 0]), cls)
        records.append(dict(idx=idx, image=f"images/{image_id}.png", split=split, cls=cls, attrs=attrs))
    return records


# -----------------------------------------------------------------------------
# pixels

def colour_histogram(rgb):
    """Joint RGB histogram with HIST_BINS bins per channel, normalised to sum 1 -> (HIST_BINS**3,)."""
    q = (rgb.astype(np.int64) * HIST_BINS) // 256                       # (H, W, 3) bin per channel
    code = (q[..., 0] * HIST_BINS + q[..., 1]) * HIST_BINS + q[..., 2]
    return np.bincount(code.ravel(), minlength=HIST_BINS ** 3) / code.size


def _render_one(task):
    idx, cls, attrs, path, seed, size = task
    rgb = render(np.random.default_rng([seed, idx, 1]), cls, attrs, size)
    Image.fromarray(rgb).save(path, format="PNG", optimize=False, compress_level=6)
    return colour_histogram(rgb).astype(np.float32)


def render_all(records, out, cfg, progress):
    """Render and save every tile (deterministic per image, whatever the worker count) -> histograms (N, 512)."""
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    tasks = [(r["idx"], r["cls"], r["attrs"], os.path.join(out, r["image"]), cfg.seed, cfg.image_size) for r in records]
    bar = tqdm(total=len(tasks), desc="rendering tiles", disable=not progress)
    hists = []
    if cfg.workers > 1:
        with multiprocessing.get_context("fork").Pool(cfg.workers) as pool:
            for h in pool.imap(_render_one, tasks, chunksize=32):
                hists.append(h)
                bar.update()
    else:
        for t in tasks:
            hists.append(_render_one(t))
            bar.update()
    bar.close()
    return np.stack(hists)


def centroid_accuracy(train_x, train_y, test_x, test_y):
    """Nearest class centroid (Euclidean) accuracy."""
    labels = sorted(set(train_y))
    cent = np.stack([train_x[np.array(train_y) == k].mean(0) for k in labels])   # (K, D)
    d = ((test_x[:, None, :] - cent[None]) ** 2).sum(-1)                          # (N, K)
    pred = np.array(labels, dtype=object)[d.argmin(1)]
    return float(np.mean(pred == np.array(test_y, dtype=object)))


def colour_baselines(records, hists):
    """The trivial baseline: nearest class centroid on a colour histogram, fit on train, scored on test."""
    split = np.array([r["split"] for r in records])
    tr, te = split == "train", split == "test"
    y = [r["cls"] for r in records]
    out = {"method": f"nearest class centroid on a {HIST_BINS}x{HIST_BINS}x{HIST_BINS} RGB histogram, fit on train images",
           "zeroshot_test_accuracy": centroid_accuracy(hists[tr], [v for v, m in zip(y, tr) if m],
                                                       hists[te], [v for v, m in zip(y, te) if m])}
    tum = np.array([r["cls"] == "TUM" for r in records])
    tum_test = tum & np.isin(split, ["test", "test_qa"])
    for key in ("grade", "mitoses"):
        ytr = [r["attrs"][key] for r, m in zip(records, tum & tr) if m]
        yte = [r["attrs"][key] for r, m in zip(records, tum_test) if m]
        if len(set(ytr)) > 1 and yte:
            out[f"tumour_{key}_accuracy"] = centroid_accuracy(hists[tum & tr], ytr, hists[tum_test], yte)
            out[f"tumour_{key}_majority"] = max(yte.count(v) for v in set(yte)) / len(yte)
    return out


def contact_sheet(records, out, size, path, per_row=8):
    """A grid of train tiles, one labelled row per class plus low / high grade tumour rows."""
    rows = [(c, lambda r, c=c: r["cls"] == c) for c in CLASSES]
    rows += [(f"TUM {g} grade", lambda r, g=g: r["cls"] == "TUM" and r["attrs"]["grade"] == g) for g in ("low", "high")]
    scale = max(1, 128 // size)
    cell, label_w = size * scale, 120
    sheet = Image.new("RGB", (label_w + per_row * cell, len(rows) * cell), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    train = [r for r in records if r["split"] == "train"]
    for i, (name, keep) in enumerate(rows):
        draw.text((6, i * cell + cell // 2 - 6), name, fill="black", font=font)
        for j, r in enumerate([r for r in train if keep(r)][:per_row]):
            tile = Image.open(os.path.join(out, r["image"])).convert("RGB").resize((cell, cell), Image.Resampling.NEAREST)
            sheet.paste(tile, (label_w + j * cell, i * cell))
    sheet.save(path, format="PNG", optimize=False, compress_level=6)


# -----------------------------------------------------------------------------
# text manifests

TUM_TYPES = ("tissue", "grade", "mitoses", "glands", "pleomorphism")
TUM_TYPE_P = (0.1, 0.3, 0.3, 0.15, 0.15)
YESNO_TYPES = ("tissue", "grade", "mitoses", "glands", "necrosis", "mucin")


def _balanced(rng, n, values):
    """n values, each used equally often (up to one), in random order."""
    return [values[i] for i in rng.permutation(np.arange(n) % len(values))]


def _pick_type(rng, cls, kind, attributes_only=False):
    if cls != "TUM":
        return "tissue"
    if attributes_only:  # a tumour attribute, never the tissue, all equally often
        types = [t for t in (YESNO_TYPES if kind == "yesno" else TUM_TYPES) if t != "tissue"]
        return types[int(rng.integers(len(types)))]
    if kind == "yesno":
        return YESNO_TYPES[int(rng.integers(len(YESNO_TYPES)))]
    return TUM_TYPES[rng.choice(len(TUM_TYPES), p=TUM_TYPE_P)]


def question_for(rng, r, kind, pos, target, attributes_only=False):
    """One question about record r of the given kind; yes/no questions hit the target answer."""
    cls, attrs = r["cls"], r["attrs"]
    qtype = _pick_type(rng, cls, kind, attributes_only)
    q = T.ask(rng, qtype, kind, cls, attrs, target=target, pos=pos)
    if kind == "yesno" and q["answer"] != target:   # tissue and grade questions can always hit the target
        fallback = "grade" if attributes_only else ["tissue", "grade"][int(rng.integers(2)) if cls == "TUM" else 0]
        q = T.ask(rng, fallback, kind, cls, attrs, target=target)
    return q


def caption_rows(rng, records, split, n_per_image):
    return [{"image": r["image"], "caption": T.caption(rng, r["cls"], r["attrs"])}
            for r in records if r["split"] == split for _ in range(n_per_image)]


DESCRIBE = ["Describe this H&E tile in detail.", "What do you see in this image? Describe the tissue and its features.",
            "Give a pathology description of this tile."]


def sft_rows(rng, records, tasks=("mcq", "description", "reasoning", "yesno"), p=(0.35, 0.15, 0.25, 0.25),
             attributes_only=False):
    """One conversation per record: MCQ, description, reasoning or yes/no; short/medium/long chains.
    attributes_only: every question asks about a tumour attribute, never the tissue."""
    tasks = rng.choice(list(tasks), size=len(records), p=list(p))
    pos = iter(_balanced(rng, int((tasks == "mcq").sum()), [0, 1, 2, 3]))
    target = iter(_balanced(rng, int((tasks == "yesno").sum()), ["yes", "no"]))
    rows = []
    for r, task in zip(records, tasks):
        length = str(rng.choice(["short", "medium", "long"], p=[0.1, 0.4, 0.5] if task == "reasoning" else [0.35, 0.35, 0.3]))
        if task == "description":
            question, options = T.pick(rng, DESCRIBE), None
            think = T.description_chain(rng, r["cls"], r["attrs"], length)
            answer = T.caption(rng, r["cls"], r["attrs"], detailed=True)
        else:
            kind = {"mcq": "mcq", "reasoning": "short", "yesno": "yesno"}[task]
            q = question_for(rng, r, kind, next(pos) if kind == "mcq" else 0, next(target) if kind == "yesno" else "yes",
                             attributes_only)
            question, options, answer = q["question"], q["options"], q["answer"]
            think = T.chain(rng, q, r["cls"], r["attrs"], length)
        rows.append(conversation(r["image"], question, options, think, answer))
    return rows


def conversation(image, question, options, think, answer):
    """One SFT row: system prompt, the question about the image, the reply with its chain and answer."""
    return {"messages": [{"role": "system", "content": SYSTEM_PROMPT},
                         {"role": "user", "content": format_question(question, options)},
                         {"role": "assistant", "content": f"<think>{think}</think><answer>{answer}</answer>"}],
            "images": [image]}


def tumour_sft_rows(rng, records, per_tumour):
    """per_tumour more conversations per train tumour, each asking about an attribute (MCQ, reasoning or
    yes/no), so SFT sees the attribute questions as often as the tissue ones."""
    tumours = [r for r in records if r["split"] == "train" and r["cls"] == "TUM" for _ in range(per_tumour)]
    return sft_rows(rng, tumours, tasks=("mcq", "reasoning", "yesno"), p=(0.5, 0.25, 0.25), attributes_only=True)


def tissue_tumour_rows(rng, records):
    """(1.5) One tissue MCQ per train tumour, its chain in the short form (the tissue, then the walk). Not
    SFT data: RL's PPO-ptx term mixes them in (speedrun.sh, train_rl.py --ptx_file). RL trains mostly on the
    tumour questions, whose long chains list the findings after the tissue, and carries that form over to
    the tissue questions on the same tiles, where the walk then checks the options against the last finding
    listed; in the seed-0 world's sft_train.jsonl they are 22 rows of 4,000, too few for ptx to hold their form."""
    tumours = [r for r in records if r["split"] == "train" and r["cls"] == "TUM"]
    rows = []
    for r, pos in zip(tumours, _balanced(rng, len(tumours), [0, 1, 2, 3])):
        q = T.ask(rng, "tissue", "mcq", r["cls"], r["attrs"], pos=pos)
        think = T.chain(rng, q, r["cls"], r["attrs"], "short")
        rows.append(conversation(r["image"], q["question"], q["options"], think, q["answer"]))
    return rows


def findings_rows(rng, records, per_tumour):
    return [{"image": r["image"], "caption": T.findings_caption(rng, r["attrs"])}
            for r in records if r["split"] == "train" and r["cls"] == "TUM" for _ in range(per_tumour)]


def qa_rows(rng, chosen, fields):
    """Answer-only questions for (record, kind) pairs; MCQ letters and yes/no answers balanced."""
    pos = iter(_balanced(rng, sum(k == "mcq" for _, k in chosen), [0, 1, 2, 3]))
    target = iter(_balanced(rng, sum(k == "yesno" for _, k in chosen), ["yes", "no"]))
    rows = []
    for r, kind in chosen:
        q = question_for(rng, r, kind, next(pos) if kind == "mcq" else 0, next(target) if kind == "yesno" else "yes")
        row = {"image": r["image"], "question": q["question"], "options": q["options"], "answer": q["answer"],
               "kind": kind, "type": q["type"], "answer_type": "OPEN" if kind == "short" else "CLOSED"}
        rows.append({k: row[k] for k in fields})
    return rows


def rl_pairs(rng, records, per_image):
    """(record, kind) for RL: per_image questions per train image, kinds mcq / yesno / short drawn 40/30/30."""
    train = [r for r in records if r["split"] == "train"]
    kinds = rng.choice(["mcq", "yesno", "short"], size=(len(train), per_image), p=[0.4, 0.3, 0.3])
    return [(r, str(k)) for r, ks in zip(train, kinds) for k in ks]


ZS_TEMPLATES = ["CLASSNAME.", "an H&E image of CLASSNAME.", "an H&E image showing CLASSNAME.",
                "a photomicrograph of CLASSNAME.", "a histopathology tile of CLASSNAME.", "a microscopic view of CLASSNAME.",
                "this tile shows CLASSNAME.", "CLASSNAME, H&E stain.", "an example of CLASSNAME.", "presence of CLASSNAME."]


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")


def write_json(path, obj):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(obj, sort_keys=True, indent=2) + "\n")


def training_texts(files):
    """Every text a training stage reads (stage 0's reading rows, stage 1's captions and textbook, SFT's
    conversations): the reading probe's names are word pairs that stand side by side in none of them."""
    texts = [r["caption"] for name in ("captions_train.jsonl", "captions_findings.jsonl") for r in files[name]]
    texts += [r["text"] for r in files["textbook.jsonl"]]
    return texts + [m["content"] for name in ("sft_train.jsonl", "sft_tumour.jsonl", "reading_train.jsonl",
                                              "reading_near.jsonl") for r in files[name] for m in r["messages"]]


def write_text(out, cfg, records):
    """Every manifest; returns {file name: rows} for the meta and the tokenizer."""
    streams = {name: np.random.default_rng([cfg.seed, 2, i]) for i, name in enumerate(
        ["captions_train", "captions_val", "textbook", "retrieval", "sft", "rl", "mcq", "vqa", "reading", "probe",
         "reading_near", "findings", "sft_tumour", "probe_near", "tissue_tumour"])}
    qa_test = [r for r in records if r["split"] == "test_qa"]
    files = {
        "captions_train.jsonl": caption_rows(streams["captions_train"], records, "train", cfg.captions_per_image),
        "captions_val.jsonl": caption_rows(streams["captions_val"], records, "val", cfg.captions_per_image),
        "textbook.jsonl": [{"text": t} for t in T.textbook(streams["textbook"], cfg.textbook_examples)],
        "zeroshot_test.jsonl": [{"image": r["image"], "label": r["cls"]} for r in records if r["split"] == "test"],
        "retrieval_test.jsonl": [{"image": r["image"], "caption": T.caption(streams["retrieval"], r["cls"], r["attrs"], detailed=True)}
                                 for r in records if r["split"] == "test"],
        "sft_train.jsonl": sft_rows(streams["sft"], [r for r in records if r["split"] == "train"]),
        "rl_train.jsonl": qa_rows(streams["rl"], rl_pairs(streams["rl"], records, cfg.rl_per_image),
                                  ("image", "question", "options", "answer", "kind", "type")),
        "mcq_test.jsonl": qa_rows(streams["mcq"], [(r, "mcq") for r in qa_test],
                                  ("image", "question", "options", "answer", "type")),
        "vqa_test.jsonl": qa_rows(streams["vqa"], [(r, k) for r in qa_test for k in ("yesno", "short")],
                                  ("image", "question", "answer", "answer_type", "type")),
        "reading_train.jsonl": [row for level in R.LEVELS
                                for row in R.reading_rows(streams["reading"], cfg.reading_per_level, level)],
        "reading_near.jsonl": [row for level in R.LEVELS[1:]
                               for row in R.near_rows(streams["reading_near"], cfg.reading_near_per_level, level)],
        "captions_findings.jsonl": findings_rows(streams["findings"], records, cfg.findings_per_tumour),
        "sft_tumour.jsonl": tumour_sft_rows(streams["sft_tumour"], records, cfg.sft_per_tumour),
        "sft_tissue_tumour.jsonl": tissue_tumour_rows(streams["tissue_tumour"], records),
    }
    texts = training_texts(files)
    files["reading_probe.jsonl"] = (R.probe_rows(streams["probe"], cfg.reading_probe, texts)
                                    + R.near_probe_rows(streams["probe_near"], cfg.reading_probe_near, texts))
    for name, rows in files.items():
        write_jsonl(os.path.join(out, name), rows)
    prompts = {"0": {"classnames": {c: T.CLASS_INFO[c][1] for c in CLASSES}, "templates": ZS_TEMPLATES}}
    write_json(os.path.join(out, "zeroshot_prompts.json"), prompts)
    return files


# -----------------------------------------------------------------------------
# meta

def chance_levels(files):
    mcq = files["mcq_test.jsonl"]
    vqa = files["vqa_test.jsonl"]
    n_ret = len(files["retrieval_test.jsonl"])
    closed = [r["answer"] for r in vqa if r["answer_type"] == "CLOSED"]
    open_ = [r for r in vqa if r["answer_type"] == "OPEN"]
    by_type = {}
    for r in open_:
        by_type.setdefault(r["type"], []).append(r["answer"])
    open_majority = sum(max(a.count(v) for v in set(a)) for a in by_type.values()) / max(1, len(open_))
    letters = {k: sum(r["answer"] == k for r in mcq) for k in T.LETTERS}
    return {
        "zeroshot_test": 1 / len(CLASSES),
        "retrieval_test": {f"R@{k}": min(1.0, k / max(1, n_ret)) for k in (1, 5, 10)},
        "mcq_test": 0.25, "mcq_test_answer_letters": letters,
        "vqa_test_closed": 0.5, "vqa_test_closed_yes_fraction": closed.count("yes") / max(1, len(closed)),
        "vqa_test_open_majority_per_type": open_majority,
    }


def build_meta(cfg, records, files, baselines):
    splits = {s: sum(r["split"] == s for r in records) for s in ("train", "val", "test", "test_qa")}
    return {
        "generator": "data/synthpath/prepare.py", "version": VERSION, "seed": cfg.seed, "image_size": cfg.image_size,
        "field_of_view_um": 112,
        "classes": [{"label": c, "name": T.NAME[c], "synonyms": T.CLASS_INFO[c][1]} for c in CLASSES],
        "attributes": {
            "nuclear_density": list(LEVELS), "nuclear_size": list(SIZES), "pleomorphism": list(PLEO),
            "gland_formation": list(GLANDS), "mitoses": list(range(MAX_MITOSES + 1)),
            "necrosis": [False, True], "mucin": [False, True], "grade": ["low", "high"]},
        "grade_rule": T.GRADE_RULE,
        "short_answers": {"tissue": [T.NAME[c] for c in CLASSES], "grade": ["low", "high"],
                          "mitoses": [str(i) for i in range(MAX_MITOSES + 1)], "glands": list(GLANDS),
                          "pleomorphism": list(PLEO), "yesno": ["yes", "no"], "mcq": list(T.LETTERS)},
        "splits": {"images": splits, "train_images": "captions_train sft_train rl_train", "val_images": "captions_val",
                   "test_images": "zeroshot_test retrieval_test (split test); mcq_test vqa_test (split test_qa)"},
        "class_counts": {s: {c: sum(r["split"] == s and r["cls"] == c for r in records) for c in CLASSES} for s in splits},
        "files": {name: len(rows) for name, rows in sorted(files.items())},
        "chance": chance_levels(files),
        "baselines": {"colour_histogram": baselines},
    }


def fit_tokenizer(out, files, vocab_size):
    """BPE on the captions, textbook and SFT conversations. The files 1.2 added use the same words and
    are left out, so the tokenizer (and the base LM trained with it) is the one 1.1 wrote."""
    from nanopatho.tokenizer import Tokenizer   # lazy: only this step needs HF tokenizers
    texts = [r["caption"] for r in files["captions_train.jsonl"]] + [r["text"] for r in files["textbook.jsonl"]]
    texts += [m["content"] for r in files["sft_train.jsonl"] for m in r["messages"]]
    Tokenizer.train(texts, vocab_size).save(os.path.join(out, "tokenizer.json"))


def prepare(out_dir, seed=0, image_size=64, n_train=4000, n_val=300, n_test=450, n_test_qa=450, vocab_size=4096,
            train_tokenizer=True, progress=True, workers=2, **kwargs):
    """Render the world into out_dir and write every manifest -> the meta dict (also in meta.json)."""
    cfg = Config(out=out_dir, seed=seed, image_size=image_size, n_train=n_train, n_val=n_val, n_test=n_test,
                 n_test_qa=n_test_qa, vocab_size=vocab_size, no_tokenizer=not train_tokenizer, workers=workers, **kwargs)
    if image_size % 16 or image_size < 16:
        raise ValueError(f"--image_size must be a positive multiple of 16, got {image_size}")
    if n_test < len(CLASSES) or n_train < len(CLASSES):
        raise ValueError(f"--n_test and --n_train must be at least {len(CLASSES)} (one image per class)")
    os.makedirs(out_dir, exist_ok=True)
    records = plan_images(cfg)
    hists = render_all(records, out_dir, cfg, progress)
    files = write_text(out_dir, cfg, records)
    meta = build_meta(cfg, records, files, colour_baselines(records, hists))
    write_json(os.path.join(out_dir, "meta.json"), meta)
    contact_sheet(records, out_dir, image_size, os.path.join(out_dir, "contact_sheet.png"))
    if train_tokenizer:
        fit_tokenizer(out_dir, files, vocab_size)
    return meta


def stale(out_dir):
    """Why out_dir must be (re)generated before a speedrun, or "" when it holds this generator's world: a
    missing meta.json or tokenizer.json, or a world written by another VERSION (its pixels or files differ)."""
    meta_path = os.path.join(out_dir, "meta.json")
    if not os.path.exists(meta_path):
        return f"{meta_path}: missing"
    with open(meta_path) as f:
        have = json.load(f).get("version", "no version")
    if have != VERSION:
        return f"{out_dir} holds SynthPath {have}, this generator writes {VERSION}"
    if not os.path.exists(os.path.join(out_dir, "tokenizer.json")):
        return f"{os.path.join(out_dir, 'tokenizer.json')}: missing"
    return ""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, default in Config.__dataclass_fields__.items():
        if default.type is bool or default.type == "bool":
            p.add_argument(f"--{name}", action="store_true", help=f"(default {default.default})")
        else:
            p.add_argument(f"--{name}", type=type(default.default), default=default.default, help=f"(default {default.default})")
    a = vars(p.parse_args(argv))
    meta = prepare(a.pop("out"), train_tokenizer=not a.pop("no_tokenizer"), **a)
    b = meta["baselines"]["colour_histogram"]
    print(f"images: {meta['splits']['images']}  colour-histogram baseline on zeroshot_test: "
          f"{b['zeroshot_test_accuracy']:.3f} (chance {meta['chance']['zeroshot_test']:.3f})")


if __name__ == "__main__":
    main()
