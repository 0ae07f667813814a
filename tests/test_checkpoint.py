"""Checkpoints: bitwise save/load, tied weights, clear errors, no pickle, atomic snapshots,
exact optimizer/RNG restore, keep-last-K."""

import json
import os
import pickle
import random
import subprocess

import numpy as np
import pytest
import torch

from nanopatho import checkpoint
from nanopatho.clip import PathoCLIP
from nanopatho.presets import clip_config, vlm_config
from nanopatho.tokenizer import Tokenizer
from nanopatho.vlm import VLM


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["tumour cells with large nuclei", "adipose tissue", "mucus pools"] * 20, 300)


def tiny_vlm(tok):
    cfg = vlm_config("toy", tok.vocab_size, tok.image_id)
    cfg.lm.n_layer, cfg.vision.n_layer = 1, 1
    return VLM(cfg)


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_vlm_and_clip_roundtrip_bitwise(tmp_path, tok):
    torch.manual_seed(0)
    for model, kind in ((tiny_vlm(tok), "vlm"), (PathoCLIP(clip_config("toy", tok.vocab_size)), "clip")):
        d = tmp_path / kind
        checkpoint.save_model(str(d), model, tok, {"lr": 1.0})
        loaded, config, tok2 = checkpoint.load(str(d), expect=kind)
        assert type(loaded) is type(model) and config["model_type"] == kind and config["run"] == {"lr": 1.0}
        assert same_weights(model, loaded)
        assert tok2.encode("adipose tissue") == tok.encode("adipose tissue")


def test_wrong_kind_and_mismatched_config_fail_clearly(tmp_path, tok):
    d = tmp_path / "vlm"
    checkpoint.save_model(str(d), tiny_vlm(tok), tok)
    with pytest.raises(checkpoint.CheckpointError, match="holds a 'vlm' model"):
        checkpoint.load(str(d), expect="clip")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model"]["lm"]["n_embd"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(checkpoint.CheckpointError, match="do not match config.json"):
        checkpoint.load(str(d))
    with pytest.raises(checkpoint.CheckpointError, match="missing"):
        checkpoint.load(str(tmp_path / "nothing"))


def test_planted_pickle_is_never_read(tmp_path, tok):
    class Boom:
        def __reduce__(self):
            return (open, (str(tmp_path / "PWNED"), "w"))

    d = tmp_path / "ck"
    checkpoint.save_model(str(d), tiny_vlm(tok), tok)
    for name in ("pytorch_model.bin", "model.pt", "train_state.pt"):
        with open(d / name, "wb") as f:
            pickle.dump(Boom(), f)
    checkpoint.load(str(d))
    assert not (tmp_path / "PWNED").exists()


def test_config_names_the_commit_that_saved_it(tmp_path, tok):
    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path / "repo"), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              capture_output=True, text=True, check=True).stdout.strip()
    assert checkpoint.code_version(str(tmp_path)) is None  # not a git checkout
    (tmp_path / "repo").mkdir()
    git("init", "-q")
    (tmp_path / "repo" / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-q", "-m", "one")
    assert checkpoint.code_version(str(tmp_path / "repo")) == {"commit": git("rev-parse", "--short", "HEAD"), "dirty": False}
    (tmp_path / "repo" / "a.py").write_text("x = 2\n")  # an uncommitted edit of a tracked file
    checkpoint.code_version.cache_clear()
    assert checkpoint.code_version(str(tmp_path / "repo"))["dirty"] is True
    d = tmp_path / "ck"
    checkpoint.save_model(str(d), tiny_vlm(tok), tok)
    assert json.loads((d / "config.json").read_text())["code"] == checkpoint.code_version()  # this checkout's


def test_refuses_to_save_nonfinite_weights(tmp_path, tok):
    model = tiny_vlm(tok)
    with torch.no_grad():
        next(model.parameters())[0].fill_(float("nan"))
    with pytest.raises(checkpoint.CheckpointError, match="non-finite"):
        checkpoint.save_model(str(tmp_path / "nan"), model, tok)
    assert not (tmp_path / "nan" / "config.json").exists()


def test_snapshot_restores_optimizer_and_rngs_exactly(tmp_path, tok):
    torch.manual_seed(0)
    model = tiny_vlm(tok)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, tok.vocab_size, (2, 8))
    ids[ids == tok.image_id] = 0

    def step():
        _, loss = model(ids, None, targets=ids)
        loss.backward()
        opt.step()
        opt.zero_grad()

    step()
    path = checkpoint.save_checkpoint(str(tmp_path), 1, model, tok, {}, opt, {"step": 1, "note": "x"})
    expected = (torch.rand(3), np.random.rand(), random.random())
    step()
    after_two = {k: v.clone() for k, v in model.state_dict().items()}

    torch.manual_seed(123)
    model2 = tiny_vlm(tok)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    state = checkpoint.load_train_state(path, model2, opt2)
    assert state == {"step": 1, "note": "x"}
    assert (torch.rand(3).tolist(), np.random.rand(), random.random()) == (expected[0].tolist(), *expected[1:])
    model, opt = model2, opt2
    step()
    assert all(torch.equal(after_two[k], v) for k, v in model2.state_dict().items())


def test_keep_last_k_and_half_written_snapshots_are_ignored(tmp_path, tok):
    model = tiny_vlm(tok)
    opt = torch.optim.AdamW(model.parameters())
    for s in (1, 2, 3):
        checkpoint.save_checkpoint(str(tmp_path), s, model, tok, {}, opt, {"step": s}, keep=2)
    names = [os.path.basename(p) for p in checkpoint.list_checkpoints(str(tmp_path))]
    assert names == ["step_000002", "step_000003"]
    os.makedirs(tmp_path / "checkpoints" / ".tmp_step_000004")  # a save killed mid-way
    assert checkpoint.latest_checkpoint(str(tmp_path)).endswith("step_000003")
