"""Evaluation metrics: each pinned by a hand-computed case and a property test."""

import json
import math

import numpy as np
import pytest
import torch

from nanopatho.evaluate import (build_zeroshot_classifier, closed_answer_correct, closed_vqa_metrics, format_table,
                                gt_ranks, linear_probe, mcq_metrics, open_vqa_metrics, position_gap, read_walk,
                                retrieval_metrics, strip_end_markers, token_f1_recall, walk_metrics, zeroshot_metrics)

# -----------------------------------------------------------------------------
# retrieval

SIM = torch.tensor([
    [0.9, 0.1, 0.2, 0.3],  # gt 0.9 is the best            -> rank 1
    [0.5, 0.4, 0.6, 0.1],  # 0.5 and 0.6 beat 0.4          -> rank 3
    [0.7, 0.7, 0.7, 0.7],  # all tied: ties count against  -> rank 4
    [0.2, 0.8, 0.1, 0.8],  # one tie with the gt           -> rank 2
])


def test_retrieval_ranks_hand_case_with_ties():
    assert gt_ranks(SIM).tolist() == [1, 3, 4, 2]
    assert gt_ranks(SIM.T).tolist() == [1, 3, 1, 1]  # columns: text -> image
    m = retrieval_metrics(SIM, ks=(1, 2, 3))
    assert m["i2t_R@1"] == 0.25 and m["i2t_R@2"] == 0.5 and m["i2t_R@3"] == 0.75
    assert m["i2t_median_rank"] == 2.5
    assert m["t2i_R@1"] == 0.75 and m["t2i_median_rank"] == 1.0
    assert m["chance"]["i2t_R@1"] == 0.25 and m["chance"]["t2i_median_rank"] == 2.5


def test_retrieval_default_ks_and_constant_matrix():
    m = retrieval_metrics(torch.zeros(20, 20))  # every candidate tied: every gt ranks last, no free hits
    assert m["i2t_R@1"] == 0.0 and m["i2t_R@10"] == 0.0 and m["t2i_median_rank"] == 20
    assert m["chance"]["i2t_R@10"] == 0.5 and m["chance"]["i2t_R@5"] == 0.25
    with pytest.raises(AssertionError):
        retrieval_metrics(torch.zeros(3, 4))


def test_retrieval_ranks_match_sorting_and_are_permutation_equivariant():
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(30, 30, generator=g)  # distinct scores: the rank is the sorted position
    order = sim.argsort(dim=1, descending=True)
    expected = (order == torch.arange(30).unsqueeze(1)).float().argmax(dim=1) + 1
    assert torch.equal(gt_ranks(sim), expected)
    perm = torch.randperm(30, generator=g)  # re-indexing the pairs permutes the ranks, nothing else
    assert torch.equal(gt_ranks(sim[perm][:, perm]), gt_ranks(sim)[perm])


# -----------------------------------------------------------------------------
# zero-shot classifier and metrics

PROMPTS = {"0": {"classnames": {"alpha": ["a1", "a2"], "beta": ["b"]}, "templates": ["x CLASSNAME", "y CLASSNAME"]}}
VECS = {"x a1": [3.0, 0.0], "y a1": [0.0, 2.0], "x a2": [0.0, 5.0], "y a2": [0.0, 1.0],
        "x b": [0.0, -2.0], "y b": [0.0, -7.0]}


def test_zeroshot_classifier_hand_case():
    seen = []

    def encode(texts):
        seen.extend(texts)
        return torch.tensor([VECS[t] for t in texts])

    names, W = build_zeroshot_classifier(encode, PROMPTS)
    assert names == ["alpha", "beta"] and sorted(seen) == sorted(VECS)  # every synonym x template
    # alpha: mean of unit vectors (1,0),(0,1),(0,1),(0,1) = (0.25, 0.75) -> (1, 3)/sqrt(10)
    assert torch.allclose(W[0], torch.tensor([1.0, 3.0]) / math.sqrt(10))
    assert torch.allclose(W[1], torch.tensor([0.0, -1.0]))
    names2, W2 = build_zeroshot_classifier(encode, PROMPTS["0"])  # the inner dict works too
    assert names2 == names and torch.equal(W2, W)


def test_zeroshot_classifier_rows_unit_norm():
    g = torch.Generator().manual_seed(1)
    prompts = {"classnames": {f"c{i}": [f"s{i}{j}" for j in range(3)] for i in range(5)},
               "templates": ["a CLASSNAME.", "an image of CLASSNAME", "CLASSNAME tissue"]}
    names, W = build_zeroshot_classifier(lambda texts: 10 * torch.randn(len(texts), 16, generator=g), prompts)
    assert W.shape == (5, 16) and torch.allclose(W.norm(dim=1), torch.ones(5), atol=1e-6)


def test_zeroshot_metrics_hand_case():
    labels = [0, 0, 0, 1, 1, 2]
    preds = [0, 0, 1, 1, 2, 2]
    m = zeroshot_metrics(torch.tensor(preds), torch.tensor(labels), ["a", "b", "c"])
    assert m["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    # F1: a = 2*1*(2/3)/(5/3) = 0.8, b = 0.5, c = 2*0.5*1/1.5 = 2/3; weights 3/6, 2/6, 1/6
    assert m["weighted_f1"] == pytest.approx((3 * 0.8 + 2 * 0.5 + 1 * 2 / 3) / 6)
    assert m["per_class_accuracy"] == pytest.approx({"a": 2 / 3, "b": 0.5, "c": 1.0})
    assert m["chance"]["accuracy"] == pytest.approx(1 / 3)
    assert m["chance"]["weighted_f1"] == pytest.approx(0.2 + 1 / 9 + 1 / 27)
    assert m["majority_accuracy"] == 0.5
    logits = torch.nn.functional.one_hot(torch.tensor(preds), 3).float()  # (N, C) scores give the same
    assert zeroshot_metrics(logits, labels, ["a", "b", "c"])["weighted_f1"] == m["weighted_f1"]


def test_zeroshot_metrics_absent_class_and_random_guess_matches_chance():
    m = zeroshot_metrics([0, 1, 1], [0, 0, 1], ["a", "b", "c"])  # class c never occurs: not in the balanced mean
    assert m["per_class_accuracy"]["c"] is None and m["balanced_accuracy"] == pytest.approx(0.75)
    g = torch.Generator().manual_seed(2)
    labels = torch.cat([torch.zeros(6000), torch.ones(3000), torch.full((1000,), 2), torch.full((2000,), 3)]).long()
    preds = torch.randint(0, 4, (len(labels),), generator=g)
    m = zeroshot_metrics(preds, labels, list("abcd"))
    for key in ("accuracy", "balanced_accuracy", "weighted_f1"):
        assert abs(m[key] - m["chance"][key]) < 0.015, key


# -----------------------------------------------------------------------------
# linear probe


def test_linear_probe_separable_reaches_100_and_is_deterministic():
    g = torch.Generator().manual_seed(3)
    means = 5 * torch.randn(3, 8, generator=g)
    y_train, y_test = torch.arange(3).repeat(20), torch.arange(3).repeat(30)
    x_train = means[y_train] + 0.3 * torch.randn(60, 8, generator=g)
    x_test = means[y_test] + 0.3 * torch.randn(90, 8, generator=g)
    res = linear_probe(x_train, y_train, x_test, y_test, shots=(1, 4), draws=2, seed=0)
    assert set(res) == {1, 4} and res[4][0] >= 0.99 and res[1][0] >= 0.9
    assert res == linear_probe(x_train, y_train, x_test, y_test, shots=(1, 4), draws=2, seed=0)
    assert linear_probe(x_train, y_train, x_test, y_test, shots=(2,), draws=1)[2][1] == 0.0


def test_linear_probe_random_labels_is_chance():
    g = torch.Generator().manual_seed(4)
    x_train, x_test = torch.randn(200, 16, generator=g), torch.randn(800, 16, generator=g)
    y_train, y_test = torch.randint(0, 4, (200,), generator=g), torch.randint(0, 4, (800,), generator=g)
    mean, std = linear_probe(x_train, y_train, x_test, y_test, shots=(8,), draws=3, seed=0)[8]
    assert abs(mean - 0.25) < 0.06 and std >= 0.0


# -----------------------------------------------------------------------------
# VLM answers


def r1(answer):
    return f"<think>looking at the nuclei</think><answer>{answer}</answer>"


def test_closed_vqa_traps():
    assert closed_answer_correct("no", "no") and closed_answer_correct("No, it is benign.", "no")
    assert closed_answer_correct("Yes.", "yes")
    assert not closed_answer_correct("know", "no")
    assert not closed_answer_correct("I don't know", "no")
    assert not closed_answer_correct("nothing abnormal", "no") and not closed_answer_correct("yesterday", "yes")
    assert not closed_answer_correct("not normal", "normal")
    assert closed_answer_correct("Normal.", "normal")
    assert not closed_answer_correct(None, "yes")
    m = closed_vqa_metrics([r1("yes"), r1("know"), "yes", r1("no")], ["yes", "no", "yes", "yes"])
    assert m["accuracy"] == 0.25 and m["unparseable"] == 2 and m["format_rate"] == 0.75
    assert m["majority_accuracy"] == 0.75 and m["chance"]["accuracy"] == 0.5


def test_open_vqa_hand_case():
    # pred "large round nuclei" vs gold "round nuclei with nucleoli": overlap 2, P 2/3, R 1/2, F1 4/7
    f1, rec = token_f1_recall("The large round nuclei", "round nuclei with nucleoli")
    assert f1 == pytest.approx(4 / 7) and rec == 0.5
    assert token_f1_recall("mucus", "adipose") == (0.0, 0.0)
    m = open_vqa_metrics([r1("The Adipose."), r1("The large round nuclei"), "adipose"],
                         ["adipose", "round nuclei with nucleoli", "adipose"])
    assert m["exact_match"] == pytest.approx(1 / 3) and m["f1"] == pytest.approx((1 + 4 / 7) / 3)
    assert m["recall"] == pytest.approx(0.5) and m["unparseable"] == 1
    assert m["chance"]["exact_match"] == pytest.approx(2 / 3)  # always answering "adipose"


def test_mcq_unparseable_counted_wrong():
    responses = [r1("B"), r1("maybe"), "the answer is B", r1("(C) mucus"), r1("A or B")]
    m = mcq_metrics(responses, ["B", "A", "B", "C) mucus", "A"], num_options=[4, 4, 2, 4, 5], lengths=[3, 4, 5, 6, 7])
    assert m["accuracy"] == pytest.approx(2 / 5)  # the untagged "B" and ambiguous "A or B" score nothing
    assert m["unparseable"] == 3 and m["format_rate"] == pytest.approx(4 / 5)
    assert m["mean_response_length"] == 5.0 and m["length_unit"] == "tokens"
    assert m["chance"]["accuracy"] == pytest.approx((0.25 * 3 + 0.5 + 0.2) / 5)
    assert mcq_metrics(["x y z"], ["A"])["mean_response_length"] == 3.0


def test_mcq_accuracy_by_type():
    """by_type splits the same correct / wrong calls by question type; the n-weighted mean of the
    per-type accuracies is the total."""
    responses = [r1("B"), r1("A"), r1("C"), r1("D"), r1("A")]
    m = mcq_metrics(responses, ["B", "B", "C", "A", "A"], num_options=[4, 4, 4, 2, 4],
                    types=["tissue", "tissue", "mitoses", "mitoses", "tissue"])
    assert m["by_type"]["tissue"] == {"accuracy": pytest.approx(2 / 3), "n": 3, "chance": pytest.approx(0.25)}
    assert m["by_type"]["mitoses"] == {"accuracy": pytest.approx(1 / 2), "n": 2, "chance": pytest.approx(0.375)}
    assert m["accuracy"] == pytest.approx(sum(r["accuracy"] * r["n"] for r in m["by_type"].values()) / 5)
    assert "by_type" not in mcq_metrics(responses, ["B"] * 5)
    assert "accuracy tissue (3)" in format_table({"mcq": m})


OPTS = ["A) adipose tissue", "B) background", "C) mucus", "D) debris"]


def walk_reply(lines, letter):
    return ("<think>The tile shows large empty fat cells, which is adipose tissue. Checking the options:\n"
            + "\n".join(lines) + f"\nSo the answer is {letter}.</think><answer>{letter}</answer>")


def test_option_walk_by_hand():
    """Four replies to one question (gold A, adipose tissue), each wrong or right for a different reason."""
    replies = [walk_reply(["A) adipose tissue: yes."], "A"),                                  # read and concluded right
               walk_reply(["A) adipose tissue: no.", "B) background: yes."], "B"),            # concluded the wrong option
               walk_reply(["A) adipose tissue: yes."], "C"),                                  # right text, wrong letter
               walk_reply(["A) mucus: no.", "B) adipose tissue: yes."], "B")]                 # miscopied two lines
    walks = [read_walk(r, OPTS, "A") for r in replies]
    assert walks[1]["lines"] == [("A", "adipose tissue", "adipose tissue"), ("B", "background", "background")]
    assert [w["stated"] for w in walks] == ["adipose tissue", "background", "adipose tissue", "adipose tissue"]
    m = walk_metrics(walks, ["A", "B", "C", "B"])
    assert m["walked"] == 1.0
    assert m["copied"] == pytest.approx(4 / 6)          # 6 walk lines, the last reply's two are miscopied
    assert m["states_gold"] == pytest.approx(3 / 4)     # replies 1, 3, 4 accept the text "adipose tissue"
    assert m["letter_follows"] == pytest.approx(2 / 4)  # replies 1, 2 give the letter of the text they accepted
    # accepted A, B, A, B against gold A four times: 1/2 (|2/4 - 1| + |2/4 - 0|) = 0.5
    assert [w["accepted"] for w in walks] == ["A", "B", "A", "B"] and m["position_gap"] == pytest.approx(0.5)
    # no walk at all: nothing walked, nothing stated, no lines to copy
    bare = walk_metrics([read_walk("<answer>A</answer>", OPTS, "A)")], ["A"])
    assert bare == {"walked": 0.0, "copied": None, "states_gold": 0.0, "letter_follows": None, "position_gap": None}


def test_position_gap_tells_a_line_counter_from_a_checker():
    """Property: replies that accept the gold letter have gap 0 whatever the gold's spread; replies that accept
    the third option whatever it holds, against uniform gold letters, have 0.75; the gap is symmetric and in [0, 1]."""
    rng = np.random.default_rng(1)
    gold = ["ABCD"[i] for i in rng.integers(4, size=400)]
    assert position_gap(gold, gold) == 0.0
    assert position_gap(["C"] * 400, ["ABCD"[i % 4] for i in range(400)]) == pytest.approx(0.75)
    for _ in range(20):
        a = ["ABCD"[i] for i in rng.integers(4, size=int(rng.integers(1, 50)))]
        b = ["ABCD"[i] for i in rng.integers(4, size=int(rng.integers(1, 50)))]
        assert 0.0 <= position_gap(a, b) <= 1.0 and position_gap(a, b) == pytest.approx(position_gap(b, a))
    assert position_gap([], gold) is None


def test_mcq_metrics_walk_is_consistent_with_accuracy():
    """Property on random walks: a reply that states the gold text and whose letter follows it is right, so
    accuracy >= P(states gold and follows); by_type's states_gold averages to the total's."""
    rng = np.random.default_rng(0)
    texts = ["adipose tissue", "background", "mucus", "debris"]
    replies, answers, types = [], [], []
    for i in range(200):
        gold = "ABCD"[rng.integers(4)]
        n_lines = rng.integers(0, 5)
        lines = []
        for j in range(n_lines):
            letter = "ABCD"[j]
            text = texts[j] if rng.random() < 0.8 else texts[rng.integers(4)]
            lines.append(f"{letter}) {text}: {'yes' if j == n_lines - 1 else 'no'}.")
        replies.append(walk_reply(lines, "ABCD"[rng.integers(4)]))
        answers.append(gold)
        types.append("x" if i % 2 else "y")
    m = mcq_metrics(replies, answers, [4] * 200, types=types, options=[OPTS] * 200)
    walks = [read_walk(r, OPTS, a) for r, a in zip(replies, answers)]
    both = np.mean([w["stated"] == w["gold"] and r.endswith(f"<answer>{a}</answer>")
                    for w, r, a in zip(walks, replies, answers)])
    assert 0 < both <= m["accuracy"]
    assert m["walk"]["states_gold"] == pytest.approx(np.mean([v["states_gold"] for v in m["by_type"].values()]))
    assert "walk copied" in format_table({"mcq": m})


def test_strip_end_markers_and_table():
    assert strip_end_markers("<answer>A</answer><|im_end|>\n<|pad|>") == "<answer>A</answer>"
    assert strip_end_markers("plain") == "plain"
    table = format_table({"mcq": {"n": 5, "accuracy": 0.4, "length_unit": "tokens", "chance": {"accuracy": 0.25}}})
    line = [ln for ln in table.splitlines() if "accuracy" in ln][0]
    assert "0.4000" in line and "0.2500" in line and "length_unit" not in table
    assert np.isclose(float(line.split()[-1]), 0.25)


# -----------------------------------------------------------------------------
# end to end: tiny random models saved as checkpoints, evaluated through the CLI


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _tiny_world(root):
    """4 tiles of 2 colour classes and every evaluation file, in the SynthPath layout."""
    from PIL import Image
    (root / "images").mkdir()
    colours = {"adipose": (250, 240, 245), "tumour": (90, 40, 120)}
    images = []
    for i in range(4):
        label = list(colours)[i % 2]
        Image.new("RGB", (20, 20), colours[label]).save(root / "images" / f"t{i}.png")
        images.append((f"images/t{i}.png", label))
    prompts = {"0": {"classnames": {"adipose": ["adipose", "fat"], "tumour": ["tumour"]},
                     "templates": ["CLASSNAME.", "an H&E image of CLASSNAME"]}}
    (root / "zeroshot_prompts.json").write_text(json.dumps(prompts))
    _write_jsonl(root / "zeroshot_test.jsonl", [{"image": p, "label": c} for p, c in images])
    _write_jsonl(root / "retrieval_test.jsonl", [{"image": p, "caption": f"{c} tissue {i}"}
                                                 for i, (p, c) in enumerate(images)])
    _write_jsonl(root / "mcq_test.jsonl", [{"image": p, "question": "Which tissue?", "options": ["A) adipose", "B) tumour"],
                                            "answer": "A" if c == "adipose" else "B"} for p, c in images])
    _write_jsonl(root / "vqa_test.jsonl", [{"image": p, "question": "Is it fat?", "answer": "yes" if c == "adipose" else "no",
                                            "answer_type": "CLOSED" if i < 2 else "OPEN"} for i, (p, c) in enumerate(images)])


def test_cli_end_to_end_on_tiny_random_models(tmp_path, capsys):
    from nanopatho.checkpoint import save_model
    from nanopatho.clip import CLIPConfig, PathoCLIP, TextConfig
    from nanopatho.evaluate import main
    from nanopatho.lm import LMConfig
    from nanopatho.tokenizer import Tokenizer
    from nanopatho.vit import ViTConfig
    from nanopatho.vlm import VLM, VLMConfig

    data = tmp_path / "data"
    data.mkdir()
    _tiny_world(data)
    tok = Tokenizer.train(["adipose tumour tissue fat which is it yes no"] * 5, vocab_size=300)
    vit = ViTConfig(image_size=16, patch_size=8, n_layer=1, n_head=2, n_embd=32)
    torch.manual_seed(0)
    clip = PathoCLIP(CLIPConfig(vision=vit, text=TextConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2,
                                                            n_embd=32, max_len=32), embed_dim=16))
    lm = LMConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=1, n_embd=32, intermediate_size=64,
                  max_seq_len=256, tie_embeddings=False)  # untied: independent of how checkpoints store tied weights
    vlm = VLM(VLMConfig(vision=vit, lm=lm, image_token_id=tok.image_id, pixel_shuffle=1))
    save_model(str(tmp_path / "clip"), clip, tok)
    save_model(str(tmp_path / "vlm"), vlm, tok)

    main(["--ckpt", str(tmp_path / "clip"), "--data", str(data), "--device", "cpu", "--batch_size", "3"])
    res = json.loads((tmp_path / "clip" / "eval.json").read_text())["results"]
    assert res["zeroshot"]["n"] == 4 and res["zeroshot"]["chance"]["accuracy"] == 0.5
    assert res["retrieval"]["n"] == 4 and 0 <= res["retrieval"]["i2t_R@1"] <= 1
    assert res["linear_probe"]["n_pool"] == 2 and "16shot_acc" in res["linear_probe"]

    out = tmp_path / "vlm_eval.json"
    main(["--ckpt", str(tmp_path / "vlm"), "--data", str(data), "--tasks", "mcq,vqa,zeroshot", "--limit", "4",
          "--max_new_tokens", "4", "--batch_size", "3", "--out", str(out)])
    res = json.loads(out.read_text())["results"]
    assert set(res) == {"mcq", "vqa_closed", "vqa_open"} and "responses" not in res["mcq"]
    main(["--ckpt", str(tmp_path / "vlm"), "--data", str(data), "--tasks", "mcq,vqa", "--limit", "4",
          "--max_new_tokens", "4", "--batch_size", "3", "--out", str(tmp_path / "kept.json"), "--responses"])
    kept = json.loads((tmp_path / "kept.json").read_text())["results"]
    assert len(kept["mcq"]["responses"]) == 4 and len(kept["vqa_closed"]["responses"]) == 2
    assert kept["mcq"]["accuracy"] == res["mcq"]["accuracy"]  # keeping the replies changes no score
    assert res["mcq"]["n"] == 4 and res["mcq"]["chance"]["accuracy"] == 0.5 and res["mcq"]["length_unit"] == "tokens"
    assert 0 < res["mcq"]["mean_response_length"] <= 4
    printed = capsys.readouterr().out
    assert "skipping ['zeroshot']" in printed and "i2t_R@1" in printed


def test_generation_order_hand_case():
    from nanopatho.evaluate import generation_order
    items = [{"type": "tissue", "answer_type": "OPEN"}, {"type": "grade"}, {"type": "tissue", "answer_type": "CLOSED"},
             {"type": "grade"}, {}]
    prompts = [[0] * 5, [0] * 9, [0] * 7, [0] * 3, [0] * 4]
    # no type first, then grade by prompt length (3 before 9), then tissue CLOSED before OPEN
    assert generation_order(items, prompts) == [4, 3, 1, 2, 0]


def test_generate_answers_come_back_in_item_order_whatever_the_batch():
    """Batched in generation_order, each reply is the one its item gets alone (greedy), at its own index."""
    from nanopatho.evaluate import generate_answers
    from nanopatho.lm import LMConfig
    from nanopatho.tokenizer import Tokenizer
    from nanopatho.vit import ViTConfig
    from nanopatho.vlm import VLM, VLMConfig

    tok = Tokenizer.train(["adipose tumour tissue fat which is it yes no grade of the shown"] * 5, vocab_size=300)
    vit = ViTConfig(image_size=16, patch_size=8, n_layer=1, n_head=2, n_embd=32)
    lm = LMConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=1, n_embd=32, intermediate_size=64,
                  max_seq_len=256, tie_embeddings=False)
    torch.manual_seed(3)
    vlm = VLM(VLMConfig(vision=vit, lm=lm, image_token_id=tok.image_id, pixel_shuffle=1)).eval()
    for w in vlm.parameters():  # large random weights: replies that differ by question, image and length
        if w.dim() > 1:
            torch.nn.init.normal_(w, std=0.5)
    questions = ["Which tissue?", "What is the grade of the tumour shown?", "Is it fat?", "Grade?", "Which tissue is it?"]
    items = [{"question": q, "type": t} for q, t in zip(questions, ["tissue", "grade", "tissue", "grade", "tissue"])]
    images = torch.randint(0, 256, (len(items), 3, 16, 16), dtype=torch.uint8)
    kw = dict(device="cpu", max_new_tokens=6)
    batched = generate_answers(vlm, tok, items, images, batch_size=3, **kw)
    alone = [generate_answers(vlm, tok, [it], images[i:i + 1], batch_size=1, **kw) for i, it in enumerate(items)]
    assert batched[0] == [texts[0] for texts, _ in alone]
    assert batched[1] == [lengths[0] for _, lengths in alone]
    assert len(set(batched[0])) == len(items) and len(set(batched[1])) > 1  # a mix-up of rows would show
