"""Stage 0 end to end: `python -m nanopatho.base_lm` writes an LM checkpoint that
`train_pretrain.py --lm_init` continues exactly, and the reading probe scores an LM and a VLM
holding the same LM identically.

    python -m pytest -q tests/test_base_lm.py
"""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

import train_pretrain
from e2e_util import ROOT, env, metrics, tiny_world
from nanopatho import checkpoint, diagnose
from nanopatho.presets import vlm_config
from nanopatho.vlm import VLM


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    world = tiny_world(tmp_path_factory)
    out = str(tmp_path_factory.mktemp("base_lm"))
    cmd = [sys.executable, "-m", "nanopatho.base_lm", "--data", world["data"], "--out_dir", out, "--device", "cpu",
           "--num_threads", "1", "--max_steps", "4", "--level_steps", "1,1", "--batch_size", "4", "--val_rows", "4",
           "--eval_every", "2", "--eval_batches", "1", "--warmup_steps", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return world, out, proc


def test_base_lm_writes_an_lm_checkpoint_with_probe_metrics(base):
    world, out, proc = base
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["model_type"] == "lm"
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    evaluated = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evaluated] == [2, 4]
    for r in evaluated:  # the probe's skills are scored at every evaluation
        assert all(0.0 <= r[f"probe_{k}"] <= 1.0 for k in ("copy", "check", "option", "same"))
    assert "[base_lm] done" in proc.stdout and "probe_option" in proc.stdout


def test_lm_init_continues_the_base_lm_exactly(base):
    world, out, _ = base
    cfg = train_pretrain.Config(data=world["data"], lm_init=out)
    model, _ = train_pretrain.build_model(cfg)
    lm, _, _ = checkpoint.load(out, expect="lm")
    assert model.config.lm == lm.config
    for name, tensor in lm.state_dict().items():
        assert torch.equal(model.lm.state_dict()[name], tensor), name


def test_lm_init_refuses_another_vocabulary(base, tmp_path):
    world, out, _ = base
    lm, _, tokenizer = checkpoint.load(out, expect="lm")
    from nanopatho.lm import LM, LMConfig
    other = LM(LMConfig(vocab_size=lm.config.vocab_size + 7, n_layer=1, n_head=2, n_kv_head=1, n_embd=16,
                        intermediate_size=32, max_seq_len=64))
    checkpoint.save_model(str(tmp_path), other, tokenizer)
    proc = subprocess.run([sys.executable, "train_pretrain.py", "--data", world["data"], "--lm_init", str(tmp_path),
                           "--out_dir", str(tmp_path / "o"), "--max_steps", "1"], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "vocabulary" in proc.stderr.splitlines()[-1]


def second_phase(world, init, out, *extra):
    cmd = [sys.executable, "-m", "nanopatho.base_lm", "--data", world["data"], "--out_dir", str(out), "--device", "cpu",
           "--num_threads", "1", "--init", str(init), "--train_file", "reading_near.jsonl", "--level_steps", "1",
           "--max_steps", "2", "--batch_size", "4", "--val_rows", "4", "--eval_every", "2", "--eval_batches", "1",
           "--warmup_steps", "1", "--max_seq_len", "512", *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=180)


def test_second_phase_continues_the_first(base, tmp_path):
    """--init starts from the given LM: at lr 0 the second phase's LM is the first's, tensor for tensor;
    at the preset's lr it moves away from it."""
    world, out, _ = base
    first, _, _ = checkpoint.load(out, expect="lm")
    for lr, same in (("0", True), ("1e-3", False)):
        proc = second_phase(world, out, tmp_path / lr, "--lr", lr)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"continuing {out}" in proc.stdout
        second, _, _ = checkpoint.load(str(tmp_path / lr), expect="lm")
        equal = [torch.equal(second.state_dict()[k], v) for k, v in first.state_dict().items()]
        assert all(equal) if same else not all(equal)


def test_second_phase_refuses_another_vocabulary(base, tmp_path):
    world, out, _ = base
    lm, _, tokenizer = checkpoint.load(out, expect="lm")
    from nanopatho.lm import LM
    other = LM(dataclasses.replace(lm.config, vocab_size=lm.config.vocab_size + 7))
    checkpoint.save_model(str(tmp_path / "other"), other, tokenizer)
    proc = second_phase(world, tmp_path / "other", tmp_path / "o")
    assert proc.returncode != 0 and "--init" in proc.stderr.splitlines()[-1] and "vocabulary" in proc.stderr.splitlines()[-1]


def test_probe_scores_an_lm_and_its_vlm_alike(base):
    """Property: text-only probe rows through a VLM use only its LM, so the numbers are the LM's own."""
    world, out, _ = base
    lm, _, tokenizer = checkpoint.load(out, expect="lm")
    vlm = VLM(vlm_config("toy", tokenizer.vocab_size, tokenizer.image_id))
    vlm.lm.load_state_dict(lm.state_dict())
    probe = diagnose.load_probe(os.path.join(world["data"], "reading_probe.jsonl"))
    a, b = diagnose.probe_stats(lm, tokenizer, probe), diagnose.probe_stats(vlm, tokenizer, probe)
    assert set(a) == {"copy", "check", "option", "same", "walk", "match", "near_check", "near_walk"}
    for skill in a:
        assert a[skill]["n"] == b[skill]["n"] > 0
        assert a[skill]["top1"] == b[skill]["top1"]
        if a[skill]["nll"] is not None:  # None for whole walks (walk, match, near_walk)
            assert a[skill]["nll"] == pytest.approx(b[skill]["nll"], abs=1e-5)


def test_diagnose_require_exits_3_below_the_bar(base, tmp_path, capsys):
    """`diagnose --require check=MIN` (speedrun.sh --base_tries): status 3 exactly when the probe's check
    top-1 is below MIN, after the JSON is written; a bad spec is refused before any scoring."""
    world, out, _ = base
    args = ["--ckpt", out, "--data", world["data"], "--probe", "reading_probe.jsonl", "--out", str(tmp_path / "d.json")]
    diagnose.main(args)
    check = json.loads((tmp_path / "d.json").read_text())["probe"]["check"]["top1"]
    (tmp_path / "d.json").unlink()
    diagnose.main(args + ["--require", f"check={check}"])  # equal to the bar: passes
    assert (tmp_path / "d.json").exists()
    (tmp_path / "d.json").unlink()
    with pytest.raises(SystemExit) as e:
        diagnose.main(args + ["--require", f"copy=0,check={check + 0.001}"])
    assert e.value.code == 3 and (tmp_path / "d.json").exists()
    assert f"check {check:.3f} < {check + 0.001:g}" in capsys.readouterr().err.splitlines()[-1]
    for bad in ("chek=0.8", "check", "check=high"):
        with pytest.raises(SystemExit) as e:
            diagnose.main(args + ["--require", bad])
        assert e.value.code == 2 and "--require" in capsys.readouterr().err
    assert diagnose.unmet({"check": {"top1": 0.7}}, [("check", 0.8), ("same", 0.5)]) == \
        ["check 0.700 < 0.8", "same: no probe item has that role"]
