"""nanopatho/diagnose.py: which tokens of a reply get which role, the per-role summary, and
that the per-token losses are the model's own training loss split up.

    python -m pytest -q tests/test_diagnose.py
"""

import json
import math
import os

import pytest
import torch

from e2e_util import tiny_world
from nanopatho import checkpoint, diagnose
from nanopatho.data import collate_lm, preload_images, to_float

START, END = 100, 101  # stand-ins for the <answer> and </answer> ids


def test_token_roles_hand_case():
    pieces = ["<think>", " options", ":\n", "A", ")", " fat", ":", " no", ".\n", "B", ")", " mu", "cus", ":", " yes",
              ".\n", "So", " the", " answer", " is", " B", ".", "</think>", "<answer>", "B", "</answer>"]
    ids = list(range(7, 7 + 23)) + [START, 50, END]
    mask = [0] + [1] * (len(ids) - 1)
    roles = diagnose.token_roles(pieces, mask, ids, (START, END), is_mcq=True)
    O = diagnose.OTHER
    assert roles == [-1, O, O, O, O, 5, 5, 4, O, O, O, 5, 5, 5, 4, O, O, O, O, O, 0, O, O, O, 1, O]
    # the same reply to a question without options has no letter or walk roles
    assert diagnose.token_roles(pieces, mask, ids, (START, END), is_mcq=False) == [-1] + [O] * (len(ids) - 1)


def test_yes_no_decision_in_the_closing_sentence():
    pieces = ["<think>", " So", " the", " answer", " is", " no", ".", "</think>", "<answer>", "no", "</answer>"]
    ids = [7, 8, 9, 10, 11, 12, 13, 14, START, 15, END]
    roles = diagnose.token_roles(pieces, [0] + [1] * 10, ids, (START, END), is_mcq=False)
    O = diagnose.OTHER
    assert roles == [-1, O, O, O, O, 2, O, O, O, 3, O]
    # an open answer in the same sentence is free text ("no" must be the whole word: "normal" is not)
    pieces[5], pieces[9] = " normal", "normal"
    assert diagnose.token_roles(pieces, [0] + [1] * 10, ids, (START, END), is_mcq=False) == [-1] + [O] * 10


def test_yes_no_split_over_two_tokens_scores_only_the_first():
    pieces = ["<answer>", "y", "es", "</answer>"]
    ids = [START, 1, 2, END]
    O = diagnose.OTHER
    assert diagnose.token_roles(pieces, [1, 1, 1, 1], ids, (START, END), is_mcq=False) == [-1, 3, O, O]
    # an open answer after <answer> is free text, even when it starts with a capital letter
    pieces = ["<answer>", "H", "&E", "</answer>"]
    assert diagnose.token_roles(pieces, [1, 1, 1, 1], ids, (START, END), is_mcq=True) == [-1, O, O, O]


def test_summarize_hand_case():
    nll = [1.0, 3.0, 0.5, 0.1, 0.3]
    correct = [True, False, True, True, False]
    roles = [0, 0, 3, diagnose.OTHER, -1]
    n_options = [4, 5, 0, 0, 0]
    s = diagnose.summarize(nll, correct, roles, n_options)
    assert set(s) == {"option letter (reasoning)", "yes/no in <answer>", "other assistant tokens"}
    opt = s["option letter (reasoning)"]
    assert opt["n"] == 2 and opt["nll"] == pytest.approx(2.0) and opt["top1"] == pytest.approx(0.5)
    assert opt["chance_top1"] == pytest.approx((1 / 4 + 1 / 5) / 2)
    assert opt["chance_nll"] == pytest.approx((math.log(4) + math.log(5)) / 2)
    assert s["yes/no in <answer>"]["chance_nll"] == pytest.approx(math.log(2))
    assert s["other assistant tokens"]["chance_top1"] is None


def test_walk_stats_hand_case_and_property():
    """A walk is right when every check in it is; "match" is its last check (the gold "yes")."""
    C = diagnose.ROLES.index("option check (reasoning)")
    roles = [C, 5, C, C, C, C, diagnose.OTHER, C]
    correct = [True, True, True, True, False, True, False, False]
    conv = [0, 0, 0, 1, 1, 1, 2, 3]  # walks: 0 = [ok, ok], 1 = [ok, miss, ok], 2 = none, 3 = [miss]
    s = diagnose.walk_stats(correct, roles, conv)
    assert s["walk"]["n"] == s["match"]["n"] == 3
    assert s["walk"]["top1"] == pytest.approx(1 / 3) and s["match"]["top1"] == pytest.approx(2 / 3)
    assert s["walk"]["chance_top1"] == pytest.approx((0.25 + 0.125 + 0.5) / 3) and s["match"]["chance_top1"] == 0.5
    assert diagnose.walk_stats([True], [diagnose.OTHER], [0]) == {}
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # property: a walk right is a match right; all checks right <-> walk 1.0
        n = 40
        conv = sorted(torch.randint(8, (n,), generator=g).tolist())
        roles = [C if r else 0 for r in (torch.rand(n, generator=g) < 0.7).tolist()]
        correct = (torch.rand(n, generator=g) < 0.8).tolist()
        s = diagnose.walk_stats(correct, roles, conv)
        assert s["walk"]["top1"] <= s["match"]["top1"]
        checks = [ok for ok, r in zip(correct, roles) if r == C]
        assert (s["walk"]["top1"] == 1.0) == all(checks)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world(tmp_path_factory)


def test_per_token_losses_are_the_models_own_masked_loss(world):
    model, _, tokenizer = checkpoint.load(world["init"], expect="vlm")
    convs = diagnose.held_out(os.path.join(world["data"], "sft_train.jsonl"), val_every=2, limit=6)
    assert len(convs) == 6
    nll, correct, roles, _, conv = diagnose.score(model, tokenizer, convs, batch_size=4)
    ours = sum(x for x, r in zip(nll, roles) if r >= 0) / sum(r >= 0 for r in roles)

    seqs = [tokenizer.render_chat(c["messages"], model.n_image_tokens) for c in convs]
    images, _, _ = preload_images([{"image": c["images"][0]} for c in convs], model.config.vision.image_size)
    batch = collate_lm(seqs, tokenizer.pad_id)
    with torch.no_grad():
        _, loss = model(batch["input_ids"], to_float(images), attention_mask=batch["attention_mask"],
                        targets=batch["targets"], loss_mask=batch["loss_mask"])
    assert ours == pytest.approx(loss.item(), rel=1e-5)
    assert len(nll) == len(correct) == len(roles) == len(conv)
    # conv names each token's conversation: one run of len(ids) - 1 tokens per conversation, in order
    assert [conv.count(i) for i in range(len(convs))] == [len(ids) - 1 for ids, _ in seqs] and conv == sorted(conv)



def test_text_only_rows_score_as_if_alone(world, tmp_path):
    """A conversation without an image is held out and scored like the others; batched between
    image rows it gets the same per-token losses as scored on its own (images go to their rows)."""
    with_image = diagnose.held_out(os.path.join(world["data"], "sft_train.jsonl"), val_every=2, limit=2)
    text_only = dict(with_image[0], images=[], source="text-only")
    text_only["messages"] = [dict(m, content=m["content"].replace("<image>\n", "")) for m in text_only["messages"]]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"messages": text_only["messages"], "images": []},  # row 0: not held out at val_every=2
        {"messages": text_only["messages"], "images": []}]))  # row 1: held out
    assert [c["images"] for c in diagnose.held_out(str(path), val_every=2, limit=0)] == [[]]

    model, _, tokenizer = checkpoint.load(world["init"], expect="vlm")
    mixed = [with_image[0], text_only, with_image[1]]
    together = diagnose.score(model, tokenizer, mixed, batch_size=3)[0]
    alone = [diagnose.score(model, tokenizer, [c], batch_size=1)[0] for c in mixed]
    assert together == pytest.approx(alone[0] + alone[1] + alone[2], abs=1e-4)
    ids, _ = tokenizer.render_chat(text_only["messages"], model.n_image_tokens)
    assert tokenizer.image_id not in ids and len(alone[1]) == len(ids) - 1

def test_cli_writes_json(world, tmp_path, capsys):
    out = tmp_path / "diag.json"
    diagnose.main(["--ckpt", world["init"], "--data", world["data"], "--val_every", "2", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["conversations"] > 0
    assert "other assistant tokens" in report["roles"]
    assert "token role" in capsys.readouterr().out
