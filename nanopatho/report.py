"""The speedrun report: what each stage bought, from the runs' own eval.json files.

    python -m nanopatho.report --out out --data data/synthpath --seeds 0,1,2
    python -m nanopatho.report --out out --readme README.md     # also rewrite README's results section

Reads out/seed<k>/<stage>/eval.json, out/seed<k>/{pretrain,sft}/diagnose.json, out/base_lm/diagnose.json
(stage 0's reading probe), out/base_vision/eval.json and out/seed<k>/{clip,sft}/perception.json (what the vision
towers see), out/times.jsonl (the shared stage-0 times), out/seed<k>/times.jsonl,
<data>/meta.json (chance levels and the trivial baseline), the metrics.jsonl curves and each model's config.json
(the commit that trained it); writes out/report.json, out/report.md
and, when matplotlib is installed, out/curves.png. Nothing in the tables is typed by hand.
"""

import argparse
import datetime
import json
import os
import platform
import statistics

VLM_STAGES = [("pretrain", "stage 1 pretrain"), ("sft", "stage 2 SFT"), ("rl_grpo", "stage 3 GRPO"),
              ("rl_dapo", "stage 3 DAPO")]
VLM_COLUMNS = [  # (column, path inside eval.json "results")
    ("MCQ acc", ("mcq", "accuracy")),
    ("MCQ unparseable (replies)", ("mcq", "unparseable")),  # a count, not a rate
    ("closed-VQA acc", ("vqa_closed", "accuracy")),
    ("open-VQA F1", ("vqa_open", "f1")),
    ("format rate", ("mcq", "format_rate")),
    ("mean length (tok)", ("mcq", "mean_response_length")),
]
DIGITS = {"wall time (s)": 0, "MCQ unparseable (replies)": 1}  # every other cell: 3
CLIP_COLUMNS = [
    ("zero-shot acc", ("zeroshot", "accuracy")),
    ("zero-shot bal. acc", ("zeroshot", "balanced_accuracy")),
    ("i2t R@1", ("retrieval", "i2t_R@1")), ("i2t R@5", ("retrieval", "i2t_R@5")), ("i2t R@10", ("retrieval", "i2t_R@10")),
    ("t2i R@1", ("retrieval", "t2i_R@1")), ("t2i R@5", ("retrieval", "t2i_R@5")), ("t2i R@10", ("retrieval", "t2i_R@10")),
    ("16-shot probe", ("linear_probe", "16shot_acc")),
]
START, END = "<!-- results:start -->", "<!-- results:end -->"


def read_json(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def dig(obj, path):
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def chance_of(obj, path):
    """The chance level an eval.json stores beside a metric, if any."""
    return dig(obj, (path[0], "chance", path[1]))


def summarise(values):
    """mean, spread (population std; 0 for one seed), n — over the seeds that have the value."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"mean": statistics.fmean(vals), "spread": statistics.pstdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


def stage_seconds(out, seed):
    """{stage: seconds} from out/seed<k>/times.jsonl, or out/times.jsonl (shared stages) for seed None."""
    times = {}
    path = os.path.join(out, "times.jsonl" if seed is None else os.path.join(f"seed{seed}", "times.jsonl"))
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                times[row["stage"]] = row["seconds"]
    return times


def collect(out, seeds):
    """report dict: per-stage per-column summaries, chance rows, times."""
    report = {"clip": {}, "vlm": {}, "chance": {"clip": {}, "vlm": {}}}
    evals = {s: {st: dig(read_json(os.path.join(out, f"seed{s}", st, "eval.json")), ("results",))
                 for st in ["clip"] + [k for k, _ in VLM_STAGES]} for s in seeds}
    times = {s: stage_seconds(out, s) for s in seeds}
    for col, path in CLIP_COLUMNS:
        report["clip"][col] = summarise([dig(evals[s]["clip"], path) for s in seeds])
        report["chance"]["clip"][col] = next((chance_of(evals[s]["clip"], path) for s in seeds if evals[s]["clip"]), None)
    report["clip"]["wall time (s)"] = summarise([times[s].get("clip") for s in seeds])
    for stage, _ in VLM_STAGES:
        row = {col: summarise([dig(evals[s][stage], path) for s in seeds]) for col, path in VLM_COLUMNS}
        row["wall time (s)"] = summarise([times[s].get(stage) for s in seeds])
        report["vlm"][stage] = row
    for col, path in VLM_COLUMNS:
        report["chance"]["vlm"][col] = next((chance_of(evals[s][st], path) for s in seeds for st, _ in VLM_STAGES
                                             if evals[s][st] and chance_of(evals[s][st], path) is not None), None)
    report["per_seed_mcq"] = {st: [dig(evals[s][st], ("mcq", "accuracy")) for s in seeds] for st, _ in VLM_STAGES}
    report["mcq_by_type"] = mcq_by_type(evals, seeds)
    report["mcq_walk"] = mcq_walk(evals, seeds)
    report["mcq_sight"] = mcq_sight(out, seeds)
    report["sft_token_roles"] = token_roles(out, seeds)
    report["reading_probe"] = reading_probe(out, seeds)
    shared = stage_seconds(out, None)
    report["base_lm_seconds"] = shared.get("base_lm")
    report["base_lm_near_seconds"] = shared.get("base_lm_near")
    report["tower_perception"] = tower_perception(out, seeds)
    report["base_vision_seconds"] = shared.get("base_vision")
    report["time"] = time_per_seed(times, shared, len(seeds))
    return report


def time_per_seed(times, shared, n_seeds):
    """What one seed of the speedrun costs: its stages and evaluations (out/seed<k>/times.jsonl: a line a stage
    and a line an evaluation, "evaluate/<log name>"; runs before session 23 have one "evaluate" line for them all),
    plus the shared stages (stage 0, 0v) counted once and split over the seeds, as the issue-15 budget counts them.
    Seconds; None where no seed has times."""
    seed = summarise([sum(t.values()) if t else None for t in times.values()])
    if seed is None:
        return None
    shared_total = sum(shared.values())
    return {"seed": seed, "shared": shared_total, "per_seed": seed["mean"] + shared_total / max(n_seeds, 1),
            "evaluate": summarise([sum(v for k, v in t.items() if k.split("/")[0] == "evaluate") if t else None
                                   for t in times.values()])}


def mcq_by_type(evals, seeds):
    """{stage: {type: summary of accuracy}} plus "n" and "chance" per type, from eval.json's mcq.by_type;
    and "tissue_headroom": per seed, the MCQ accuracy SFT would reach with every tissue question right
    and every other type as it answers them (what perfecting the one perceivable type is worth)."""
    runs = {st: [dig(evals[s][st], ("mcq", "by_type")) for s in seeds] for st, _ in VLM_STAGES}
    types = sorted({t for rs in runs.values() for r in rs if r for t in r})
    if not types:
        return {}
    first = next(r for rs in runs.values() for r in rs if r)
    out = {"types": types, "n": {t: first.get(t, {}).get("n") for t in types},
           "chance": {t: first.get(t, {}).get("chance") for t in types},
           "stages": {st: {t: summarise([(r or {}).get(t, {}).get("accuracy") for r in rs]) for t in types}
                      for st, rs in runs.items()}}
    headroom = []
    for r in runs["sft"]:
        if r and "tissue" in r:
            total = sum(v["n"] for v in r.values())
            perfect = (r["tissue"]["n"] + sum(v["accuracy"] * v["n"] for t, v in r.items() if t != "tissue")) / total
            headroom.append(perfect - sum(v["accuracy"] * v["n"] for v in r.values()) / total)
    out["tissue_headroom"] = summarise(headroom)
    return out


def table_head(title, labels):
    """A markdown table's header and rule: the first column titled `title`, then one column per label."""
    return [f"| {title} | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]


def by_type_markdown(by_type):
    """MCQ accuracy per question type and stage, beside each type's chance and item count."""
    if not by_type:
        return ""
    types = by_type["types"]
    lines = table_head("MCQ accuracy by question type", [f"{t} (n={by_type['n'][t]})" for t in types])
    for stage, label in VLM_STAGES:
        lines.append(f"| {label} | " + " | ".join(fmt(by_type["stages"][stage][t]) for t in types) + " |")
    lines.append("| chance | " + " | ".join(fmt_chance(by_type["chance"][t]) for t in types) + " |")
    return "\n".join(lines)


WALK_COLUMNS = [("walked", "replies that walk the options"), ("copied", "option lines copied exactly"),
                ("states_gold", "the option accepted is the gold one"),
                ("letter_follows", "answer letter = the accepted option's"),
                ("position_gap", "accepted letters unlike the gold ones (0 = as spread; 0.75 = always the 3rd)")]


def mcq_walk(evals, seeds):
    """{stage: {metric: summary}} from eval.json's mcq.walk (evaluate.walk_metrics): reading (copied,
    letter_follows) apart from concluding (states_gold), for every stage whose replies walk the options."""
    out = {}
    for stage, _ in VLM_STAGES:
        runs = [dig(evals[s][stage], ("mcq", "walk")) for s in seeds]
        if any(r and r.get("walked") for r in runs):
            out[stage] = {key: summarise([(r or {}).get(key) for r in runs]) for key, _ in WALK_COLUMNS}
    return out


def walk_markdown(walk):
    """The option-walk table: per stage, how the MCQ replies read their options and what they accepted."""
    if not walk:
        return ""
    lines = table_head("MCQ replies", [label for _, label in WALK_COLUMNS])
    for stage, label in VLM_STAGES:
        if stage in walk:
            lines.append(f"| {label} | " + " | ".join(fmt(walk[stage][key]) for key, _ in WALK_COLUMNS) + " |")
    return "\n".join(lines)


SIGHT_FINDINGS = [("tissue", "tissue"), ("glands", "glands"), ("pleomorphism", "pleomorphism"), ("mitoses", "mitoses"),
                  ("grade", "grade"), ("grade", "necrosis")]  # (MCQ type, finding): a grade option holds two findings
SIGHT_COLUMNS = [("right", "MCQ right"), ("stated_right", "stated the finding right (sight)"),
                 ("follows", "answer follows the statement (reading)"), ("sight", "lost: wrong statement followed"),
                 ("reading", "lost: right statement not followed"), ("unstated", "lost: never stated"),
                 ("other", "lost: a wrong statement not followed")]


def mcq_sight(out, seeds):
    """{stage: {"type/finding": {column: summary}}} from data/synthpath/sight.py's split of each stage's kept MCQ
    replies (out/seed<k>/<stage>/sight.json): what the reply stated before walking, and whether the walk followed."""
    result = {}
    for stage, _ in VLM_STAGES:
        runs = [dig(read_json(os.path.join(out, f"seed{s}", stage, "sight.json")), ("split",)) for s in seeds]
        if not any(runs):
            continue
        result[stage] = {}
        for qtype, finding in SIGHT_FINDINGS:
            cells = [(dig(r, (qtype,)) or {}, dig(r, (qtype, "findings", finding)) or {}) for r in runs]
            result[stage][f"{qtype}/{finding}"] = {
                col: summarise([(t if col == "right" else f).get(col) for t, f in cells]) for col, _ in SIGHT_COLUMNS}
    return result


def sight_markdown(sight):
    """Per stage and tumour finding: what the MCQ replies saw and how they read it (shares of the type's items)."""
    if not sight:
        return ""
    lines = table_head("MCQ, per finding", [label for _, label in SIGHT_COLUMNS])
    for stage, label in VLM_STAGES:
        for key, row in sight.get(stage, {}).items():
            if any(row.values()):
                qtype, finding = key.split("/")
                name = finding if finding == qtype else f"{qtype} ({finding} half)"
                lines.append(f"| {label}: {name} | " + " | ".join(fmt(row[col]) for col, _ in SIGHT_COLUMNS) + " |")
    return "\n".join(lines)


TOWER_ATTRIBUTES = [("mitoses", "mitotic count"), ("pleomorphism", "pleomorphism"),
                    ("gland_formation", "gland formation"), ("grade", "grade"), ("necrosis", "necrosis"),
                    ("mucin", "mucin")]
TOWER_ROWS = [("base_vision", "stage 0v tower, its supervised heads"), ("clip", "PathoCLIP, frozen linear probe"),
              ("sft", "SFT VLM's tower, frozen linear probe"), ("pretrain_says", "stage 1 LM says (findings readout)")]


def tower_perception(out, seeds):
    """{row: {attribute: summary}} plus "majority": what the vision towers' features hold about the tumour
    attributes on held-out tiles. Stage 0v (out/base_vision/eval.json, trained once) scores its own heads at
    the last step; clip and sft are data/synthpath/perception.py --frozen probes (out/seed<k>/<stage>/perception.json);
    "pretrain_says" is what the stage-1 LM says on the same tiles (data/synthpath/readout.py, pretrain/readout.json;
    SFT and RL answer in the chat format, not in the captions' one)."""
    base = read_json(os.path.join(out, "base_vision", "eval.json"))
    probes = {st: [read_json(os.path.join(out, f"seed{s}", st, "perception.json")) for s in seeds] for st in ("clip", "sft")}
    says = [read_json(os.path.join(out, f"seed{s}", "pretrain", "readout.json")) for s in seeds]
    runs = {"base_vision": [base["curve"][-1]] if base else [],
            **{st: [dig(p, ("frozen",)) for p in files] for st, files in probes.items()},
            "pretrain_says": [{a: dig(r, ("readout", a, "accuracy")) for a, _ in TOWER_ATTRIBUTES} for r in says]}
    result = {row: {a: summarise([dig(r, (a,)) for r in runs[row]]) for a, _ in TOWER_ATTRIBUTES} for row, _ in TOWER_ROWS}
    any_file = next((p for files in probes.values() for p in files if p), None) or base or {}
    result["majority"] = any_file.get("majority", {})
    return result


def tower_markdown(tower, base_seconds):
    """Held-out accuracy of each tower's features on the tumour attributes, then of what the LM says about them,
    beside the majority class."""
    if not tower or not any(tower[row][a] for row, _ in TOWER_ROWS for a, _ in TOWER_ATTRIBUTES):
        return ""
    lines = table_head("held-out tumour tiles: what the tower sees, what the LM says",
                       [label for _, label in TOWER_ATTRIBUTES])
    for row, label in TOWER_ROWS:
        if not any(tower[row][a] for a, _ in TOWER_ATTRIBUTES):  # e.g. a run from before the readout
            continue
        if row == "base_vision" and base_seconds is not None:
            label += f" (trained once, {base_seconds:.0f} s)"
        lines.append(f"| {label} | " + " | ".join(fmt(tower[row][a]) for a, _ in TOWER_ATTRIBUTES) + " |")
    lines.append("| majority class | " + " | ".join(fmt_chance(tower["majority"].get(a)) for a, _ in TOWER_ATTRIBUTES) + " |")
    return "\n".join(lines)


PROBE_STAGES = [("base_lm", "stage 0 base LM"), ("base_lm_near", "stage 0, second phase (options that share a word)"),
                ("pretrain", "stage 1 pretrain"), ("sft", "stage 2 SFT")]
SHARED_STAGES = ("base_lm", "base_lm_near")  # trained once, in out/<stage>/
PROBE_SKILLS = [("copy", "option text copied top-1"), ("check", "option check top-1"), ("option", "answer letter top-1"),
                ("same", "same-or-different top-1"), ("walk", "whole walk right"),
                ("near_walk", "whole walk right, options sharing a word")]


def reading_probe(out, seeds):
    """{stage: {skill: summary of top-1}} of the reading probe (held-out names), from diagnose.json files.
    Stage 0 is trained once and shared by every seed: its rows are one run each."""
    result = {}
    for stage, _ in PROBE_STAGES:
        paths = [os.path.join(out, stage, "diagnose.json")] if stage in SHARED_STAGES else \
            [os.path.join(out, f"seed{s}", stage, "diagnose.json") for s in seeds]
        runs = [dig(read_json(p), ("probe",)) for p in paths]
        result[stage] = {skill: summarise([dig(r, (skill, "top1")) for r in runs]) for skill, _ in PROBE_SKILLS}
        result[stage]["chance"] = {skill: next((dig(r, (skill, "chance_top1")) for r in runs if dig(r, (skill,))), None)
                                   for skill, _ in PROBE_SKILLS}
    return result


def probe_markdown(probe, shared_seconds):
    """The reading probe per stage, beside chance: does the LM still read after each stage? A stage
    that has no diagnose.json (a run without stage 0's second phase) has no row."""
    if not probe or not any(probe[st][sk] for st, _ in PROBE_STAGES for sk, _ in PROBE_SKILLS):
        return ""
    lines = table_head("reading probe (names never trained on)", [label for _, label in PROBE_SKILLS])
    for stage, label in PROBE_STAGES:
        if not any(probe[stage][sk] for sk, _ in PROBE_SKILLS):
            continue
        if shared_seconds.get(stage) is not None:
            label += f" (trained once, {shared_seconds[stage]:.0f} s)"
        lines.append(f"| {label} | " + " | ".join(fmt(probe[stage][sk]) for sk, _ in PROBE_SKILLS) + " |")
    chance = next((probe[st]["chance"] for st, _ in PROBE_STAGES if any(probe[st]["chance"].values())), {})
    lines.append("| chance | " + " | ".join(fmt_chance(chance.get(sk)) for sk, _ in PROBE_SKILLS) + " |")
    return "\n".join(lines)


def shared_seconds(report):
    return {stage: report.get(f"{stage}_seconds") for stage in SHARED_STAGES}


def token_roles(out, seeds):
    """{role: {"nll", "top1", "chance_nll", "chance_top1"}} over seeds, from the SFT diagnose.json files."""
    runs = [dig(read_json(os.path.join(out, f"seed{s}", "sft", "diagnose.json")), ("roles",)) for s in seeds]
    runs = [r for r in runs if r]
    roles = {}
    for role in (runs[0] if runs else {}):
        roles[role] = {k: summarise([r.get(role, {}).get(k) for r in runs]) for k in ("nll", "top1")}
        roles[role].update({k: runs[0][role][k] for k in ("chance_nll", "chance_top1")})
    return roles


def roles_markdown(roles):
    """Teacher-forced loss of the SFT model per token role (nanopatho/diagnose.py), beside chance."""
    if not roles:
        return ""
    lines = ["| SFT reply token | NLL | chance NLL | top-1 | chance top-1 |", "|---|---|---|---|---|"]
    for role, r in roles.items():
        lines.append(f"| {role} | {fmt(r['nll'])} | {fmt_chance(r['chance_nll'])} | {fmt(r['top1'])} | "
                     f"{fmt_chance(r['chance_top1'])} |")
    return "\n".join(lines)


TOY_MINUTES_PER_SEED = 25  # issue 15's budget for the toy speedrun on 2 CPU cores


def claims(report, preset="toy"):
    """The claims the speedrun exists to test, each PASS / FAIL with its numbers."""
    def mean(stage, col="MCQ acc"):
        cell = report["vlm"].get(stage, {}).get(col)
        return cell["mean"] if cell else None

    out = []
    zs, zs_chance = report["clip"].get("zero-shot acc"), report["chance"]["clip"].get("zero-shot acc")
    if zs and zs_chance is not None:
        out.append(("PathoCLIP zero-shot accuracy far above chance (>= chance + 0.30)",
                    zs["mean"] >= zs_chance + 0.30, f"{zs['mean']:.3f} vs chance {zs_chance:.3f}"))
    pre, sft, grpo, dapo = mean("pretrain"), mean("sft"), mean("rl_grpo"), mean("rl_dapo")
    mcq_chance = report["chance"]["vlm"].get("MCQ acc")
    if pre is not None and sft is not None:
        out.append(("SFT far above stage 1 on MCQ (>= +10 points)", sft >= pre + 0.10, f"{sft:.3f} vs {pre:.3f}"))
    if sft is not None and mcq_chance is not None:
        out.append(("SFT above chance on MCQ (>= chance + 10 points)", sft >= mcq_chance + 0.10,
                     f"{sft:.3f} vs chance {mcq_chance:.3f}"))
    for name, value in (("GRPO", grpo), ("DAPO", dapo)):
        if value is not None and sft is not None:
            out.append((f"{name} above SFT on held-out MCQ (>= +5 points)", value >= sft + 0.05,
                        f"{value:.3f} vs {sft:.3f} ({100 * (value - sft):+.1f} points)"))
    if grpo is not None and dapo is not None:
        out.append(("DAPO vs GRPO (information, not a pass/fail target)", None, f"{dapo:.3f} vs {grpo:.3f}"))
    headroom = (report.get("mcq_by_type") or {}).get("tissue_headroom")
    if headroom and sft is not None:
        out.append(("MCQ headroom from the tissue questions alone: SFT with every tissue question right and the other "
                    "types unchanged (information)", None,
                    f"{sft + headroom['mean']:.3f} ({100 * headroom['mean']:+.1f} points over SFT)"))
    out += reading_claims(report, sft, mean("sft", "closed-VQA acc"), report["chance"]["vlm"].get("closed-VQA acc"))
    f1 = {stage: mean(stage, "open-VQA F1") for stage in ("sft", "rl_grpo", "rl_dapo")}
    f1_majority = report["chance"]["vlm"].get("open-VQA F1")
    if f1["sft"] is not None and f1_majority is not None:
        out.append(("SFT above the majority answer on open VQA (>= +10 points F1)", f1["sft"] >= f1_majority + 0.10,
                    f"{f1['sft']:.3f} vs majority {f1_majority:.3f}"))
    for name, stage in (("GRPO", "rl_grpo"), ("DAPO", "rl_dapo")):
        if f1[stage] is not None and f1["sft"] is not None:
            out.append((f"{name} keeps SFT's open-VQA F1 (drop <= 5 points)", f1[stage] >= f1["sft"] - 0.05,
                        f"{f1[stage]:.3f} vs {f1['sft']:.3f} ({100 * (f1[stage] - f1['sft']):+.1f} points)"))
    time = report.get("time")
    if time:
        minutes = time["per_seed"] / 60
        numbers = (f"{minutes:.1f} min a seed = {time['seed']['mean'] / 60:.1f} of its own stages and evaluations "
                   f"+ {time['shared'] / 60:.1f} shared / {time['seed']['n']} seeds")
        if preset == "toy":
            out.append((f"toy speedrun <= {TOY_MINUTES_PER_SEED} min a seed on this machine, shared stages counted "
                        f"once", minutes <= TOY_MINUTES_PER_SEED, numbers))
        else:
            out.append(("speedrun time a seed, shared stages counted once (information)", None, numbers))
    return out


def reading_claims(report, sft_mcq, sft_closed, closed_chance):
    """Does the VLM read its question? The SFT model's decisive tokens on held-out SFT rows, its test
    accuracies at the levels a reading model reaches, and the base LM's probe."""
    out = []
    roles = report.get("sft_token_roles") or {}
    for role, target in (("option letter (reasoning)", 0.9), ("yes/no decision (reasoning)", 0.8)):
        top1 = (roles.get(role) or {}).get("top1")
        if top1:
            out.append((f"SFT {role} top-1 on held-out SFT rows >= {target}", top1["mean"] >= target,
                        f"{top1['mean']:.3f} (chance {fmt_chance(roles[role].get('chance_top1'))})"))
    if sft_mcq is not None:
        out.append(("SFT MCQ accuracy >= 0.55", sft_mcq >= 0.55, f"{sft_mcq:.3f}"))
    if sft_closed is not None:
        out.append(("SFT closed-VQA accuracy >= 0.70", sft_closed >= 0.70,
                    f"{sft_closed:.3f} vs chance {fmt_chance(closed_chance)}"))
    probes = report.get("reading_probe") or {}
    probe = next((probes[st] for st in ("base_lm_near", "base_lm") if any((probes.get(st) or {}).get(sk)
                                                                        for sk, _ in PROBE_SKILLS)), {})
    # the LM stage 1 continues; "walk" (every check of a walk right) is what the speedrun's stage-0 gate asks
    for skill, target in (("copy", 0.9), ("check", 0.8), ("walk", 0.8), ("option", 0.9), ("same", 0.8)):
        if probe.get(skill):
            out.append((f"stage 0 base LM reads: probe {skill} top-1 >= {target} on names never trained on",
                        probe[skill]["mean"] >= target, f"{probe[skill]['mean']:.3f} (chance "
                        f"{fmt_chance(probe['chance'].get(skill))})"))
    return out


def fmt(cell, digits=3):
    if cell is None:
        return "—"
    if cell["n"] > 1:
        return f"{cell['mean']:.{digits}f} ± {cell['spread']:.{digits}f}"
    return f"{cell['mean']:.{digits}f}"


def fmt_chance(value):
    return "—" if value is None else f"{value:.3f}"


def tables_markdown(report, meta):
    cols = [c for c, _ in VLM_COLUMNS] + ["wall time (s)"]
    lines = ["| model | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for stage, label in VLM_STAGES:
        row = report["vlm"][stage]
        lines.append(f"| {label} | " + " | ".join(fmt(row[c], DIGITS.get(c, 3)) for c in cols) + " |")
    lines.append("| chance | " + " | ".join(fmt_chance(report["chance"]["vlm"].get(c)) for c in cols) + " |")
    baseline = ((meta or {}).get("baselines") or {}).get("colour_histogram") or {}
    if baseline and any(baseline_cell(baseline, c) != "—" for c in cols):
        lines.append("| trivial baseline: " + baseline_label(baseline) + " | " +
                     " | ".join(baseline_cell(baseline, c) for c in cols) + " |")
    ccols = [c for c, _ in CLIP_COLUMNS] + ["wall time (s)"]
    clip = ["| PathoCLIP | " + " | ".join(ccols) + " |", "|" + "---|" * (len(ccols) + 1),
            "| PathoCLIP | " + " | ".join(fmt(report["clip"][c], DIGITS.get(c, 3)) for c in ccols) + " |",
            "| chance | " + " | ".join(fmt_chance(report["chance"]["clip"].get(c)) for c in ccols) + " |"]
    if baseline:
        clip.append("| trivial baseline: " + baseline_label(baseline) + " | " +
                    " | ".join(baseline_cell(baseline, c) for c in ccols) + " |")
    return "\n".join(lines), "\n".join(clip)


def baseline_label(baseline):
    return "colour-histogram nearest centroid (prepare.py)"


def baseline_cell(baseline, column):
    """The trivial baseline's score where meta.json has one for this column."""
    key = {"zero-shot acc": "zeroshot_test_accuracy"}.get(column)
    value = baseline.get(key) if key else None
    return "—" if value is None else f"{value:.3f}"


def code_name(code):
    """checkpoint.code_version's record as text: "abc1234", or "abc1234+dirty" with uncommitted edits."""
    return code["commit"] + ("+dirty" if code["dirty"] else "")


def trained_by(out, seeds):
    """"commit[, commit...]" named by the config.json of every model in the run (checkpoint.code_version); None
    when no model records one (checkpoints older than the record)."""
    dirs = [os.path.join(out, st) for st in SHARED_STAGES + ("base_vision",)]
    dirs += [os.path.join(out, f"seed{s}", st) for s in seeds for st in ["clip"] + [k for k, _ in VLM_STAGES]]
    codes = [dig(read_json(os.path.join(d, "config.json")), ("code",)) for d in dirs]
    return ", ".join(sorted({code_name(c) for c in codes if c})) or None


def machine_info(out, seeds):
    """Where and when the report was written, and the commit(s) that trained its models (the report's own
    checkout, marked so, for runs whose checkpoints do not record one)."""
    import torch
    from nanopatho.checkpoint import code_version
    commit = trained_by(out, seeds)
    if commit is None:
        own = code_version()
        commit = f"{code_name(own) if own else 'unknown'} (the report's checkout; the models record none)"
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none", "commit": commit}


def plot_curves(out, seeds, path):
    """Loss / reward / accuracy curves of seed runs; returns a note when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "curves skipped: matplotlib is not installed (pip install matplotlib)"
    panels = [("clip", "loss"), ("pretrain", "loss"), ("sft", "loss"), ("rl_grpo", "reward"), ("rl_dapo", "reward"),
              ("rl_grpo", "accuracy"), ("rl_dapo", "accuracy"), ("rl_dapo", "response_length")]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for ax, (stage, key) in zip(axes.flat, panels):
        for s in seeds:
            rows = []
            mpath = os.path.join(out, f"seed{s}", stage, "metrics.jsonl")
            if os.path.exists(mpath):
                with open(mpath) as f:
                    rows = [json.loads(line) for line in f if line.strip()]
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), label=f"seed {s}")
        ax.set_title(f"{stage}: {key}")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return None


def write_markdown(report, meta, info, claim_rows, curve_note, seeds, preset):
    vlm_table, clip_table = tables_markdown(report, meta)
    parts = ["# nanopatho speedrun report\n",
             f"Preset `{preset}`, seeds {', '.join(map(str, seeds))} (mean ± population std over seeds when more than one). "
             f"Every model is evaluated on the same held-out SynthPath sets (images never seen in training), greedy decoding.\n",
             "## VLM stages\n", vlm_table]
    by_type = by_type_markdown(report.get("mcq_by_type"))
    if by_type:
        parts += ["\nThe MCQ accuracy split by what the question asks (the same answers as the MCQ column):\n", by_type]
    walk = walk_markdown(report.get("mcq_walk"))
    if walk:
        parts += ["\nHow the MCQ replies reach their letter (`nanopatho.evaluate.walk_metrics`): a reply that accepts the "
                  "gold option's text but gives another letter lost the point to reading; one that accepts another "
                  "option lost it to what it concluded (or to a wrong yes/no check in the walk):\n", walk]
    sight = sight_markdown(report.get("mcq_sight"))
    if sight:
        parts += ["\nWhere the MCQ points go (`python -m data.synthpath.sight`): every chain states its finding before "
                  "it walks the options, so a wrong answer either followed a wrong statement (sight), left a right one "
                  "(reading), or decided a finding it never stated; RL rewards the answer only, and lifts a type "
                  "above its stated-right share only by seeing better:\n", sight]
    roles = roles_markdown(report.get("sft_token_roles"))
    if roles:
        parts += ["\nWhere the SFT model's loss sits, on SFT held-out conversations (`python -m nanopatho.diagnose`):\n",
                  roles]
    probe = probe_markdown(report.get("reading_probe"), shared_seconds(report))
    if probe:
        parts += ["\nThe reading probe (`python -m nanopatho.diagnose --probe reading_probe.jsonl`): held-out option "
                  "walks (copy, check, letter) and same-or-different judgements on names no stage ever trained on, teacher-forced:\n", probe]
    tower = tower_markdown(report.get("tower_perception"), report.get("base_vision_seconds"))
    if tower:
        parts += ["\nWhat the vision towers' features hold about the tumour attributes the non-tissue MCQ types ask "
                  "about (`python -m data.synthpath.perception`, fresh tiles no stage trained on), and what the "
                  "language model says about the same tiles after \"Tumour findings: <finding> is\" "
                  "(`python -m data.synthpath.readout`):\n", tower]
    parts += ["\n## PathoCLIP\n", clip_table, "\n## Claims\n"]
    for text, ok, numbers in claim_rows:
        verdict = "info" if ok is None else ("PASS" if ok else "FAIL")
        parts.append(f"- **{verdict}** — {text}: {numbers}")
    parts.append("\nPer-seed held-out MCQ accuracy: " + "; ".join(
        f"{st}: {', '.join('—' if v is None else f'{v:.3f}' for v in vals)}" for st, vals in report["per_seed_mcq"].items()))
    parts.append("\n## Run\n")
    parts += [f"- {k}: {v}" for k, v in info.items()]
    if meta:
        parts.append(f"- data: SynthPath generator {meta.get('version', '?')}, seed {meta.get('seed', '?')}, "
                     f"splits {json.dumps(meta.get('split_sizes', meta.get('splits', {})))}")
    parts.append("\n" + (curve_note or "![training curves](curves.png)"))
    return "\n".join(parts) + "\n"


def rewrite_readme(readme, block, start=START, end=END):
    """Replace the text between two marker lines of README.md with `block`."""
    with open(readme) as f:
        text = f.read()
    assert start in text and end in text, f"{readme} lacks the {start} / {end} markers"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    with open(readme, "w") as f:
        f.write(head + start + "\n" + block.strip() + "\n" + end + tail)


def main(argv=None):
    p = argparse.ArgumentParser(description="Build out/report.{md,json} from a speedrun's outputs.")
    p.add_argument("--out", default="out", help="speedrun output directory (holds seed<k>/)")
    p.add_argument("--data", default="data/synthpath", help="data directory (for meta.json)")
    p.add_argument("--seeds", default="0", help="comma list of seeds to include")
    p.add_argument("--preset", default="toy", help="preset name, for the record")
    p.add_argument("--readme", default=None, help="also rewrite this README's results section")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s != ""]
    meta = read_json(os.path.join(args.data, "meta.json"))
    report = collect(args.out, seeds)
    info = machine_info(args.out, seeds)
    claim_rows = claims(report, args.preset)
    curve_note = plot_curves(args.out, seeds, os.path.join(args.out, "curves.png"))
    md = write_markdown(report, meta, info, claim_rows, curve_note, seeds, args.preset)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump({"report": report, "claims": [{"claim": c, "pass": ok, "numbers": n} for c, ok, n in claim_rows],
                   "machine": info, "seeds": seeds, "preset": args.preset, "meta": meta}, f, indent=2)
    if args.readme:
        vlm_table, clip_table = tables_markdown(report, meta)
        tables = [t for t in (vlm_table, by_type_markdown(report["mcq_by_type"]),
                              walk_markdown(report["mcq_walk"]), sight_markdown(report["mcq_sight"]), clip_table,
                              tower_markdown(report["tower_perception"], report["base_vision_seconds"]),
                              roles_markdown(report["sft_token_roles"]),
                              probe_markdown(report["reading_probe"], shared_seconds(report))) if t]
        rewrite_readme(args.readme, f"From `{args.out}/report.json` ({info['date']}, "
                       f"{'commits' if ',' in info['commit'] else 'commit'} {info['commit']}, "
                       f"preset {args.preset}, seeds {args.seeds}, {info['cpus']} CPUs, torch {info['torch']}):\n\n" +
                       "\n\n".join(tables) + "\n\n" +
                       "\n".join(f"- {'info' if ok is None else ('PASS' if ok else 'FAIL')}: {c} — {n}"
                                 for c, ok, n in claim_rows))
    print(md)


if __name__ == "__main__":
    main()
