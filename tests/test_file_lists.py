"""A comma-separated --train_file / --reading_file in stage 1 (train_pretrain.py) and SFT (train_sft.py):
the manifests are read file by file in the listed order and concatenated (one name reads as before),
a bad line is reported with its own file and line, and --stream refuses a list in one line.

    python -m pytest -q tests/test_file_lists.py
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import train_pretrain
import train_sft
from nanopatho.data import DataError, load_pairs, preload_images
from nanopatho.tokenizer import Tokenizer

SIZE, N_IMAGE_TOKENS = 16, 4  # image side and image tokens per image: tiny, nothing is trained


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["tumour cells with large nuclei", "adipose tissue, fat", "mucus pools, which grade"] * 10,
                           300)


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path.name


def write_image(path, value):
    Image.fromarray(np.full((SIZE, SIZE, 3), value, dtype=np.uint8)).save(path)
    return path.name


def chat(question, reply, image=None):
    row = {"messages": [{"role": "user", "content": ("<image>\n" if image else "") + question},
                        {"role": "assistant", "content": reply}]}
    return {**row, "images": [image]} if image else row


@pytest.fixture
def captions(tmp_path):
    """Two caption manifests (3 + 2 pairs) over images of distinct shades."""
    shades = [write_image(tmp_path / f"tile{i}.png", 40 * i) for i in range(5)]
    first = write_jsonl(tmp_path / "a.jsonl", [{"image": shades[i], "caption": f"tumour cells {i}"} for i in range(3)])
    second = write_jsonl(tmp_path / "b.jsonl", [{"image": shades[i], "caption": f"adipose tissue {i}"}
                                                for i in range(3, 5)])
    return tmp_path, first, second


def pretrain_examples(data, names, tok):
    cfg = train_pretrain.Config(data=str(data), train_file=names, max_seq_len=32)
    return train_pretrain.caption_examples(cfg, tok, N_IMAGE_TOKENS, train_pretrain.manifest_paths(cfg.data, names), SIZE)


def test_pretrain_two_caption_files_are_read_in_order(captions, tok):
    data, first, second = captions
    (a, _), (b, _) = pretrain_examples(data, first, tok), pretrain_examples(data, second, tok)
    both, skipped = pretrain_examples(data, f"{first},{second}", tok)
    assert skipped == 0 and len(both) == len(a) + len(b) == 5
    assert both.seqs == a.seqs + b.seqs
    assert both.image_index == list(range(5))
    assert torch.equal(both.images, torch.cat([a.images, b.images]))  # row i keeps its own image
    assert [int(image[0, 0, 0]) for image in both.images] == [0, 40, 80, 120, 160]


def test_pretrain_one_name_reads_as_before(captions, tok):
    data, first, _ = captions
    cfg = train_pretrain.Config(data=str(data), max_seq_len=32)
    pairs, _ = load_pairs(data / first)
    images, _, _ = preload_images(pairs, SIZE)
    prefix = train_pretrain.caption_prefix(cfg, tok, N_IMAGE_TOKENS)
    examples, _ = pretrain_examples(data, first, tok)
    assert examples.seqs == [train_pretrain.caption_seq(cfg, tok, prefix, p["caption"]) for p in pairs]
    assert torch.equal(examples.images, images) and examples.image_index == [0, 1, 2]


def test_pretrain_bad_line_names_the_second_file_and_its_line(captions, tok):
    data, first, _ = captions
    bad = write_jsonl(data / "bad.jsonl", [{"image": "tile0.png", "caption": "fat"}, '{"image": "tile1.png"'])
    with pytest.raises(DataError, match=rf"bad\.jsonl:2: malformed JSON"):
        pretrain_examples(data, f"{first},{bad}", tok)


def test_pretrain_stream_refuses_a_file_list(captions, capsys):
    data, first, second = captions
    cfg = train_pretrain.Config(data=str(data), train_file=f"{first},{second}", stream=True)
    with pytest.raises(SystemExit):
        train_pretrain.streamed_data(cfg, None, None, SIZE)
    assert capsys.readouterr().err == (f"error: --train_file {first},{second}: --stream reads a single source; "
                                       f"a comma-separated list needs the preloaded path (drop --stream)\n")


@pytest.fixture
def conversations(tmp_path):
    """Two SFT manifests: 4 text-only conversations, then 3 of which the middle one has an image."""
    image = write_image(tmp_path / "tile.png", 200)
    first = write_jsonl(tmp_path / "sft_a.jsonl", [chat(f"which grade {i}", f"tumour {i}") for i in range(4)])
    second = write_jsonl(tmp_path / "sft_b.jsonl", [chat("which tissue", "fat"), chat("which tissue", "mucus", image),
                                                    chat("which grade", "large nuclei")])
    return tmp_path, first, second


def sft_examples(data, names, tok, val_every=3):
    cfg = train_sft.Config(data=str(data), train_file=names, val_every=val_every, max_seq_len=64)
    return train_sft.conversation_examples(cfg, tok, N_IMAGE_TOKENS, SIZE)


def test_sft_two_files_are_read_in_order_and_held_out_counts_across_them(conversations, tok):
    data, first, second = conversations
    train_rows, val_rows, skipped = sft_examples(data, f"{first},{second}", tok)
    render = [tok.render_chat(json.loads(line)["messages"], N_IMAGE_TOKENS)
              for name in (first, second) for line in (data / name).read_text().splitlines()]
    assert skipped == 0 and len(train_rows) + len(val_rows) == 7
    assert val_rows.seqs == [render[2], render[5]]  # conversations 2 and 5 of the joined list (val_every 3)
    assert train_rows.seqs == [render[n] for n in (0, 1, 3, 4, 6)]
    assert val_rows.image_index == [-1, 0] and train_rows.image_index == [-1] * 5  # the image row keeps its image
    assert int(val_rows.images[0, 0, 0, 0]) == 200


def test_sft_one_name_reads_as_before(conversations, tok):
    data, first, second = conversations
    train_one, val_one, _ = sft_examples(data, first, tok, val_every=0)
    train_both, _, _ = sft_examples(data, f"{first},{second}", tok, val_every=0)
    assert len(val_one) == 0 and train_one.seqs == train_both.seqs[:4]
    assert train_one.image_index == [-1] * 4 and len(train_one.images) == 0


def test_sft_bad_line_names_the_second_file_and_its_line(conversations, tok):
    data, first, _ = conversations
    bad = write_jsonl(data / "sft_bad.jsonl", [chat("which tissue", "fat"), {"messages": [{"role": "user",
                                                                                          "content": "no reply"}]}])
    with pytest.raises(DataError, match=r"sft_bad\.jsonl:2: conversation has no assistant turn"):
        sft_examples(data, f"{first},{bad}", tok)


def test_sft_stream_refuses_a_file_list(conversations, capsys):
    data, first, second = conversations
    cfg = train_sft.Config(data=str(data), train_file=f"{first},{second}", stream=True)
    with pytest.raises(SystemExit):
        train_sft.conversation_stream(cfg, None, N_IMAGE_TOKENS, SIZE)
    assert capsys.readouterr().err == (f"error: --train_file {first},{second}: --stream reads a single manifest; "
                                       f"a comma-separated list needs the preloaded path (drop --stream)\n")


@pytest.mark.parametrize("script", [train_pretrain, train_sft])
def test_reading_files_are_read_in_order_and_errors_name_the_file(script, conversations, tok):
    data, first, second = conversations
    write_jsonl(data / "reading_a.jsonl", [chat("which grade", "low"), chat("which grade", "high")])
    write_jsonl(data / "reading_b.jsonl", [chat("which tissue", "fat"), "not json"])
    write_jsonl(data / "reading_c.jsonl", [chat("which tissue", "mucus")])
    rows = script.reading_rows(script.Config(data=str(data), reading_file="reading_a.jsonl", max_seq_len=64), tok)
    both = script.reading_rows(script.Config(data=str(data), reading_file="reading_a.jsonl,reading_c.jsonl",
                                             max_seq_len=64), tok)
    assert len(rows) == 2 and both == rows + [tok.render_chat(chat("which tissue", "mucus")["messages"], 0)]
    with pytest.raises(DataError, match=r"reading_b\.jsonl:2: malformed JSON"):
        script.reading_rows(script.Config(data=str(data), reading_file="reading_a.jsonl,reading_b.jsonl"), tok)
