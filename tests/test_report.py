"""nanopatho/report.py on a constructed speedrun directory: means over seeds, chance rows, the
claims, the SFT token-role table, and the README section rewritten between its markers.

    python -m pytest -q tests/test_report.py
"""

import json
import os

import pytest

from nanopatho import report

ROLE = "option letter (reasoning)"


def write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def fake_run(out, seed, mcq_sft, mcq_grpo, letter_top1, f1_sft=0.3, f1_grpo=0.3):
    base = os.path.join(out, f"seed{seed}")

    def results(acc, f1):
        return {"results": {"mcq": {"accuracy": acc, "unparseable": seed, "chance": {"accuracy": 0.25}},
                            "vqa_open": {"f1": f1, "chance": {"f1": 0.08}}}}
    write(os.path.join(base, "sft", "eval.json"), results(mcq_sft, f1_sft))
    write(os.path.join(base, "rl_grpo", "eval.json"), results(mcq_grpo, f1_grpo))
    write(os.path.join(base, "clip", "eval.json"),
          {"results": {"zeroshot": {"accuracy": 0.5 + 0.1 * seed, "chance": {"accuracy": 1 / 9}}}})
    write(os.path.join(base, "sft", "diagnose.json"),
          {"roles": {ROLE: {"n": 10, "nll": 1.4, "top1": letter_top1, "chance_nll": 1.386, "chance_top1": 0.25}}})
    with open(os.path.join(base, "times.jsonl"), "w") as f:
        f.write(json.dumps({"stage": "sft", "seconds": 100 + seed}) + "\n")


def test_report_from_constructed_runs(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    fake_run(out, 0, mcq_sft=0.30, mcq_grpo=0.40, letter_top1=0.2, f1_sft=0.30, f1_grpo=0.10)
    fake_run(out, 1, mcq_sft=0.50, mcq_grpo=0.50, letter_top1=0.4, f1_sft=0.20, f1_grpo=0.20)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.START}\nold numbers\n{report.END}\noutro\n")
    monkeypatch.setattr(report, "plot_curves", lambda *a: "(no curves in this test)")
    report.main(["--out", out, "--data", str(tmp_path / "no_data"), "--seeds", "0,1", "--readme", str(readme)])

    r = json.loads((tmp_path / "out" / "report.json").read_text())["report"]
    assert r["vlm"]["sft"]["MCQ acc"]["mean"] == pytest.approx(0.40)
    assert r["vlm"]["sft"]["MCQ acc"]["spread"] == pytest.approx(0.10)  # population std of 0.3, 0.5
    assert r["vlm"]["sft"]["wall time (s)"]["mean"] == pytest.approx(100.5)
    assert r["vlm"]["pretrain"]["MCQ acc"] is None  # no run has it
    assert r["chance"]["vlm"]["MCQ acc"] == pytest.approx(0.25)
    assert r["sft_token_roles"][ROLE]["top1"]["mean"] == pytest.approx(0.3)
    assert r["sft_token_roles"][ROLE]["chance_top1"] == pytest.approx(0.25)

    claims = {c["claim"]: c["pass"] for c in json.loads((tmp_path / "out" / "report.json").read_text())["claims"]}
    assert claims["GRPO above SFT on held-out MCQ (>= +5 points)"] is True  # 0.45 vs 0.40
    assert claims["SFT above chance on MCQ (>= chance + 10 points)"] is True  # 0.40 vs 0.25
    assert claims["SFT above the majority answer on open VQA (>= +10 points F1)"] is True  # 0.25 vs 0.08
    assert claims["GRPO keeps SFT's open-VQA F1 (drop <= 5 points)"] is False  # 0.15 vs 0.25
    assert "DAPO keeps SFT's open-VQA F1 (drop <= 5 points)" not in claims  # no DAPO run

    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old numbers" not in text
    assert f"| {ROLE} | 1.400 ± 0.000 | 1.386 | 0.300 ± 0.100 | 0.250 |" in text
    assert "0.400 ± 0.100" in text  # SFT MCQ mean ± std in the VLM table
    assert "| 0.400 ± 0.100 | 0.5 ± 0.5 |" in text  # unparseable replies (0 and 1) are a count, not a rate


def test_no_diagnose_files_means_no_role_table(tmp_path):
    assert report.token_roles(str(tmp_path), [0, 1]) == {}
    assert report.roles_markdown({}) == ""


def probe_file(path, option, same, roles=None, copy=None, check=None, walk=None):
    probe = {"option": {"n": 4, "nll": 0.5, "top1": option, "chance_nll": 1.386, "chance_top1": 0.25},
             "same": {"n": 4, "nll": 0.5, "top1": same, "chance_nll": 0.693, "chance_top1": 0.5}}
    if copy is not None:
        probe["copy"] = {"n": 9, "nll": 0.2, "top1": copy, "chance_nll": None, "chance_top1": None}
        probe["check"] = {"n": 4, "nll": 0.4, "top1": check, "chance_nll": 0.693, "chance_top1": 0.5}
    if walk is not None:  # diagnose.walk_stats: no NLL, chance a coin per line
        probe["walk"] = {"n": 4, "nll": None, "top1": walk, "chance_nll": None, "chance_top1": 0.234}
    write(path, {"roles": roles or {}, "probe": probe})


def test_reading_probe_table_and_claims(tmp_path):
    """Stage 0 is one shared run; stages 1 and 2 are averaged over seeds; the reading claims pass or fail
    on their own thresholds (0.9 letter, 0.8 yes/no, 0.55 MCQ, 0.70 closed VQA)."""
    out = str(tmp_path)
    probe_file(os.path.join(out, "base_lm", "diagnose.json"), option=0.95, same=0.70, copy=0.97, check=0.75,
               walk=0.55)
    with open(os.path.join(out, "times.jsonl"), "w") as f:
        f.write(json.dumps({"stage": "base_lm", "seconds": 321}) + "\n")
    roles = {"option letter (reasoning)": {"n": 5, "nll": 0.1, "top1": 0.92, "chance_nll": 1.386, "chance_top1": 0.25},
             "yes/no decision (reasoning)": {"n": 5, "nll": 0.6, "top1": 0.60, "chance_nll": 0.693, "chance_top1": 0.5}}
    for seed, (opt, same) in enumerate([(0.8, 0.6), (0.6, 0.8)]):
        probe_file(os.path.join(out, f"seed{seed}", "pretrain", "diagnose.json"), opt, same)
        probe_file(os.path.join(out, f"seed{seed}", "sft", "diagnose.json"), opt - 0.1, same, roles)
        write(os.path.join(out, f"seed{seed}", "sft", "eval.json"), {"results": {
            "mcq": {"accuracy": 0.6, "chance": {"accuracy": 0.25}},
            "vqa_closed": {"accuracy": 0.65, "chance": {"accuracy": 0.5}}}})
    r = report.collect(out, [0, 1])
    assert r["base_lm_seconds"] == 321
    assert r["reading_probe"]["base_lm"]["option"]["n"] == 1  # shared: one run, not one per seed
    assert r["reading_probe"]["pretrain"]["option"]["mean"] == pytest.approx(0.7)
    assert r["reading_probe"]["sft"]["option"]["mean"] == pytest.approx(0.6)
    table = report.probe_markdown(r["reading_probe"], report.shared_seconds(r))
    assert "| stage 0 base LM (trained once, 321 s) | 0.970 | 0.750 | 0.950 | 0.700 | 0.550 | — |\n" in table
    assert "second phase" not in table  # no diagnose.json: no row
    assert "| stage 1 pretrain | — | — | 0.700 ± 0.100 | 0.700 ± 0.100 | — | — |\n" in table
    assert table.endswith("| chance | — | 0.500 | 0.250 | 0.500 | 0.234 | — |")
    claims = {c: ok for c, ok, _ in report.claims(r)}
    assert claims["SFT option letter (reasoning) top-1 on held-out SFT rows >= 0.9"] is True
    assert claims["SFT yes/no decision (reasoning) top-1 on held-out SFT rows >= 0.8"] is False
    assert claims["SFT MCQ accuracy >= 0.55"] is True
    assert claims["SFT closed-VQA accuracy >= 0.70"] is False
    assert claims["stage 0 base LM reads: probe option top-1 >= 0.9 on names never trained on"] is True
    assert claims["stage 0 base LM reads: probe same top-1 >= 0.8 on names never trained on"] is False
    assert claims["stage 0 base LM reads: probe copy top-1 >= 0.9 on names never trained on"] is True
    assert claims["stage 0 base LM reads: probe check top-1 >= 0.8 on names never trained on"] is False
    assert claims["stage 0 base LM reads: probe walk top-1 >= 0.8 on names never trained on"] is False  # 0.55


def test_no_probe_files_means_no_probe_table(tmp_path):
    r = report.collect(str(tmp_path), [0])
    assert report.probe_markdown(r["reading_probe"], {}) == ""


def test_second_phase_row_and_the_claims_read_the_lm_stage_1_continues(tmp_path):
    out = str(tmp_path)
    probe_file(os.path.join(out, "base_lm", "diagnose.json"), option=0.95, same=0.70, copy=0.97, check=0.75)
    probe_file(os.path.join(out, "base_lm_near", "diagnose.json"), option=0.85, same=0.90, copy=0.99, check=0.95)
    with open(os.path.join(out, "times.jsonl"), "w") as f:
        f.write(json.dumps({"stage": "base_lm", "seconds": 321}) + "\n")
        f.write(json.dumps({"stage": "base_lm_near", "seconds": 123}) + "\n")
    r = report.collect(out, [0])
    table = report.probe_markdown(r["reading_probe"], report.shared_seconds(r))
    assert "| stage 0 base LM (trained once, 321 s) | 0.970 | 0.750 | 0.950 | 0.700 |" in table
    assert "| stage 0, second phase (options that share a word) (trained once, 123 s) | 0.990 | 0.950 | 0.850 | 0.900 |" in table
    claims = {c: ok for c, ok, _ in report.claims(r)}
    assert claims["stage 0 base LM reads: probe option top-1 >= 0.9 on names never trained on"] is False  # 0.85
    assert claims["stage 0 base LM reads: probe same top-1 >= 0.8 on names never trained on"] is True   # 0.90


def test_mcq_by_type_table_and_headroom(tmp_path, monkeypatch):
    """Per-type MCQ accuracy from eval.json's mcq.by_type, and the headroom line: SFT with 2 of 4 tissue
    and 1 of 4 mitoses right (0.375) would reach (4 + 1) / 8 = 0.625 with every tissue question right."""
    out = str(tmp_path / "out")
    by_type = {"sft": {"tissue": 0.5, "mitoses": 0.25}, "rl_grpo": {"tissue": 0.75, "mitoses": 0.5}}
    for stage, acc in by_type.items():
        types = {t: {"accuracy": a, "n": 4, "chance": 0.25} for t, a in acc.items()}
        write(os.path.join(out, "seed0", stage, "eval.json"),
              {"results": {"mcq": {"accuracy": sum(acc.values()) / 2, "chance": {"accuracy": 0.25}, "by_type": types}}})
    monkeypatch.setattr(report, "plot_curves", lambda *a: "(no curves in this test)")
    report.main(["--out", out, "--data", str(tmp_path / "no_data"), "--seeds", "0"])
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    r = saved["report"]["mcq_by_type"]
    assert r["types"] == ["mitoses", "tissue"] and r["n"] == {"mitoses": 4, "tissue": 4}
    assert r["stages"]["rl_grpo"]["tissue"]["mean"] == pytest.approx(0.75)
    assert r["stages"]["pretrain"]["tissue"] is None
    assert r["tissue_headroom"]["mean"] == pytest.approx(0.625 - 0.375)
    headroom = [c for c in saved["claims"] if c["claim"].startswith("MCQ headroom")]
    assert headroom[0]["pass"] is None and "0.625 (+25.0 points over SFT)" in headroom[0]["numbers"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| MCQ accuracy by question type | mitoses (n=4) | tissue (n=4) |" in md
    assert "| stage 3 GRPO | 0.500 | 0.750 |" in md and "| chance | 0.250 | 0.250 |" in md


def test_mcq_walk_table(tmp_path, monkeypatch):
    """eval.json's mcq.walk averaged over seeds per stage; a stage whose replies never walk gets no row."""
    out = str(tmp_path / "out")
    walks = {0: {"walked": 1.0, "copied": 0.9, "states_gold": 0.6, "letter_follows": 0.8, "position_gap": 0.1},
             1: {"walked": 1.0, "copied": 0.7, "states_gold": 0.4, "letter_follows": 1.0}}  # an eval.json before the gap
    for seed, walk in walks.items():
        write(os.path.join(out, f"seed{seed}", "sft", "eval.json"),
              {"results": {"mcq": {"accuracy": 0.5, "chance": {"accuracy": 0.25}, "walk": walk}}})
        write(os.path.join(out, f"seed{seed}", "pretrain", "eval.json"),
              {"results": {"mcq": {"accuracy": 0.25, "chance": {"accuracy": 0.25},
                                   "walk": {"walked": 0.0, "copied": None, "states_gold": 0.0, "letter_follows": None}}}})
    monkeypatch.setattr(report, "plot_curves", lambda *a: "(no curves in this test)")
    report.main(["--out", out, "--data", str(tmp_path / "no_data"), "--seeds", "0,1"])
    saved = json.loads((tmp_path / "out" / "report.json").read_text())["report"]["mcq_walk"]
    assert set(saved) == {"sft"}
    assert saved["sft"]["copied"]["mean"] == pytest.approx(0.8) and saved["sft"]["copied"]["spread"] == pytest.approx(0.1)
    assert saved["sft"]["letter_follows"]["mean"] == pytest.approx(0.9)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| stage 2 SFT | 1.000 ± 0.000 | 0.800 ± 0.100 | 0.500 ± 0.100 | 0.900 ± 0.100 | 0.100 |\n" in md
    assert "| stage 1 pretrain |" not in md.split("How the MCQ replies reach their letter")[1].split("\n\n")[1]


def test_tower_perception_table(tmp_path):
    """Stage 0v is one shared run read at its last curve step; PathoCLIP and the SFT tower are averaged over the
    seeds' frozen probes; a seed without a probe file is left out; no file at all means no table."""
    out = str(tmp_path)
    assert report.tower_markdown(report.collect(out, [0])["tower_perception"], None) == ""
    majority = {"mitoses": 0.25, "pleomorphism": 0.4, "gland_formation": 0.45, "grade": 0.55}
    write(os.path.join(out, "base_vision", "eval.json"), {"majority": majority, "curve": [
        {"step": 10, "mitoses": 0.3, "pleomorphism": 0.5, "gland_formation": 0.5, "grade": 0.6},
        {"step": 20, "mitoses": 0.5, "pleomorphism": 0.8, "gland_formation": 0.9, "grade": 0.7}]})
    with open(os.path.join(out, "times.jsonl"), "w") as f:
        f.write(json.dumps({"stage": "base_vision", "seconds": 222}) + "\n")
    for seed, m in enumerate([0.4, 0.6]):
        frozen = {"mitoses": m, "pleomorphism": 0.7, "gland_formation": 0.8, "grade": 0.65}
        write(os.path.join(out, f"seed{seed}", "clip", "perception.json"), {"frozen": frozen, "majority": majority})
    write(os.path.join(out, "seed1", "sft", "perception.json"), {"frozen": dict(majority, mitoses=0.35),
                                                                   "majority": majority})
    r = report.collect(out, [0, 1])
    assert r["base_vision_seconds"] == 222
    assert r["tower_perception"]["base_vision"]["mitoses"] == {"mean": 0.5, "spread": 0.0, "n": 1}
    assert r["tower_perception"]["clip"]["mitoses"]["mean"] == pytest.approx(0.5)
    assert r["tower_perception"]["sft"]["mitoses"]["n"] == 1
    table = report.tower_markdown(r["tower_perception"], r["base_vision_seconds"])
    assert "| stage 0v tower, its supervised heads (trained once, 222 s) | 0.500 | 0.800 | 0.900 | 0.700 |" in table
    assert "| PathoCLIP, frozen linear probe | 0.500 ± 0.100 | 0.700 ± 0.000 | 0.800 ± 0.000 | 0.650 ± 0.000 |" in table
    assert "| SFT VLM's tower, frozen linear probe | 0.350 | 0.400 | 0.450 | 0.550 |" in table
    assert "| majority class | 0.250 | 0.400 | 0.450 | 0.550 | — | — |" in table
    assert "findings readout" not in table  # no readout file: no readout rows


def test_findings_readout_rows(tmp_path):
    """What the stage-1 LM says (pretrain/readout.json) sits under the towers' probes, per finding, averaged
    over the seeds that have it; grade, which the readout does not ask, is a dash; probe-only findings
    (necrosis, mucin) fill their columns; an SFT readout file is not a row (SFT answers in the chat format)."""
    out = str(tmp_path)
    majority = {"mitoses": 0.25, "pleomorphism": 0.4, "gland_formation": 0.45, "grade": 0.55, "necrosis": 0.6,
                "mucin": 0.7}
    frozen = {"mitoses": 0.5, "pleomorphism": 0.8, "gland_formation": 0.85, "grade": 0.8, "necrosis": 0.84, "mucin": 0.79}
    write(os.path.join(out, "seed0", "clip", "perception.json"), {"frozen": frozen, "majority": majority})

    def says(mitoses, necrosis):
        cells = {"mitoses": mitoses, "pleomorphism": 0.7, "gland_formation": 0.85, "necrosis": necrosis, "mucin": 0.7}
        return {"readout": {a: {"accuracy": v, "n": 600} for a, v in cells.items()}}
    write(os.path.join(out, "seed0", "pretrain", "readout.json"), says(0.3, 0.6))
    write(os.path.join(out, "seed1", "pretrain", "readout.json"), says(0.4, 0.7))
    write(os.path.join(out, "seed1", "sft", "readout.json"), says(0.35, 0.65))
    r = report.collect(out, [0, 1])["tower_perception"]
    assert r["pretrain_says"]["mitoses"]["mean"] == pytest.approx(0.35) and r["pretrain_says"]["mitoses"]["n"] == 2
    assert r["pretrain_says"]["grade"] is None and "sft_says" not in r
    table = report.tower_markdown(r, None)
    assert "| PathoCLIP, frozen linear probe | 0.500 | 0.800 | 0.850 | 0.800 | 0.840 | 0.790 |" in table
    assert "| stage 1 LM says (findings readout) | 0.350 ± 0.050 | 0.700 ± 0.000 | 0.850 ± 0.000 | — | 0.650 ± 0.050 | 0.700 ± 0.000 |" in table
    assert "| majority class | 0.250 | 0.400 | 0.450 | 0.550 | 0.600 | 0.700 |" in table
    assert "stage 0v" not in table  # no base_vision/eval.json


def times_file(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps({"stage": k, "seconds": v}) + "\n" for k, v in rows)


def test_time_a_seed_counts_shared_stages_once(tmp_path):
    out = str(tmp_path)
    times_file(os.path.join(out, "times.jsonl"), [("base_lm", 300), ("base_lm_near", 60), ("base_vision", 240)])
    times_file(os.path.join(out, "seed0", "times.jsonl"), [("clip", 60), ("sft", 100), ("evaluate", 40)])
    times_file(os.path.join(out, "seed1", "times.jsonl"), [("clip", 80), ("sft", 120), ("evaluate/eval_sft", 40),
                                                            ("evaluate/eval_sft", 45),  # evaluated again: the last line
                                                            ("evaluate/diagnose_sft", 15)])
    r = report.collect(out, [0, 1])
    # by hand: seeds 200 and 260 s -> mean 230; shared 600 s over 2 seeds -> 300; 530 s a seed
    assert r["time"]["seed"]["mean"] == pytest.approx(230)
    assert r["time"]["shared"] == 600
    assert r["time"]["per_seed"] == pytest.approx(530)
    assert r["time"]["evaluate"]["mean"] == pytest.approx(50)
    claim = [c for c in report.claims(r) if c[0].startswith("toy speedrun")]
    assert claim[0][1] is True and claim[0][2].startswith("8.8 min a seed")
    r1 = report.collect(out, [1])  # one seed carries all 600 shared seconds: 260 + 600 = 860 s
    assert r1["time"]["per_seed"] == pytest.approx(860)
    r1["time"]["per_seed"] = 25 * 60 + 1
    assert [c for c in report.claims(r1) if c[0].startswith("toy speedrun")][0][1] is False
    assert [c for c in report.claims(r1, "small") if "a seed" in c[0]][0][1] is None  # information off the toy


def test_no_times_means_no_time_claim(tmp_path):
    r = report.collect(str(tmp_path), [0])
    assert r["time"] is None and not any("a seed" in c[0] for c in report.claims(r))


def test_commit_is_the_one_the_models_record(tmp_path):
    out = str(tmp_path / "out")
    assert report.trained_by(out, [0, 1]) is None  # no model records one
    assert "(the report's checkout" in report.machine_info(out, [0, 1])["commit"]
    write(os.path.join(out, "base_lm", "config.json"), {"code": {"commit": "abc1234", "dirty": False}})
    write(os.path.join(out, "seed0", "sft", "config.json"), {"code": {"commit": "abc1234", "dirty": False}})
    write(os.path.join(out, "seed1", "sft", "config.json"), {"code": None})  # trained outside a git checkout
    assert report.machine_info(out, [0, 1])["commit"] == "abc1234"
    write(os.path.join(out, "seed1", "rl_dapo", "config.json"), {"code": {"commit": "abc1234", "dirty": True}})
    write(os.path.join(out, "seed0", "clip", "config.json"), {"code": {"commit": "0ff1ce0", "dirty": False}})
    assert report.trained_by(out, [0, 1]) == "0ff1ce0, abc1234, abc1234+dirty"
    assert report.trained_by(out, [0]) == "0ff1ce0, abc1234"  # seed 1 is not in this report


def test_mcq_sight_table(tmp_path, monkeypatch):
    """sight.json's per-finding split averaged over seeds per stage; a grade question's two findings get a row each;
    a stage without the file gets no row."""
    out = str(tmp_path / "out")

    def finding(stated_right, sight, reading, unstated=0.0):
        return {"stated": 1.0, "stated_right": stated_right, "follows": 1.0 - reading, "sight": sight,
                "reading": reading, "unstated": unstated, "other": 0.0}
    for seed, sr in enumerate([0.4, 0.6]):
        split = {"mitoses": {"n": 60, "right": sr, "no_answer": 0.0, "findings": {"mitoses": finding(sr, 1 - sr, 0.0)}},
                 "grade": {"n": 65, "right": 0.3, "no_answer": 0.0,
                           "findings": {"grade": finding(0.8, 0.2, 0.0), "necrosis": finding(0.2, 0.1, 0.1, 0.4)}}}
        write(os.path.join(out, f"seed{seed}", "sft", "sight.json"), {"split": split})
    r = report.collect(out, [0, 1])
    assert set(r["mcq_sight"]) == {"sft"}
    assert r["mcq_sight"]["sft"]["mitoses/mitoses"]["stated_right"]["mean"] == pytest.approx(0.5)
    assert r["mcq_sight"]["sft"]["tissue/tissue"]["right"] is None  # no tissue questions in these files
    table = report.sight_markdown(r["mcq_sight"])
    assert "| stage 2 SFT: mitoses | 0.500 ± 0.100 | 0.500 ± 0.100 | 1.000 ± 0.000 | 0.500 ± 0.100 | 0.000 ± 0.000 |" in table
    assert "| stage 2 SFT: grade (necrosis half) | 0.300 ± 0.000 | 0.200 ± 0.000 | 0.900 ± 0.000 | 0.100 ± 0.000 | " \
           "0.100 ± 0.000 | 0.400 ± 0.000 | 0.000 ± 0.000 |" in table
    assert "tissue" not in table and "GRPO" not in table
    monkeypatch.setattr(report, "plot_curves", lambda *a: "(no curves in this test)")
    report.main(["--out", out, "--data", str(tmp_path / "no_data"), "--seeds", "0,1"])
    assert table in (tmp_path / "out" / "report.md").read_text()
    assert report.sight_markdown(report.collect(str(tmp_path / "empty"), [0])["mcq_sight"]) == ""
