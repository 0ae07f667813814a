"""speedrun.sh's control flow with every stage faked: stage 0 is retrained with the next seed while
the reading probe's whole walks are below the bar (--base_tries, `--require walk=0.8`), each miss is
kept and its time counted, and a last miss goes on with a warning.

    python -m pytest -q tests/test_speedrun.py

The fake interpreter stands in for $PYTHON: a training script writes <out_dir>/model.safetensors
and the seed it was given; `diagnose --require walk=0.8` exits 3 (as the real one does below the bar)
for a checkpoint trained with a seed listed in FAKE_MISS.
"""

import json
import os
import subprocess
import sys

import pytest

from e2e_util import ROOT

FAKE = r'''
import json, os, sys
args = sys.argv[1:]
if args[0] == "-c":          # prepare.stale: the world is current
    sys.exit(0)
value = lambda flag: args[args.index(flag) + 1] if flag in args else None
module = value("-m") or args[0]
with open(os.environ["FAKE_LOG"], "a") as f:
    kind = "trains" if value("--out_dir") else "reads"
    read = value('--ckpt') or value('--init') or (value('--eval') and os.path.dirname(value('--eval')))
    f.write(f"{module} {kind} {value('--out_dir') or read} seed {value('--seed')}\n")
if value("--out_dir"):
    os.makedirs(value("--out_dir"), exist_ok=True)
    open(os.path.join(value("--out_dir"), "model.safetensors"), "w").close()
    with open(os.path.join(value("--out_dir"), "seed"), "w") as f:
        f.write(value("--seed") or "0")
    print(f"[{module.split('.')[-1]}] done")
elif value("--out") and module != "nanopatho.report":
    with open(value("--out"), "w") as f:
        json.dump({}, f)
elif module == "nanopatho.evaluate":
    with open(os.path.join(value("--ckpt"), "eval.json"), "w") as f:
        json.dump({"results": {"mcq": {"responses": []}}} if "--responses" in args else {}, f)
if module == "nanopatho.diagnose" and value("--require"):
    with open(os.path.join(value("--ckpt"), "seed")) as f:
        seed = f.read()
    if seed in os.environ["FAKE_MISS"].split(",") and value("--require") == "walk=0.8":  # the gate: whole walks
        print(f"{value('--ckpt')}: reading probe below --require: walk 0.690 < 0.8", file=sys.stderr)
        sys.exit(3)
'''


def speedrun(tmp_path, miss, *flags):
    fake = tmp_path / "fake.py"
    fake.write_text(FAKE)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=f"{sys.executable} {fake}", OUT=str(out), SKIP_SETUP="1",
               FAKE_MISS=miss, FAKE_LOG=str(tmp_path / "calls.log"))
    proc = subprocess.run(["bash", "speedrun.sh", "--seeds", "0", *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = tmp_path / "calls.log"
    calls = log.read_text().splitlines() if log.exists() else []  # none when every stage was already done
    return out, proc, [c for c in calls if c.startswith("nanopatho.base_lm ")]


def times(out):
    with open(out / "times.jsonl") as f:
        return [json.loads(line)["stage"] for line in f]


def test_base_tries_retrains_stage0_with_the_next_seed_and_keeps_the_miss(tmp_path):
    out, proc, base_calls = speedrun(tmp_path, "0", "--base_tries", "3")
    assert [c.split()[-1] for c in base_calls] == ["0", "0", "1", "1"]  # both phases at seed 0, then at seed 1
    assert (out / "base_lm" / "seed").read_text() == "1" and (out / "base_lm_near" / "seed").read_text() == "1"
    assert (out / "base_lm.seed0" / "base_lm" / "seed").read_text() == "0"  # the miss, kept
    assert (out / "base_lm.seed0" / "diagnose_base_lm_near.log").exists()
    assert not (out / "base_lm.seed1").exists() and not (out / "base_lm.seed2").exists()  # seed 1 passed: no third try
    assert "[base_lm] seed 0 did not learn to check" in proc.stdout and "warning" not in proc.stderr
    assert times(out)[:5] == ["base_lm", "base_lm_near", "base_lm.seed0", "base_lm", "base_lm_near"]


def test_a_last_miss_goes_on_with_a_warning(tmp_path):
    out, proc, base_calls = speedrun(tmp_path, "0,1", "--base_tries", "2")
    assert [c.split()[-1] for c in base_calls] == ["0", "0", "1", "1"]
    assert (out / "base_lm.seed0").is_dir() and not (out / "base_lm.seed1").exists()
    assert (out / "base_lm" / "seed").read_text() == "1"  # the last try stays where stage 1 reads it
    assert "warning" in proc.stderr and "--base_tries" in proc.stderr
    assert (out / "seed0" / "sft" / "model.safetensors").exists()  # the seeds still ran


@pytest.mark.parametrize("miss, warned", [("", False), ("0", True)])
def test_one_try(tmp_path, miss, warned):
    out, proc, base_calls = speedrun(tmp_path, miss, "--base_tries", "1")
    assert [c.split()[-1] for c in base_calls] == ["0", "0"]
    assert not any(p.name.startswith("base_lm.seed") for p in out.iterdir())
    assert ("warning" in proc.stderr) == warned


def test_three_tries_by_default(tmp_path):
    out, proc, base_calls = speedrun(tmp_path, "0,1,2")
    assert [c.split()[-1] for c in base_calls] == ["0", "0", "1", "1", "2", "2"]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("base_lm.seed")) == ["base_lm.seed0",
                                                                                           "base_lm.seed1"]
    assert "warning" in proc.stderr


@pytest.mark.parametrize("flags", [("--base_tries", "0"), ("--base_tries", "two"), ("--base_seed", "-1")])
def test_bad_base_flags_are_refused_before_any_stage(tmp_path, flags):
    proc = subprocess.run(["bash", "speedrun.sh", *flags], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHON="false", OUT=str(tmp_path / "out"), SKIP_SETUP="1"))
    assert proc.returncode == 2 and "--base_tries wants a count >= 1" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_rerun_skips_the_kept_miss(tmp_path):
    """Resume: a miss kept by an interrupted speedrun is not trained again; the next seed's try is reused."""
    speedrun(tmp_path, "0", "--base_tries", "3")
    (tmp_path / "calls.log").unlink()
    _, proc, base_calls = speedrun(tmp_path, "0", "--base_tries", "3")
    assert "[base_lm] already done" in proc.stdout and "did not learn" not in proc.stdout
    assert base_calls == []


def test_base_seed_picks_stage0s_first_seed(tmp_path):
    out, proc, base_calls = speedrun(tmp_path, "5", "--base_seed", "5", "--base_tries", "2")
    assert [c.split()[-1] for c in base_calls] == ["5", "5", "6", "6"]
    assert (out / "base_lm.seed5").is_dir() and (out / "base_lm" / "seed").read_text() == "6"


def evaluations(tmp_path):
    """(module, checkpoint) of the calls that read a seed's checkpoint (evaluate, diagnose, perception, readout, sight)."""
    with open(tmp_path / "calls.log") as f:
        rows = [line.split() for line in f]
    return [(r[0], r[2]) for r in rows if r[1] == "reads" and os.sep + "seed0" + os.sep in r[2]]


def test_a_rerun_skips_evaluations_already_done_and_redoes_a_retrained_models(tmp_path):
    """Resume: an evaluation whose output is newer than its model is not run again, and adds no time row; a model
    trained again after its evaluation (here rl_dapo's, made newer) is evaluated again and timed again."""
    out, _, _ = speedrun(tmp_path, "")
    first = evaluations(tmp_path)
    assert [m for m, _ in first].count("nanopatho.evaluate") == 4 and len(first) == 12  # + 2 diagnose, 2 perception,
    assert [c for m, c in first if m == "data.synthpath.sight"] == [  # readout, and 3 sight splits of kept replies
        str(out / "seed0" / ck) for ck in ("sft", "rl_grpo", "rl_dapo")]
    (tmp_path / "calls.log").unlink()
    _, proc, _ = speedrun(tmp_path, "")
    assert evaluations(tmp_path) == [] and "[eval] rl_dapo" in proc.stdout
    timed = [t for t in times(out / "seed0") if t.startswith("evaluate/")]
    assert len(timed) == 12 and "evaluate/perception_clip" in timed
    dapo = out / "seed0" / "rl_dapo" / "model.safetensors"
    later = os.stat(dapo.parent / "eval.json").st_mtime + 10
    os.utime(dapo, (later, later))
    (tmp_path / "calls.log").unlink()
    speedrun(tmp_path, "")
    assert evaluations(tmp_path) == [("nanopatho.evaluate", str(dapo.parent)), ("data.synthpath.sight", str(dapo.parent))]
    assert [t for t in times(out / "seed0") if t.startswith("evaluate/")] == timed + ["evaluate/eval_rl_dapo",
                                                                                      "evaluate/sight_rl_dapo"]


def test_sight_skips_an_evaluation_from_before_kept_replies(tmp_path):
    """A resumed run whose eval.json predates --responses keeps no replies: the sight split says so and goes on."""
    out, _, _ = speedrun(tmp_path, "")
    sft = out / "seed0" / "sft"
    (sft / "eval.json").write_text("{}")
    (sft / "sight.json").unlink()
    (tmp_path / "calls.log").unlink()
    _, proc, _ = speedrun(tmp_path, "")
    assert "[sight] sft: eval.json keeps no replies, skipped" in proc.stdout
    assert not (tmp_path / "calls.log").exists() or "data.synthpath.sight" not in (tmp_path / "calls.log").read_text()
