"""Evaluation: zero-shot classification, retrieval, linear probe (PathoCLIP); MCQ and VQA (VLM).

Two layers. Pure metric functions (no model, torch/numpy only, the tested reference):
    build_zeroshot_classifier, zeroshot_metrics, retrieval_metrics, linear_probe,
    mcq_metrics (+ walk_metrics: reading vs concluding), closed_vqa_metrics, open_vqa_metrics
and model-level functions that train scripts and speedrun call in-process:
    eval_clip(model, tokenizer, data_dir, tasks)  -> {"zeroshot": {...}, "retrieval": {...}, "linear_probe": {...}}
    eval_vlm(model, tokenizer, data_dir, tasks)   -> {"mcq": {...}, "vqa_closed": {...}, "vqa_open": {...}}
Every task dict holds flat scalar metrics plus "chance": {metric: chance level} with the same keys.

Command line (writes DIR/eval.json, or --out, and prints a table with chance beside every number):
    python -m nanopatho.evaluate --ckpt out/clip --data data/synthpath --tasks zeroshot,retrieval,linear_probe
    python -m nanopatho.evaluate --ckpt out/sft  --data data/synthpath --tasks mcq,vqa --limit 200

Files read from --data (SynthPath names; real data in the same form works):
    zeroshot_prompts.json (CONCH format), zeroshot_test.jsonl {"image","label"},
    zeroshot_train.jsonl (optional labelled pool for the linear probe, else zeroshot_test is split in half),
    retrieval_test.jsonl {"image","caption"}, mcq_test.jsonl {"image","question","options","answer"},
    vqa_test.jsonl {"image","question","answer","answer_type": CLOSED|OPEN}.
"""

import argparse
import json
import os
import re
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

from nanopatho.checkpoint import load as load_checkpoint
from nanopatho.data import DataError, load_records, pad_sequences, preload_images, to_float
from nanopatho.prompts import format_question
from nanopatho.rewards import extract_answer, format_reward, normalize_short, parse_choice, parse_yesno

CLIP_TASKS = ("zeroshot", "retrieval", "linear_probe")
VLM_TASKS = ("mcq", "vqa")

# -----------------------------------------------------------------------------
# zero-shot classification


def build_zeroshot_classifier(encode_text_fn, prompts):
    """Class names and one unit-norm weight row per class from a CONCH-format prompt dict.

    prompts: {"0": {"classnames": {label: [synonym, ...]}, "templates": ["... CLASSNAME ..."]}} (or the inner dict).
    encode_text_fn(list[str]) -> (M, D) features. Every synonym x template is encoded and normalised,
    the class weight is their mean, renormalised: w_c = normalise(mean_{s,t} normalise(f(t[s]))).
    """
    entry = prompts["0"] if "0" in prompts else prompts
    templates = entry["templates"]
    class_names, weights = [], []
    for name, synonyms in entry["classnames"].items():
        texts = [t.replace("CLASSNAME", s) for s in synonyms for t in templates]
        feats = F.normalize(torch.as_tensor(encode_text_fn(texts)).float(), dim=-1)  # (S*T, D)
        weights.append(F.normalize(feats.mean(dim=0), dim=-1))  # (D,)
        class_names.append(name)
    return class_names, torch.stack(weights)  # (C, D)


def confusion_matrix(preds, labels, num_classes):
    """(C, C) counts, rows = true class, columns = predicted class."""
    idx = torch.as_tensor(labels).long() * num_classes + torch.as_tensor(preds).long()
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def zeroshot_metrics(logits_or_preds, labels, class_names):
    """Accuracy, balanced accuracy, weighted F1, per-class accuracy, confusion matrix, chance levels.

    logits_or_preds: (N, C) scores or (N,) predicted indices; labels: (N,) true indices.
    balanced accuracy = mean recall over classes present in labels (sklearn's definition);
    F1_c = 2 P_c R_c / (P_c + R_c) (0 when P_c + R_c = 0), weighted by true-class support.
    Chance = a uniform random guess over the C classes: accuracy = balanced accuracy = 1/C,
    and in expectation P_c = p_c, R_c = 1/C, so weighted F1 = sum_c p_c * 2 p_c / (1 + C p_c).
    """
    preds = torch.as_tensor(logits_or_preds)
    preds = preds.argmax(dim=-1) if preds.dim() == 2 else preds.long()  # (N,)
    labels = torch.as_tensor(labels).long()  # (N,)
    C = len(class_names)
    cm = confusion_matrix(preds, labels, C).double()  # (C, C)
    support, predicted, tp = cm.sum(1), cm.sum(0), cm.diag()
    present = support > 0
    recall = tp / support.clamp(min=1)
    precision = tp / predicted.clamp(min=1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), 0.0)
    prior = support / support.sum()
    return {
        "n": int(labels.numel()),
        "accuracy": float(tp.sum() / support.sum()),
        "balanced_accuracy": float(recall[present].mean()),
        "weighted_f1": float((prior * f1).sum()),
        "per_class_accuracy": {n: (float(recall[i]) if present[i] else None) for i, n in enumerate(class_names)},
        "confusion": cm.long().tolist(),
        "class_names": list(class_names),
        "chance": {
            "accuracy": 1.0 / C,
            "balanced_accuracy": 1.0 / C,
            "weighted_f1": float((prior * 2 * prior / (1 + C * prior)).sum()),
        },
        "majority_accuracy": float(prior.max()),
    }


# -----------------------------------------------------------------------------
# cross-modal retrieval


def gt_ranks(sim):
    """1-based rank of the diagonal (ground-truth) entry of each row of a square score matrix.

    Tie rule (pessimistic, order-independent): rank = 1 + #{j != i : sim[i, j] >= sim[i, i]},
    so a candidate tied with the ground truth counts against it, and a constant matrix ranks every
    ground truth last (N) instead of giving free hits.
    """
    N = sim.shape[0]
    gt = sim.diagonal().unsqueeze(1)  # (N, 1)
    beats = (sim >= gt) & ~torch.eye(N, dtype=torch.bool, device=sim.device)  # (N, N)
    return beats.sum(dim=1) + 1  # (N,)


def retrieval_metrics(sim, ks=(1, 5, 10)):
    """Image->text and text->image R@K and median rank; sim (N_img, N_txt), image i matches text i.

    R@K = fraction of queries whose ground truth has rank <= K (ranks from gt_ranks, ties pessimistic);
    median rank is numpy's median (mean of the two middle ranks when N is even).
    Chance (random scores): R@K = min(K, N)/N, median rank = (N + 1)/2.
    """
    sim = torch.as_tensor(sim).float()
    assert sim.dim() == 2 and sim.shape[0] == sim.shape[1], f"need a square (N, N) similarity, got {tuple(sim.shape)}"
    N = sim.shape[0]
    out, chance = {"n": N}, {}
    for name, s in (("i2t", sim), ("t2i", sim.T)):
        ranks = gt_ranks(s).cpu().numpy()  # (N,)
        for k in ks:
            out[f"{name}_R@{k}"] = float((ranks <= k).mean())
            chance[f"{name}_R@{k}"] = min(k, N) / N
        out[f"{name}_median_rank"] = float(np.median(ranks))
        chance[f"{name}_median_rank"] = (N + 1) / 2
    out["chance"] = chance
    return out


# -----------------------------------------------------------------------------
# few-shot linear probe


def fit_logistic_regression(feats, labels, num_classes, weight_decay=1e-4, max_iter=200):
    """Multinomial logistic regression by full-batch L-BFGS (float64, deterministic on CPU).

    Minimises mean_i CE(W x_i + b, y_i) + weight_decay/2 * ||W||^2. Returns (W (D, C), b (C,)).
    """
    x = feats.double()  # (N, D)
    y = labels.long()  # (N,)
    W = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ W + b, y) + 0.5 * weight_decay * W.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach(), b.detach()


def sample_shots(labels, k, generator):
    """Indices of k examples per class (all of them when a class has fewer), drawn without replacement."""
    picked = []
    for c in torch.unique(labels).tolist():
        idx = (labels == c).nonzero().squeeze(1)
        picked.append(idx[torch.randperm(idx.numel(), generator=generator)[:k]])
    return torch.cat(picked)


def linear_probe(train_feats, train_labels, test_feats, test_labels, shots=(1, 2, 4, 8, 16), draws=5, seed=0,
                 weight_decay=1e-4):
    """Few-shot linear probe on frozen features: {k: (mean test accuracy, std)} over `draws` random draws.

    Features are L2-normalised. For each k and draw, k training examples per class are drawn with a
    generator seeded by (seed, k, draw), a logistic regression is fitted, and test accuracy measured.
    std is the sample standard deviation over draws (0 for one draw). Chance = 1 / num_classes.
    """
    train_x = F.normalize(torch.as_tensor(train_feats).double(), dim=-1)  # (N, D)
    test_x = F.normalize(torch.as_tensor(test_feats).double(), dim=-1)  # (M, D)
    train_y, test_y = torch.as_tensor(train_labels).long(), torch.as_tensor(test_labels).long()
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    results = {}
    for k in shots:
        accs = []
        for d in range(draws):
            g = torch.Generator().manual_seed(seed * 1_000_003 + k * 1_009 + d)
            idx = sample_shots(train_y, k, g)
            W, b = fit_logistic_regression(train_x[idx], train_y[idx], num_classes, weight_decay)
            accs.append(float(((test_x @ W + b).argmax(-1) == test_y).double().mean()))
        results[k] = (float(np.mean(accs)), float(np.std(accs, ddof=1)) if draws > 1 else 0.0)
    return results


# -----------------------------------------------------------------------------
# VLM answers: MCQ, closed VQA, open VQA

_END_MARKERS = ("<|im_end|>", "<|eos|>", "<|pad|>")


def strip_end_markers(text):
    """Generated text up to the first chat end / eos / pad marker."""
    cut = min([text.find(m) for m in _END_MARKERS if m in text], default=len(text))
    return text[:cut].strip()


def _length_stats(responses, lengths):
    """Mean response length: in tokens when lengths are given, else in whitespace words."""
    if lengths is not None:
        return (float(np.mean(lengths)) if len(lengths) else 0.0), "tokens"
    return (float(np.mean([len(r.split()) for r in responses])) if responses else 0.0), "words"


def _common(responses, answers, preds, lengths):
    """Fields shared by every VLM task: n, unparseable count, format rate, mean length."""
    mean_len, unit = _length_stats(responses, lengths)
    return {"n": len(answers), "unparseable": sum(p is None for p in preds),
            "format_rate": float(np.mean([format_reward(r) for r in responses])) if responses else 0.0,
            "mean_response_length": mean_len, "length_unit": unit}


def mcq_metrics(responses, answers, num_options=None, lengths=None, types=None, options=None):
    """MCQ accuracy with the letter read from <answer>...</answer> (rewards.parse_choice).

    A response without a closed answer block, or whose answer names no single letter, is wrong and
    counted in "unparseable" (never replaced by a guess). The gold may be "B" or "B) text".
    Chance = mean over items of 1/num_options (omitted when num_options is None).
    types (one label per item, e.g. SynthPath's "tissue" / "mitoses") adds "by_type":
    {type: {"accuracy", "n", "chance"}}, so a total can be read as what it is made of.
    options (each item's "A) text" list) adds "walk": walk_metrics of the replies, and by_type's
    "states_gold" (see walk_metrics).
    """
    assert len(responses) == len(answers), "one response per answer"
    preds = [None if a is None else parse_choice(a) for a in map(extract_answer, responses)]
    correct = [p is not None and p == parse_choice(str(g)) for p, g in zip(preds, answers)]
    out = {"accuracy": float(np.mean(correct)) if answers else 0.0, **_common(responses, answers, preds, lengths),
           "chance": {}}
    if num_options is not None:
        out["chance"]["accuracy"] = float(np.mean([1.0 / n for n in num_options]))
    walks = None
    if options is not None:
        walks = [read_walk(r, o, g) for r, o, g in zip(responses, options, answers)]
        out["walk"] = walk_metrics(walks, preds)
    if types is not None:
        assert len(types) == len(answers), "one type per answer"
        out["by_type"] = {}
        for t in sorted(set(types)):
            idx = [i for i, x in enumerate(types) if x == t]
            out["by_type"][t] = {"accuracy": float(np.mean([correct[i] for i in idx])), "n": len(idx),
                                 "chance": None if num_options is None else float(np.mean([1.0 / num_options[i] for i in idx]))}
            if walks is not None:
                by_walk = walk_metrics([walks[i] for i in idx], [preds[i] for i in idx])
                out["by_type"][t].update(states_gold=by_walk["states_gold"], position_gap=by_walk["position_gap"])
    return out


# -----------------------------------------------------------------------------
# the option walk: did a wrong MCQ reply misread its options, or conclude the wrong thing?

WALK_LINE = re.compile(r"^([A-Z])\) (.*): (yes|no)\.$", re.MULTILINE)  # "B) moderate pleomorphism: yes."


def read_walk(response, options, answer):
    """One reply's option walk, the form SynthPath's chains end with ("Checking the options:" then one
    "X) option text: yes." / "...: no." line per option, up to the first yes) -> dict:
    lines: [(letter, text as written, its true text or None)], stated / accepted: the text / letter of the
    first "yes" line or None, gold / gold_letter: the gold option's text / letter. options are "A) text"
    strings; answer "B" or "B) text"."""
    truth = {o[0]: o[3:] for o in options}
    lines = [(letter, text, truth.get(letter), verdict) for letter, text, verdict in WALK_LINE.findall(response)]
    stated, accepted = next(((text, letter) for letter, text, _, verdict in lines if verdict == "yes"), (None, None))
    gold_letter = parse_choice(str(answer)) or ""
    return {"lines": [(letter, text, true) for letter, text, true, _ in lines], "stated": stated,
            "accepted": accepted, "gold": truth.get(gold_letter), "gold_letter": gold_letter, "truth": truth}


def walk_metrics(walks, preds):
    """Separate reading from concluding in MCQ replies (walks from read_walk, preds the answer letters):
    walked:       share of replies with an option walk;
    copied:       share of walk lines whose option text is copied exactly (reading: copy);
    states_gold:  share of replies whose first "yes" names the gold option's text (what the reply concluded,
                  right or wrong: the perception and reasoning part);
    letter_follows: of the replies whose "yes" names one of the options' texts, the share whose answer letter
                  is that option's (reading: look the text up, give its letter);
    position_gap: how far the letters the replies accept are spread unlike the gold letters, the total
                  variation distance 1/2 sum_k |P(accepted = k) - P(gold = k)|: near 0 for a walk that checks
                  (it accepts where the gold stands, up to what it sees), large for one that counts lines
                  ("yes on the third line" against uniform gold letters: 0.75).
    A reply that states the gold text but answers another letter lost the point to reading, not to sight."""
    lines = [text == true for w in walks for _, text, true in w["lines"]]
    named = [(w, p) for w, p in zip(walks, preds) if w["stated"] in w["truth"].values()]
    follows = [p is not None and w["truth"].get(p) == w["stated"] for w, p in named]
    n = len(walks)
    return {"walked": sum(bool(w["lines"]) for w in walks) / n if n else 0.0,
            "copied": float(np.mean(lines)) if lines else None,
            "states_gold": sum(w["stated"] is not None and w["stated"] == w["gold"] for w in walks) / n if n else 0.0,
            "letter_follows": float(np.mean(follows)) if follows else None,
            "position_gap": position_gap([w["accepted"] for w in walks if w["accepted"]], [w["gold_letter"] for w in walks])}


def position_gap(accepted, gold):
    """Total variation distance between the letters accepted and the gold letters (None when none accepted)."""
    if not accepted or not gold:
        return None
    share = lambda xs, k: xs.count(k) / len(xs)  # noqa: E731
    return 0.5 * sum(abs(share(accepted, k) - share(gold, k)) for k in set(accepted) | set(gold))


def closed_answer_correct(pred, gold):
    """Whole-word match of a closed answer (pred = the extracted answer text, or None).

    A yes/no gold is compared with the first whole word yes|no of the prediction (rewards.parse_yesno,
    the rule RL is rewarded by): "No, it is benign" is "no", "know" and "I don't know" are neither.
    Any other gold needs the whole normalised answer to be equal: "not normal" is not "normal".
    """
    if pred is None:
        return False
    g = normalize_short(str(gold))
    return parse_yesno(pred) == g if g in ("yes", "no") else normalize_short(pred) == g


def closed_vqa_metrics(responses, answers, lengths=None):
    """Closed-question (yes/no) accuracy. Chance = 0.5 (a random yes/no); majority = most frequent gold.

    "unparseable" counts responses without an answer block and yes/no answers naming neither word.
    """
    assert len(responses) == len(answers), "one response per answer"
    preds = [extract_answer(r) for r in responses]
    correct = [closed_answer_correct(p, g) for p, g in zip(preds, answers)]
    # unparseable: no answer block, or a yes/no question answered with neither word
    preds = [None if p is None or (normalize_short(str(g)) in ("yes", "no") and parse_yesno(p) is None) else p
             for p, g in zip(preds, answers)]
    counts = Counter(normalize_short(str(a)) for a in answers)
    return {"accuracy": float(np.mean(correct)) if answers else 0.0, **_common(responses, answers, preds, lengths),
            "majority_accuracy": max(counts.values()) / len(answers) if answers else 0.0,
            "chance": {"accuracy": 0.5}}


def token_f1_recall(pred, gold):
    """(F1, recall) over normalised token multisets (SQuAD): P = overlap/|pred|, R = overlap/|gold|, F1 = 2PR/(P+R)."""
    p, g = normalize_short(pred).split(), normalize_short(gold).split()
    overlap = sum((Counter(p) & Counter(g)).values())
    if overlap == 0:
        return 0.0, 0.0
    precision, recall = overlap / len(p), overlap / len(g)
    return 2 * precision * recall / (precision + recall), recall


def _open_scores(preds, golds):
    em, f1, rec = [], [], []
    for p, g in zip(preds, golds):
        f, r = token_f1_recall(p or "", g)
        em.append(float(p is not None and normalize_short(p) == normalize_short(g)))
        f1.append(f)
        rec.append(r)
    return {k: float(np.mean(v)) if v else 0.0 for k, v in (("exact_match", em), ("f1", f1), ("recall", rec))}


def open_vqa_metrics(responses, answers, lengths=None):
    """Open-question exact match, token F1 and token recall (SQuAD-style normalisation); unparseable scores 0.

    Chance: the majority-answer baseline (always answer the most frequent gold answer), on each metric.
    """
    assert len(responses) == len(answers), "one response per answer"
    preds = [extract_answer(r) for r in responses]
    golds = [str(a) for a in answers]
    majority = Counter(normalize_short(g) for g in golds).most_common(1)[0][0] if golds else ""
    return {**_open_scores(preds, golds), **_common(responses, answers, preds, lengths),
            "chance": _open_scores([majority] * len(golds), golds)}


# -----------------------------------------------------------------------------
# model-level evaluation


def _autocast(device):
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _load(path, required, limit=None):
    items, _ = load_records(path, required=required)
    return items[:limit] if limit else items


@torch.no_grad()
def encode_images(model, images_u8, batch_size, device):
    """(N, D) L2-normalised image features, in batches."""
    feats = []
    for i in range(0, len(images_u8), batch_size):
        pixels = to_float(images_u8[i:i + batch_size]).to(device)  # (B, 3, H, W)
        with _autocast(device):
            feats.append(model.encode_image(pixels).float().cpu())  # (B, D)
    return torch.cat(feats)


def clip_text_ids(tokenizer, text, max_len):
    """CLIP text ids, as in training: bos + text + eos, cut to max_len with the eos kept."""
    return ([tokenizer.bos_id] + tokenizer.encode(text))[:max_len - 1] + [tokenizer.eos_id]


def tokenize_texts(tokenizer, texts, max_len):
    """Right-padded CLIP text ids of several texts -> (ids, attention_mask)."""
    return pad_sequences([clip_text_ids(tokenizer, t, max_len) for t in texts], tokenizer.pad_id, side="right")


@torch.no_grad()
def encode_texts(model, tokenizer, texts, batch_size, device):
    """(N, D) L2-normalised text features, in batches."""
    max_len = model.config.text.max_len
    feats = []
    for i in range(0, len(texts), batch_size):
        ids, mask = tokenize_texts(tokenizer, texts[i:i + batch_size], max_len)  # (B, T)
        with _autocast(device):
            feats.append(model.encode_text(ids.to(device), mask.to(device)).float().cpu())  # (B, D)
    return torch.cat(feats)


def _labelled_features(path, class_names, encode, size, limit):
    """(features (N, D), class indices (N,)) of a {"image", "label"} JSONL file."""
    items = _load(path, ("image", "label"), limit)
    bad = [it for it in items if str(it["label"]) not in class_names]
    if bad:
        raise DataError(f"{bad[0]['source']}: label {bad[0]['label']!r} is not a class of zeroshot_prompts.json")
    images_u8, items, _ = preload_images(items, size, desc=os.path.basename(path))  # (N, 3, S, S) uint8
    return encode(images_u8), torch.tensor([class_names.index(str(it["label"])) for it in items])


def _probe_split(test_x, test_y, train_path, load_train, seed):
    """(train_feats, train_labels, test_feats, test_labels) for the linear probe.

    Uses zeroshot_train.jsonl as the labelled pool when present; otherwise the zero-shot test set is
    split in half per class with a seeded permutation (pool / test), so the probe never tests on its pool.
    """
    if os.path.exists(train_path):
        return (*load_train(train_path), test_x, test_y)
    g = torch.Generator().manual_seed(seed)
    pool = torch.zeros(len(test_y), dtype=torch.bool)
    for c in torch.unique(test_y).tolist():
        idx = (test_y == c).nonzero().squeeze(1)
        pool[idx[torch.randperm(idx.numel(), generator=g)[: idx.numel() // 2]]] = True
    return test_x[pool], test_y[pool], test_x[~pool], test_y[~pool]


def eval_clip(model, tokenizer, data_dir, tasks=CLIP_TASKS, *, batch_size=64, device="cpu", limit=None,
              shots=(1, 2, 4, 8, 16), draws=5, seed=0):
    """Zero-shot classification, retrieval and few-shot linear probe of a PathoCLIP model."""
    model.eval()
    size = model.config.vision.image_size
    encode = lambda u8: encode_images(model, u8, batch_size, device)  # noqa: E731
    results = {}
    if "zeroshot" in tasks or "linear_probe" in tasks:
        with open(os.path.join(data_dir, "zeroshot_prompts.json")) as f:
            prompts = json.load(f)
        class_names, W = build_zeroshot_classifier(
            lambda texts: encode_texts(model, tokenizer, texts, batch_size, device), prompts)  # (C, D)
        labelled = lambda path: _labelled_features(path, class_names, encode, size, limit)  # noqa: E731
        test_x, test_y = labelled(os.path.join(data_dir, "zeroshot_test.jsonl"))  # (N, D), (N,)
    if "zeroshot" in tasks:
        results["zeroshot"] = zeroshot_metrics(test_x @ W.T, test_y, class_names)  # logits (N, C)
    if "retrieval" in tasks:
        items = _load(os.path.join(data_dir, "retrieval_test.jsonl"), ("image", "caption"), limit)
        images_u8, items, _ = preload_images(items, size, desc="retrieval_test.jsonl")
        img_f = encode(images_u8)  # (N, D)
        txt_f = encode_texts(model, tokenizer, [it["caption"] for it in items], batch_size, device)  # (N, D)
        results["retrieval"] = retrieval_metrics(img_f @ txt_f.T)
    if "linear_probe" in tasks:
        split = _probe_split(test_x, test_y, os.path.join(data_dir, "zeroshot_train.jsonl"), labelled, seed)
        curve = linear_probe(*split, shots=shots, draws=draws, seed=seed)
        # a k larger than pool_min_per_class uses every pool example of the smaller classes
        out = {"n_pool": len(split[1]), "n_test": len(split[3]), "draws": draws,
               "pool_min_per_class": int(torch.bincount(split[1]).min()), "chance": {}}
        for k, (mean, std) in curve.items():
            out[f"{k}shot_acc"], out[f"{k}shot_std"] = mean, std
            out["chance"][f"{k}shot_acc"] = 1.0 / len(class_names)
        results["linear_probe"] = out
    return results


def decode_response(tokenizer, ids, mask):
    """(text, length in tokens) of one generated row; the stop token is not counted in the length."""
    toks = ids[mask].tolist()
    stops = {tokenizer.im_end_id, tokenizer.eos_id}
    n = len(toks) - (1 if toks and toks[-1] in stops else 0)
    return strip_end_markers(tokenizer.decode(toks, skip_special=False)), n


def generation_order(items, prompts):
    """The order items are batched in: by question type and answer type, then prompt length. A batch
    decodes until its longest reply ends, so short-reply questions (tissue names) batched apart from long
    chains (tumour grades) finish early; like prompt lengths need less left padding."""
    return sorted(range(len(items)), key=lambda i: (str(items[i].get("type", "")), str(items[i].get("answer_type", "")),
                                                    len(prompts[i])))


@torch.no_grad()
def generate_answers(model, tokenizer, items, images_u8, *, batch_size, device, max_new_tokens):
    """Greedy responses to items {"question", "options"?}, in the items' order: (texts, lengths in tokens).
    Batches are formed in generation_order; each row's greedy reply does not depend on its batch."""
    prompts = [tokenizer.render_prompt(format_question(it["question"], it.get("options")), model.n_image_tokens)
               for it in items]
    texts, lengths = [None] * len(items), [None] * len(items)
    order = generation_order(items, prompts)
    for i in range(0, len(order), batch_size):
        rows = order[i:i + batch_size]
        ids, mask = pad_sequences([prompts[r] for r in rows], tokenizer.pad_id, side="left")  # (B, T), (B, T)
        pixels = to_float(images_u8[rows]).to(device)  # (B, 3, H, W)
        with _autocast(device):
            out = model.generate(ids.to(device), pixels, mask.to(device), max_new_tokens=max_new_tokens,
                                 temperature=0.0, stop_ids=(tokenizer.im_end_id, tokenizer.eos_id),
                                 pad_id=tokenizer.pad_id)
        for r, row_ids, row_mask in zip(rows, out.ids.cpu(), out.mask.cpu()):  # (N,), (N,)
            texts[r], lengths[r] = decode_response(tokenizer, row_ids, row_mask)
    return texts, lengths


def eval_vlm(model, tokenizer, data_dir, tasks=VLM_TASKS, *, batch_size=16, device="cpu", limit=None,
             max_new_tokens=256, return_responses=False):
    """MCQ, closed-VQA and open-VQA scores of a VLM with greedy decoding."""
    model.eval()
    size = model.config.vision.image_size
    gen = dict(batch_size=batch_size, device=device, max_new_tokens=max_new_tokens)
    results = {}
    if "mcq" in tasks:
        items = _load(os.path.join(data_dir, "mcq_test.jsonl"), ("image", "question", "options", "answer"), limit)
        images_u8, items, _ = preload_images(items, size, desc="mcq_test.jsonl")
        texts, lengths = generate_answers(model, tokenizer, items, images_u8, **gen)
        types = [it["type"] for it in items] if all("type" in it for it in items) else None
        results["mcq"] = mcq_metrics(texts, [it["answer"] for it in items], [len(it["options"]) for it in items],
                                     lengths, types, [it["options"] for it in items])
        if return_responses:
            results["mcq"]["responses"] = texts
    if "vqa" in tasks:
        items = _load(os.path.join(data_dir, "vqa_test.jsonl"), ("image", "question", "answer", "answer_type"), limit)
        images_u8, items, _ = preload_images(items, size, desc="vqa_test.jsonl")
        texts, lengths = generate_answers(model, tokenizer, items, images_u8, **gen)
        for kind, fn in (("CLOSED", closed_vqa_metrics), ("OPEN", open_vqa_metrics)):
            sel = [i for i, it in enumerate(items) if str(it["answer_type"]).upper() == kind]
            if sel:
                res = fn([texts[i] for i in sel], [items[i]["answer"] for i in sel], [lengths[i] for i in sel])
                if return_responses:
                    res["responses"] = [texts[i] for i in sel]
                results[f"vqa_{kind.lower()}"] = res
    return results


# -----------------------------------------------------------------------------
# command line


def format_table(results):
    """One line per scalar metric: task, metric, value, chance (blank when there is none)."""
    lines = [f"{'task':<14}{'metric':<26}{'value':>10}{'chance':>10}"]
    for task, res in results.items():
        for key, value in res.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            chance = res.get("chance", {}).get(key)
            chance_s = f"{chance:>10.4f}" if chance is not None else f"{'':>10}"
            value_s = f"{value:>10d}" if isinstance(value, int) else f"{value:>10.4f}"
            lines.append(f"{task:<14}{key:<26}{value_s}{chance_s}")
        for key, value in res.get("walk", {}).items():  # reading vs concluding (walk_metrics)
            if value is not None:
                lines.append(f"{task:<14}{'walk ' + key:<26}{value:>10.4f}{'':>10}")
        for t, r in res.get("by_type", {}).items():  # accuracy per question type, then its item count
            chance_s = f"{r['chance']:>10.4f}" if r["chance"] is not None else f"{'':>10}"
            lines.append(f"{task:<14}{'accuracy ' + t + ' (' + str(r['n']) + ')':<26}{r['accuracy']:>10.4f}{chance_s}")
            if r.get("position_gap") is not None:  # the walk's accepted letters against the gold ones
                lines.append(f"{task:<14}{'walk position_gap ' + t:<26}{r['position_gap']:>10.4f}{'':>10}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a nanopatho checkpoint (CLIP or VLM) on held-out sets.")
    p.add_argument("--ckpt", required=True, help="checkpoint directory (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("--data", default="data/synthpath", help="directory holding the evaluation files")
    p.add_argument("--tasks", default=None,
                   help="comma list from zeroshot,retrieval,linear_probe (clip) and mcq,vqa (vlm); default: all for the model")
    p.add_argument("--limit", type=int, default=None, help="use only the first N items of each set")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max_new_tokens", type=int, default=256, help="generation budget for mcq / vqa")
    p.add_argument("--out", default=None, help="output JSON path (default: CKPT/eval.json)")
    p.add_argument("--responses", action="store_true",
                   help="also keep every greedy reply in the output (mcq / vqa \"responses\", in the test files' order), "
                        "for offline analyses such as data/synthpath/sight.py")
    args = p.parse_args(argv)

    model, config, tokenizer = load_checkpoint(args.ckpt, args.device)
    kind = config["model_type"]
    supported = {"clip": CLIP_TASKS, "vlm": VLM_TASKS}.get(kind, ())
    tasks = args.tasks.split(",") if args.tasks else list(supported)
    skipped = [t for t in tasks if t not in supported]
    if skipped:
        print(f"skipping {skipped}: not available for a {kind!r} model (supported: {list(supported)})")
    tasks = [t for t in tasks if t in supported]
    common = dict(batch_size=args.batch_size, device=args.device, limit=args.limit)
    if kind == "clip":
        results = eval_clip(model, tokenizer, args.data, tasks, **common)
    else:
        results = eval_vlm(model, tokenizer, args.data, tasks, max_new_tokens=args.max_new_tokens,
                           return_responses=args.responses, **common)
    out_path = args.out or os.path.join(args.ckpt, "eval.json")
    with open(out_path, "w") as f:
        json.dump({"ckpt": args.ckpt, "model_type": kind, "data": args.data, "limit": args.limit,
                   "results": results}, f, indent=2)
    print(format_table(results))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    from nanopatho.training import run
    run(main)  # a bad checkpoint or data file: one line on stderr, exit status 2
