"""SynthPath: determinism, split disjointness, no leakage, well-formed manifests, balanced
answers, the colour baseline, and the world's rules (grade rule, drawn mitoses).

    python -m pytest -x -q tests/test_synthpath.py
"""

import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from data.synthpath import text as T
from data.synthpath import world
from data.synthpath.prepare import DESCRIBE, centroid_accuracy, colour_histogram, prepare
from e2e_util import ROOT
from nanopatho.prompts import SYSTEM_PROMPT

TINY = dict(seed=3, image_size=64, n_train=60, n_val=9, n_test=18, n_test_qa=20, vocab_size=400, progress=False,
            reading_per_level=30, reading_probe=10, reading_near_per_level=20,
            reading_probe_near=10)
MANIFESTS = ["captions_train.jsonl", "captions_val.jsonl", "textbook.jsonl", "zeroshot_test.jsonl", "retrieval_test.jsonl",
             "sft_train.jsonl", "rl_train.jsonl", "mcq_test.jsonl", "vqa_test.jsonl",
             "reading_train.jsonl", "reading_probe.jsonl", "reading_near.jsonl", "captions_findings.jsonl",
             "sft_tumour.jsonl", "sft_tissue_tumour.jsonl"]


def _has_tokenizer():
    try:
        from nanopatho.tokenizer import Tokenizer  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.fixture(scope="session")
def worlds(tmp_path_factory):
    """The same tiny world twice: once in-process (1 worker), once with 2 worker processes."""
    tok = _has_tokenizer()
    a = tmp_path_factory.mktemp("sp_a")
    b = tmp_path_factory.mktemp("sp_b")
    prepare(str(a), workers=1, train_tokenizer=tok, **TINY)
    prepare(str(b), workers=2, train_tokenizer=tok, **TINY)
    return str(a), str(b)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _files(root):
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            out[os.path.relpath(p, root)] = p
    return out


def test_same_seed_same_bytes(worlds):
    a, b = worlds
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    expected = set(MANIFESTS) | {"zeroshot_prompts.json", "meta.json", "contact_sheet.png"}
    assert expected <= set(fa)
    for rel in fa:
        with open(fa[rel], "rb") as x, open(fb[rel], "rb") as y:
            assert x.read() == y.read(), rel


def test_other_seed_differs(tmp_path):
    prepare(str(tmp_path), workers=1, train_tokenizer=False, **dict(TINY, seed=4, n_train=9, n_test=9, n_test_qa=2, n_val=0))
    caps = read_jsonl(os.path.join(tmp_path, "captions_train.jsonl"))
    assert len(caps) == 18
    assert not os.path.exists(os.path.join(tmp_path, "tokenizer.json"))


def _images(root, name, key="image"):
    rows = read_jsonl(os.path.join(root, name))
    if name == "sft_train.jsonl":
        return {p for r in rows for p in r["images"]}
    return {r[key] for r in rows}


def test_splits_disjoint_and_images_exist(worlds):
    root = worlds[0]
    train = set().union(*[_images(root, n) for n in ("captions_train.jsonl", "sft_train.jsonl", "rl_train.jsonl")])
    val = _images(root, "captions_val.jsonl")
    test = set().union(*[_images(root, n) for n in ("zeroshot_test.jsonl", "retrieval_test.jsonl",
                                                    "mcq_test.jsonl", "vqa_test.jsonl")])
    assert len(train) == 60 and len(val) == 9 and len(test) == 18 + 20
    assert not train & val and not train & test and not val & test
    on_disk = {"images/" + n for n in os.listdir(os.path.join(root, "images"))}
    assert on_disk == train | val | test


def test_no_label_leakage(worlds):
    root = worlds[0]
    names = os.listdir(os.path.join(root, "images"))
    assert all(re.fullmatch(r"[0-9a-f]{16}\.png", n) for n in names)
    with open(os.path.join(root, "meta.json")) as f:
        meta_text = f.read()
    assert not any(n[:16] in meta_text for n in names)                     # no per-image metadata
    for n in names[:20]:
        with Image.open(os.path.join(root, "images", n)) as im:
            assert im.size == (64, 64) and im.mode == "RGB"
            assert not {k for k in im.info if k not in ("dpi", "gamma")}  # no text chunks


def test_manifests_well_formed(worlds):
    root = worlds[0]
    meta = json.load(open(os.path.join(root, "meta.json")))
    short = meta["short_answers"]
    prompts = json.load(open(os.path.join(root, "zeroshot_prompts.json")))["0"]
    assert sorted(prompts["classnames"]) == sorted(world.CLASSES)
    assert all("CLASSNAME" in t for t in prompts["templates"])
    zs = read_jsonl(os.path.join(root, "zeroshot_test.jsonl"))
    assert sorted(r["label"] for r in zs) == sorted(list(world.CLASSES) * 2)   # class-balanced
    for name in ("captions_train.jsonl", "captions_val.jsonl", "retrieval_test.jsonl"):
        assert all(set(r) == {"image", "caption"} and r["caption"].strip() for r in read_jsonl(os.path.join(root, name)))
    assert all(set(r) == {"text"} and r["text"] for r in read_jsonl(os.path.join(root, "textbook.jsonl")))
    for r in read_jsonl(os.path.join(root, "sft_train.jsonl")):
        roles = [m["role"] for m in r["messages"]]
        assert roles == ["system", "user", "assistant"] and r["messages"][0]["content"] == SYSTEM_PROMPT
        assert r["messages"][1]["content"].startswith("<image>\n")
        assert re.fullmatch(r"<think>[^<]+</think><answer>[^<]+</answer>", r["messages"][2]["content"])
    for r in read_jsonl(os.path.join(root, "rl_train.jsonl")):
        assert set(r) == {"image", "question", "options", "answer", "kind", "type"}
        _check_answer(r, short)
    for r in read_jsonl(os.path.join(root, "mcq_test.jsonl")):
        assert set(r) == {"image", "question", "options", "answer", "type"}
        _check_answer(dict(r, kind="mcq"), short)
    for r in read_jsonl(os.path.join(root, "vqa_test.jsonl")):
        assert set(r) == {"image", "question", "answer", "answer_type", "type"}
        _check_answer(dict(r, kind="yesno" if r["answer_type"] == "CLOSED" else "short", options=None), short)
    assert meta["files"]["rl_train.jsonl"] > meta["files"]["sft_train.jsonl"]



def test_every_chain_closes_on_its_answer(worlds):
    """The last sentence of each <think> names the answer, right before <answer>: MCQ chains end
    on the option walk (each option line up to the answer's, checked no / yes, then "So the answer
    is B."), yes/no and short-answer chains on "So the answer is <answer>."; descriptions have none."""
    counts = {"mcq": 0, "closed": 0, "description": 0}
    for r in read_jsonl(os.path.join(worlds[0], "sft_train.jsonl")):
        user, reply = r["messages"][1]["content"], r["messages"][2]["content"]
        think, answer = re.fullmatch(r"<think>(.*)</think><answer>(.*)</answer>", reply, re.S).groups()
        if "\nOptions:\n" in user:
            options = user.split("\nOptions:\n")[1].split("\n")
            upto = options[:next(i for i, o in enumerate(options) if o.startswith(answer + ") ")) + 1]
            checks = [f"{o}: {'yes' if o == upto[-1] else 'no'}." for o in upto]
            assert think.endswith(" Checking the options:\n" + "\n".join(checks) + f"\nSo the answer is {answer}.")
            counts["mcq"] += 1
        elif any(user.endswith(d) for d in DESCRIBE):
            assert "So the answer is" not in think and "Checking the options" not in think
            counts["description"] += 1
        else:
            assert think.endswith(f"So the answer is {answer}.")
            counts["closed"] += 1
    assert min(counts.values()) > 0, counts

def _check_answer(r, short):
    if r["kind"] == "mcq":
        assert [o[:3] for o in r["options"]] == ["A) ", "B) ", "C) ", "D) "] and r["answer"] in "ABCD"
        assert len(set(r["options"])) == 4 and len({o[3:] for o in r["options"]}) == 4
    elif r["kind"] == "yesno":
        assert r["options"] is None and r["answer"] in ("yes", "no")
    else:
        assert r["kind"] == "short" and r["options"] is None and r["answer"] in short[r["type"]]


def _spread(values, keys):
    counts = [values.count(k) for k in keys]
    return max(counts) - min(counts)


def test_probe_names_stand_side_by_side_in_no_training_file(worlds):
    side_by_side = set()
    texts = [r["caption"] for f in ("captions_train.jsonl", "captions_findings.jsonl")
             for r in read_jsonl(os.path.join(worlds[0], f))]
    texts += [r["text"] for r in read_jsonl(os.path.join(worlds[0], "textbook.jsonl"))]
    texts += [m["content"] for f in ("sft_train.jsonl", "sft_tumour.jsonl", "reading_train.jsonl", "reading_near.jsonl")
              for r in read_jsonl(os.path.join(worlds[0], f)) for m in r["messages"]]
    for text in texts:
        words = re.findall(r"[a-z]+", text.lower())
        side_by_side |= set(zip(words, words[1:]))
    probe = read_jsonl(os.path.join(worlds[0], "reading_probe.jsonl"))
    assert [r["skill"] for r in probe].count("near") == TINY["reading_probe_near"]
    # a name is an option line's text or a finding's ("Finding: lining is compact." restates an option: no name)
    names = [n for r in probe for n in re.findall(r"(?:\n[A-D]\) |Finding: )([a-z]+ [a-z]+)(?:\.|\n|$)",
                                                  r["messages"][1]["content"])]
    assert len(names) >= len(probe)  # every item names at least its finding or its options
    assert not {tuple(n.split()) for n in names} & side_by_side


def test_tumour_files_state_each_train_tumour_attributes(worlds):
    """1.2's stage-1 captions and SFT rows: per_tumour of each per train tumour, findings by level word,
    SFT questions about attributes only, every chain closing on its answer."""
    root = worlds[0]
    meta = json.load(open(os.path.join(root, "meta.json")))
    n_tum = meta["class_counts"]["train"]["TUM"]
    findings = read_jsonl(os.path.join(root, "captions_findings.jsonl"))
    tumour_images = {r["image"] for r in findings}
    assert len(findings) == 4 * n_tum == 4 * len(tumour_images)
    for r in findings:
        assert re.fullmatch(r"[A-Za-z ]+: (?:[a-z ]+ is (?:good|moderate|poor|mild|marked|[0-4]|present|absent)"
                            r"(?:, | and )?){5}; (?:low|high) grade\.", r["caption"]), r["caption"]
    sft = read_jsonl(os.path.join(root, "sft_tumour.jsonl"))
    assert len(sft) == 3 * n_tum and {r["images"][0] for r in sft} == tumour_images
    sft_questions = [r["messages"][1]["content"] for r in sft]
    assert not any("tissue" in q or "this H&E tile" in q or "Does this tile show" in q for q in sft_questions)
    for r in sft:
        think, answer = re.fullmatch(r"<think>(.+)</think><answer>(.+)</answer>", r["messages"][2]["content"], re.S).groups()
        assert think.endswith(f"So the answer is {answer}.")


def test_tissue_tumour_rows_ask_the_tissue_in_the_short_form(worlds):
    """1.5's RL ptx rows: one tissue MCQ per train tumour, the gold option adenocarcinoma epithelium, the
    chain the tissue sentence then the walk (no finding listed in between), answer letters balanced."""
    root = worlds[0]
    n_tum = json.load(open(os.path.join(root, "meta.json")))["class_counts"]["train"]["TUM"]
    tumour_images = {r["image"] for r in read_jsonl(os.path.join(root, "captions_findings.jsonl"))}
    rows = read_jsonl(os.path.join(root, "sft_tissue_tumour.jsonl"))
    assert len(rows) == n_tum and {r["images"][0] for r in rows} == tumour_images
    letters = []
    for r in rows:
        system, user, reply = (m["content"] for m in r["messages"])
        assert system == SYSTEM_PROMPT and "\nOptions:\n" in user
        think, answer = re.fullmatch(r"<think>(.+)</think><answer>([ABCD])</answer>", reply, re.S).groups()
        options = dict(re.findall(r"^([ABCD])\) (.+)$", user, re.M))
        assert options[answer] == T.NAME["TUM"]
        finding, walk = think.split(" Checking the options:\n")
        assert finding.endswith(f"which is {T.NAME['TUM']}.") and finding.count(".") == 1, finding
        assert walk.endswith(f"{answer}) {T.NAME['TUM']}: yes.\nSo the answer is {answer}.")
        letters.append(answer)
    assert _spread(letters, "ABCD") <= 1


def test_every_file_the_speedrun_names_is_in_the_world(worlds):
    """speedrun.sh's --train_file / --reading_file / --ptx_file / --probe names are files prepare writes."""
    with open(os.path.join(ROOT, "speedrun.sh")) as f:
        script = f.read()
    named = {name for value in re.findall(r"--(?:train|reading|ptx)_file ([\w.,]+)|--probe ([\w.]+)", script)
             for name in ",".join(value).split(",") if name}
    assert {"sft_tissue_tumour.jsonl", "reading_probe.jsonl", "sft_tumour.jsonl"} <= named
    assert named <= set(os.listdir(worlds[0]))


def test_findings_caption_states_the_drawn_levels():
    attrs = {"gland_formation": "poor", "pleomorphism": "marked", "mitoses": 2, "necrosis": True, "mucin": False,
             "grade": "high"}
    text = T.findings_caption(np.random.default_rng(0), attrs)
    for fact in ("gland formation is poor", "pleomorphism is marked", "mitotic count is 2", "necrosis is present",
                 "mucin is absent"):
        assert fact in text
    assert text.endswith("; high grade.")
    orders = {T.findings_caption(np.random.default_rng(s), attrs).split(":")[1] for s in range(10)}
    assert len(orders) > 1  # the findings come in varied order


def test_new_files_leave_the_old_ones_and_the_tokenizer_unchanged(tmp_path, worlds):
    """1.2's files draw from their own random streams: changing their sizes changes no file 1.1 wrote,
    so a 1.1 world's tokenizer and stage-0 base LM stay valid."""
    other = dict(TINY, reading_near_per_level=5, findings_per_tumour=1, sft_per_tumour=1)
    prepare(str(tmp_path), workers=1, train_tokenizer=_has_tokenizer(), **other)
    same = ["captions_train.jsonl", "sft_train.jsonl", "rl_train.jsonl", "mcq_test.jsonl", "vqa_test.jsonl",
            "reading_train.jsonl", "textbook.jsonl"] + (["tokenizer.json"] if _has_tokenizer() else [])
    for name in same:
        assert (tmp_path / name).read_bytes() == open(os.path.join(worlds[0], name), "rb").read(), name
    assert (tmp_path / "sft_tumour.jsonl").read_bytes() != open(os.path.join(worlds[0], "sft_tumour.jsonl"), "rb").read()


def test_answers_balanced(worlds):
    root = worlds[0]
    mcq = [r["answer"] for r in read_jsonl(os.path.join(root, "mcq_test.jsonl"))]
    assert _spread(mcq, "ABCD") <= 1
    rl = read_jsonl(os.path.join(root, "rl_train.jsonl"))
    assert _spread([r["answer"] for r in rl if r["kind"] == "mcq"], "ABCD") <= 1
    assert _spread([r["answer"] for r in rl if r["kind"] == "yesno"], ["yes", "no"]) <= 1
    closed = [r["answer"] for r in read_jsonl(os.path.join(root, "vqa_test.jsonl")) if r["answer_type"] == "CLOSED"]
    assert _spread(closed, ["yes", "no"]) <= 1
    # grade and count questions are only asked about tumour tiles, never decidable by class
    meta = json.load(open(os.path.join(root, "meta.json")))
    assert meta["chance"]["mcq_test"] == 0.25 and meta["chance"]["vqa_test_closed"] == 0.5


def test_baseline_reported(worlds):
    b = json.load(open(os.path.join(worlds[0], "meta.json")))["baselines"]["colour_histogram"]
    assert 0.0 <= b["zeroshot_test_accuracy"] <= 1.0


def test_colour_histogram_hand_case():
    rgb = np.array([[[0, 0, 0], [255, 255, 255]], [[255, 0, 0], [40, 40, 40]]], np.uint8)   # (2, 2, 3)
    h = colour_histogram(rgb)
    assert h.shape == (512,) and h.sum() == pytest.approx(1.0)
    # bin = r//32 * 64 + g//32 * 8 + b//32: black 0, white 511, red 7*64 = 448, grey 40 -> 1*64+1*8+1 = 73
    assert h[0] == h[511] == h[448] == h[73] == 0.25


def test_centroid_accuracy_hand_case():
    x = np.array([[0.0, 0.0], [0.0, 2.0], [10.0, 0.0], [10.0, 2.0]])
    y = ["a", "a", "b", "b"]                      # centroids (0, 1) and (10, 1)
    test = np.array([[1.0, 1.0], [6.0, 1.0], [4.0, 1.0]])
    assert centroid_accuracy(x, y, test, ["a", "b", "b"]) == pytest.approx(2 / 3)


def test_colour_baseline_at_most_half(tmp_path):
    """The trivial colour baseline must stay <= 50 % on the 9-class test (moderate world)."""
    meta = prepare(str(tmp_path), seed=0, n_train=300, n_val=0, n_test=135, n_test_qa=4, workers=1,
                   train_tokenizer=False, progress=False, reading_per_level=10, reading_probe=4,
                   reading_probe_near=4)
    acc = meta["baselines"]["colour_histogram"]["zeroshot_test_accuracy"]
    assert 1 / 9 < acc <= 0.5, acc


def test_grade_rule():
    base = dict(gland_formation="good", pleomorphism="mild", mitoses=2)
    assert world.tumour_grade(base) == "low"
    assert world.tumour_grade(dict(base, gland_formation="poor")) == "high"
    assert world.tumour_grade(dict(base, pleomorphism="marked")) == "high"
    assert world.tumour_grade(dict(base, mitoses=3)) == "high"
    assert world.tumour_grade(dict(base, gland_formation="moderate", pleomorphism="moderate")) == "low"
    rng = np.random.default_rng(0)
    grades = [world.sample_attributes(rng, "TUM")["grade"] for _ in range(400)]
    assert 0.3 < grades.count("high") / 400 < 0.7


@pytest.mark.parametrize("k", [0, 1, 3])
def test_mitoses_drawn_as_condensed_figures(k):
    """Each mitotic figure is a near-black patch of >= 12 px at 64 px, big enough for the toy ViT to count
    (data/synthpath/perception.py; the figures of 4-6 px drawn before could not be counted even when supervised)."""
    attrs = dict(world.sample_attributes(np.random.default_rng(1), "TUM"), mitoses=k, necrosis=False, mucin=False)
    H, _ = world.draw_tumour(np.random.default_rng(2), 64, 1.0, attrs)
    dark = H > 1.6                                 # ordinary nuclei are capped at 1.15
    assert dark.any() == (k > 0)
    assert dark.sum() >= 12 * k


def test_pleomorphism_shows_giant_hyperchromatic_nuclei():
    """Moderate and marked pleomorphism draw a share of the nuclei at twice the radius and darker (H ~ 1.05,
    ordinary tumour nuclei ~ 0.75): the share of the tile above H = 0.98 is ~0 for mild and grows with the grade
    (the toy ViT learns pleomorphism from these: data/synthpath/perception.py)."""
    def dark_share(pleo):
        out = []
        for s in range(12):
            attrs = dict(world.sample_attributes(np.random.default_rng([s, 0]), "TUM"), pleomorphism=pleo,
                         nuclear_size="medium", nuclear_density="moderate", mitoses=0, necrosis=False, mucin=False)
            H, _ = world.draw_tumour(np.random.default_rng([s, 1]), 64, 1.0, attrs)
            out.append((H > 0.98).mean())
        return np.mean(out)
    mild, moderate, marked = dark_share("mild"), dark_share("moderate"), dark_share("marked")
    assert mild < 0.002 and 0.01 < moderate < marked and marked > 0.06


def test_image_size_scales_and_rejects_bad_size(tmp_path):
    for cls in world.CLASSES:
        rgb = world.render(np.random.default_rng(0), cls, world.sample_attributes(np.random.default_rng(0), cls), 224)
        assert rgb.shape == (224, 224, 3) and rgb.dtype == np.uint8
    with pytest.raises(ValueError):
        prepare(str(tmp_path), image_size=50, progress=False, train_tokenizer=False)


def test_perception_probe_tiles_and_training():
    """data/synthpath/perception.py: deterministic tiles whose labels are the world's attributes, and a
    supervised run whose held-out accuracies are fractions of the 600... here of 6 held-out tiles."""
    import torch

    from data.synthpath import perception
    from nanopatho.vit import ViT, ViTConfig

    x, y = perception.tumour_tiles(0, 5, 32)
    x2, y2 = perception.tumour_tiles(0, 5, 32)
    assert x.shape == (5, 3, 32, 32) and -1.8 < x.min() and x.max() < 2.2  # data.to_float's range, as train_clip feeds it
    assert torch.equal(x, x2) and all(torch.equal(y[a], y2[a]) for a in y)
    rng = np.random.default_rng(0)  # the same draws as tumour_tiles(0, ...): attributes, then the tile
    first = world.sample_attributes(rng, "TUM")
    assert y["mitoses"][0] == first["mitoses"] and world.PLEO[y["pleomorphism"][0]] == first["pleomorphism"]
    assert ("low", "high")[y["grade"][0]] == first["grade"] == world.tumour_grade(first)
    assert bool(y["necrosis"][0]) == first["necrosis"] and bool(y["mucin"][0]) == first["mucin"]  # probe-only labels
    x_test, y_test = perception.tumour_tiles(1, 6, 32)
    vit = ViT(ViTConfig(image_size=32, patch_size=8, n_layer=1, n_head=2, n_embd=16))
    curve = perception.train(vit, x, y, x_test, y_test, steps=3, lr=1e-3, batch=4, eval_every=2, log=lambda s: None)
    assert [step for step, _ in curve] == [2, 3]
    assert all(set(acc) == set(perception.ATTRIBUTES) and all(abs(v * 6 - round(v * 6)) < 1e-5 for v in acc.values())
               for _, acc in curve)


def test_perception_linear_probe_on_frozen_features():
    """perception.linear_probe: a tower whose pooled features hold each label one-hot is read perfectly; the
    tower's weights are left as they were; accuracies are fractions of the held-out tiles."""
    import torch

    from data.synthpath import perception

    class LabelTower(torch.nn.Module):  # pooled features = the labels of the tiles, looked up by their pixels
        def __init__(self, x, y):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))
            self.table = {tuple(xi.flatten()[:8].tolist()): i for i, xi in enumerate(x)}
            self.onehot = torch.cat([torch.nn.functional.one_hot(y[a], len(c)).float()
                                     for a, c in perception.PROBED.items()], 1)  # (n, sum of classes)

        def forward(self, x):
            idx = [self.table[tuple(xi.flatten()[:8].tolist())] for xi in x]
            return None, self.onehot[idx] * self.w

    x, y = perception.tumour_tiles(0, 24, 16)
    tower = LabelTower(x, y)
    acc = perception.linear_probe(tower, x[:16], {a: v[:16] for a, v in y.items()}, x[16:], {a: v[16:] for a, v in y.items()})
    assert set(acc) == set(perception.PROBED) > set(perception.ATTRIBUTES) and all(v == 1.0 for v in acc.values())
    assert tower.w.item() == 1.0 and tower.w.grad is None


def test_stale_names_why_a_data_directory_must_be_regenerated(tmp_path):
    """speedrun.sh regenerates SynthPath when prepare.stale says why: no world, a world of another generator
    version (whose pixels differ), or no tokenizer; a current world is kept."""
    from data.synthpath import prepare

    assert prepare.stale(str(tmp_path)) == f"{tmp_path / 'meta.json'}: missing"
    (tmp_path / "meta.json").write_text(json.dumps({"version": "synthpath-1.0"}))
    assert prepare.stale(str(tmp_path)) == f"{tmp_path} holds SynthPath synthpath-1.0, this generator writes {prepare.VERSION}"
    (tmp_path / "meta.json").write_text(json.dumps({"version": prepare.VERSION}))
    assert prepare.stale(str(tmp_path)) == f"{tmp_path / 'tokenizer.json'}: missing"
    (tmp_path / "tokenizer.json").write_text("{}")
    assert prepare.stale(str(tmp_path)) == ""
