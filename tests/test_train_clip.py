"""train_clip.py's caption pool: `--first_sentences` adds each caption's first sentence as one
more caption of its image (zero-shot prompts are one short sentence; full captions are longer).

    python -m pytest -q tests/test_train_clip.py
"""

import json
import os

import pytest

import train_clip
from e2e_util import tiny_world
from nanopatho.config import parse_config
from nanopatho.evaluate import clip_text_ids
from nanopatho.tokenizer import Tokenizer


@pytest.mark.parametrize("text, first", [
    ("H&E image of fat. Thin membranes around big cells.", "H&E image of fat."),
    ("One sentence only.", "One sentence only."),
    ("  no end mark at all", "no end mark at all"),
    ("Is it mucus? Yes, pale lakes.", "Is it mucus?"),
    ("Grade 2.5 tumour. Note glands.", "Grade 2.5 tumour."),  # a decimal point is not a sentence end
])
def test_first_sentence(text, first):
    assert train_clip.first_sentence(text) == first


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world(tmp_path_factory)


@pytest.mark.parametrize("on", [False, True])
def test_first_sentences_join_each_images_caption_pool(world, on):
    cfg = parse_config(train_clip.Config, train_clip.PRESETS,
                       ["--preset", "toy", "--data", world["data"], "--first_sentences", str(on).lower()])
    tok = Tokenizer.from_file(os.path.join(world["data"], "tokenizer.json"))
    images, pools, _ = train_clip.load_data(cfg, tok, image_size=64, text_len=64)
    with open(os.path.join(world["data"], "captions_train.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    by_image = {}
    for r in rows:
        texts = [r["caption"]]
        if on and train_clip.first_sentence(r["caption"]) != r["caption"]:
            texts.append(train_clip.first_sentence(r["caption"]))
        by_image.setdefault(r["image"], []).extend(clip_text_ids(tok, t, 64) for t in texts)
    assert len(images) == len(pools) == len(by_image)
    assert sorted(map(sorted, pools)) == sorted(map(sorted, by_image.values()))
    n_pairs = len(rows)
    assert (sum(map(len, pools)) > n_pairs) == on  # the world's captions have more than one sentence
