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
        return {"results": {"mcq": {"accuracy": acc, "chance": {"accuracy": 0.25}},
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


def test_no_diagnose_files_means_no_role_table(tmp_path):
    assert report.token_roles(str(tmp_path), [0, 1]) == {}
    assert report.roles_markdown({}) == ""
