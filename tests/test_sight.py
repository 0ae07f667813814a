"""data.synthpath.sight: the MCQ error split into sight / reading / unstated / other."""
import json

import numpy as np
import pytest
from PIL import Image

from data.synthpath import sight, text, world

MITOSES = {"type": "mitoses", "options": ["A) 2", "B) 3", "C) 0", "D) 1"], "answer": "D"}  # gold: 1


def reply(statement, walk, letter):
    return f"<think>{statement} Checking the options:\n{walk}\nSo the answer is {letter}.</think><answer>{letter}</answer>"


def test_hand_case_mitoses():
    replies = [
        reply("I see no near-black condensed mitotic figures.", "A) 2: no.\nB) 3: no.\nC) 0: yes.", "C"),  # saw 0: sight
        reply("I count one near-black condensed mitotic figure with clear halos, so 1.", "A) 2: no.\nB) 3: yes.", "B"),  # reading
        reply("I count one near-black condensed mitotic figure with clear halos, so 1.", "D) 1: yes.", "D"),  # right
        "<think>The tile shows crowded nuclei.</think>",  # no statement, no answer
    ]
    t = sight.split([MITOSES] * 4, replies)["mitoses"]
    f = t["findings"]["mitoses"]
    assert (t["n"], t["right"], t["no_answer"]) == (4, 0.25, 0.25)
    assert (f["stated"], f["stated_right"]) == (0.75, 0.5)
    assert f["follows"] == pytest.approx(2 / 3)  # replies 1 and 3 answer what they state, reply 2 does not
    assert (f["sight"], f["reading"], f["unstated"], f["other"]) == (0.25, 0.25, 0.0, 0.0)


def test_hand_case_grade_two_findings():
    options = [f"{k}) {o}" for k, o in zip("ABCD", text.GRADE_OPTIONS)]  # low w/o, low with, high w/o, high with
    item = {"type": "grade", "options": options, "answer": "C"}  # high grade, without necrosis
    short = reply("Rule: ... Here gland formation is poor, so it is high grade.", "A) x: no.\nB) y: no.\nC) z: no.\nD) w: yes.", "D")
    seen = reply("There is pink granular debris with nuclear dust: dirty necrosis is present. Here gland formation is poor, "
                 "so it is high grade.", "D) w: yes.", "D")
    t = sight.split([item, item], [short, seen])["grade"]
    grade, necrosis = t["findings"]["grade"], t["findings"]["necrosis"]
    assert t["right"] == 0.0
    assert (grade["stated_right"], grade["follows"], grade["sight"] + grade["reading"]) == (1.0, 1.0, 0.0)
    assert (necrosis["stated"], necrosis["stated_right"], necrosis["follows"]) == (0.5, 0.0, 1.0)
    assert set(grade) == set(necrosis) == {"stated", "stated_right", "follows", *sight.CAUSES}  # no working counts left
    silent = sight.split([MITOSES], ["<think>Crowded nuclei.</think>"])["mitoses"]["findings"]["mitoses"]
    assert silent["follows"] is None and set(silent) == set(grade)  # nothing stated: no share, no stray count
    assert (necrosis["unstated"], necrosis["sight"]) == (0.5, 0.5)


def test_walk_lines_are_not_statements():
    # the walk copies option text ("B) 3: yes."); only what comes before it is a statement
    assert sight.stated(reply("I see crowded nuclei.", "B) 3: yes.", "B"), "mitoses") is None
    assert sight.stated("... so no necrosis. Checking the options:\nA) low grade, with necrosis: yes.", "necrosis") == "without"
    assert sight.stated("The tile shows dense wavy fibres, which is cancer-associated stroma.", "tissue") == "cancer-associated stroma"


def gold_chains(seed, n):
    """n MCQ items of every type with SynthPath's own chains (every length) as replies, and a wrong letter each."""
    rng = np.random.default_rng(seed)
    items, replies, wrong = [], [], []
    for i in range(n):
        qtype = list(sight.OPTION_VALUES)[i % 4] if i % 5 else "tissue"
        cls = "TUM" if qtype != "tissue" else text.CLASSES[int(rng.integers(len(text.CLASSES)))]
        attrs = world.sample_attributes(rng, cls)
        q = text.ask(rng, qtype, "mcq", cls, attrs, pos=int(rng.integers(4)))
        chain = text.chain(rng, q, cls, attrs, ("short", "medium", "long")[i % 3])
        items.append(q)
        replies.append(f"<think>{chain}</think><answer>{q['answer']}</answer>")
        other = next(o[0] for o in q["options"] if o[0] != q["answer"])
        wrong.append(replies[-1].replace(f"<answer>{q['answer']}</answer>", f"<answer>{other}</answer>"))
    return items, replies, wrong


def test_gold_chains_state_the_truth_and_follow_it():
    items, replies, wrong = gold_chains(0, 100)
    tally = sight.split(items, replies)
    assert set(tally) == {"tissue", "glands", "pleomorphism", "mitoses", "grade"}
    for qtype, t in tally.items():
        assert (t["right"], t["no_answer"]) == (1.0, 0.0)
        for finding, f in t["findings"].items():
            assert f["stated_right"] == f["stated"], (qtype, finding)  # what the chain states is the truth
            assert sum(f[c] for c in sight.CAUSES) == 0.0
            assert f["stated"] == (1.0 if finding != "necrosis" else pytest.approx(1 / 3, abs=0.15))  # long chains only
    # the same replies with another letter: every one-finding error is reading (a right statement not followed)
    for qtype, t in sight.split(items, wrong).items():
        assert t["right"] == 0.0
        if qtype != "grade":
            (f,) = t["findings"].values()
            assert f["reading"] == 1.0 and f["follows"] == 0.0


def test_cli_reads_the_replies_an_evaluate_run_kept(tmp_path, capsys):
    items, replies, _ = gold_chains(1, 20)
    (tmp_path / "images").mkdir()
    with open(tmp_path / "mcq_test.jsonl", "w") as f:
        for i, q in enumerate(items):
            Image.new("RGB", (8, 8)).save(tmp_path / "images" / f"{i}.png")
            f.write(json.dumps({"image": f"images/{i}.png", **{k: q[k] for k in ("question", "options", "answer", "type")}}) + "\n")
    run = tmp_path / "eval.json"
    run.write_text(json.dumps({"data": str(tmp_path), "limit": None, "results": {"mcq": {"responses": replies}}}))
    sight.main(["--eval", str(run), "--out", str(tmp_path / "sight.json")])
    saved = json.loads((tmp_path / "sight.json").read_text())["split"]
    assert saved == sight.split(items, replies) and all(t["right"] == 1.0 for t in saved.values())
    assert "mitoses       mitoses" in capsys.readouterr().out
    run.write_text(json.dumps({"data": str(tmp_path), "limit": 5, "results": {"mcq": {"responses": replies}}}))
    with pytest.raises(SystemExit, match="20 replies for 5 items"):
        sight.main(["--eval", str(run)])
    run.write_text(json.dumps({"data": str(tmp_path), "limit": None, "results": {"mcq": {"accuracy": 1.0}}}))
    with pytest.raises(SystemExit, match="--responses"):
        sight.main(["--eval", str(run)])
