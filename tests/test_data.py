"""Data: every format -> the same items, every bad input -> its one-line error, images, collators."""

import csv
import io
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from e2e_util import write_tar
from nanopatho import data
from nanopatho.data import (IMAGE_MEAN, IMAGE_STD, DataError, augment, collate_lm, image_tensor, load_conversations,
                            load_image, load_pairs, load_records, pack_rows, pad_sequences, preload_images, resize_center_crop,
                            stain_jitter, to_float)

COLOURS = [(200, 30, 90), (30, 180, 60), (20, 40, 220)]
CAPTIONS = ["Adipose tissue, large vacuoles.", 'Mucus, "pale blue", with a comma', "Tumour\tepithelium"]


def png_bytes(img, fmt="PNG"):
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def world(tmp_path):
    """Three tiny non-square images and their (relative path, caption) pairs."""
    (tmp_path / "images").mkdir()
    pairs = []
    for i, (colour, caption) in enumerate(zip(COLOURS, CAPTIONS)):
        Image.new("RGB", (10, 6), colour).save(tmp_path / "images" / f"im{i}.png")
        pairs.append((f"images/im{i}.png", caption))
    return tmp_path, pairs


def pairs_as_tar(tmp_path, pairs, name, caption_ext="txt"):
    samples = []
    for rel, caption in pairs:
        text = caption.encode() if caption_ext == "txt" else json.dumps({"caption": caption}).encode()
        samples.append((os.path.basename(rel).split(".")[0], {"png": (tmp_path / rel).read_bytes(), caption_ext: text}))
    return write_tar(tmp_path / name, samples)


def pixels_and_captions(items):
    return [(image_tensor(it["image"], it["source"], 8).tolist(), it["caption"]) for it in items]


# ---------------------------------------------------------------------------------------------
# formats round-trip to the same items


def test_every_pairs_format_gives_the_same_items(world):
    root, pairs = world
    jsonl = write_jsonl(root / "pairs.jsonl", [{"image": p, "caption": c} for p, c in pairs])
    json_array = root / "pairs.json"
    json_array.write_text(json.dumps([{"image": p, "caption": c} for p, c in pairs]))
    with open(root / "pairs.csv", "w", newline="") as f:
        csv.writer(f).writerows([["title", "filepath"], *[[c, p] for p, c in pairs]])
    with open(root / "pairs_semicolon.csv", "w", newline="") as f:
        csv.writer(f, delimiter=";").writerows([["filepath", "title"], *pairs])
    with open(root / "pairs.tsv", "w", newline="") as f:
        csv.writer(f, delimiter="\t").writerows([["filepath", "title"], *pairs])
    (root / "shards").mkdir()
    pairs_as_tar(root, pairs[:2], "shards/shard-000.tar")
    pairs_as_tar(root, pairs[2:], "shards/shard-001.tar", caption_ext="json")

    reference, n = load_pairs(jsonl)
    assert n == 0 and [it["caption"] for it in reference] == CAPTIONS
    assert [it["image"] for it in reference] == [str(root / p) for p, _ in pairs]
    assert [it["source"] for it in reference] == [f"{jsonl}:{i}" for i in (1, 2, 3)]

    def strip(items):
        return [{k: v for k, v in it.items() if k != "source"} for it in items]

    for other in (load_pairs(json_array), load_pairs(root / "pairs.csv"), load_pairs(root / "pairs.tsv"),
                  load_pairs(root / "pairs_semicolon.csv", csv_sep=";")):
        assert strip(other[0]) == strip(reference) and other[1] == 0
    expected = pixels_and_captions(reference)
    for shards in (root / "shards", [root / "shards/shard-000.tar", root / "shards/shard-001.tar"]):
        items, n = load_pairs(shards)
        assert n == 0 and pixels_and_captions(items) == expected
        assert items[0]["source"] == f"{root / 'shards/shard-000.tar'}:im0"


def test_custom_csv_columns(world):
    root, pairs = world
    with open(root / "x.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "text"], *pairs])
    items, _ = load_pairs(root / "x.csv", csv_img_key="path", csv_caption_key="text")
    assert [it["caption"] for it in items] == CAPTIONS


def test_sharegpt_llava_and_llamafactory_forms_give_identical_messages(world):
    root, pairs = world
    question, answer = "<image>\nWhich tissue is shown?", "<think>vacuoles</think><answer>adipose</answer>"
    sharegpt = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question},
                             {"role": "assistant", "content": answer}], "images": [pairs[0][0]]}
    llava = {"id": "x", "image": pairs[0][0], "conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    factory = {"system": "Be brief.", "images": [pairs[0][0]], "conversations": [
        {"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    a, _ = load_conversations(write_jsonl(root / "a.jsonl", [sharegpt]))
    b, _ = load_conversations(write_jsonl(root / "b.jsonl", [llava]))
    (root / "c.json").write_text(json.dumps([factory]))
    c, _ = load_conversations(root / "c.json")
    assert a[0]["messages"] == b[0]["messages"] == c[0]["messages"]
    assert a[0]["messages"][1] == {"role": "user", "content": question}
    assert a[0]["images"] == b[0]["images"] == c[0]["images"] == [str(root / pairs[0][0])]
    assert c[0]["source"] == f"{root / 'c.json'}:[0]"


def test_text_only_conversation_has_no_images(world):
    root, _ = world
    conv = {"messages": [{"role": "user", "content": "What is mucin?"}, {"role": "assistant", "content": "A glycoprotein."}]}
    items, _ = load_conversations(write_jsonl(root / "t.jsonl", [conv]))
    assert items[0]["images"] == []


def test_load_records(world):
    root, pairs = world
    rows = [{"image": pairs[0][0], "question": "Yes or no?", "options": None, "answer": "yes", "kind": "yesno"},
            {"text": "Tumour grade follows the mitotic count."}]
    items, n = load_records(write_jsonl(root / "r.jsonl", rows[:1]), ("image", "question", "answer", "kind"))
    assert n == 0 and items[0]["image"] == str(root / pairs[0][0]) and items[0]["options"] is None
    assert items[0]["answer"] == "yes" and items[0]["source"].endswith("r.jsonl:1")
    items, _ = load_records(write_jsonl(root / "t.jsonl", rows[1:]), ("text",))
    assert items == [{"text": rows[1]["text"], "source": f"{root / 't.jsonl'}:1"}]


# ---------------------------------------------------------------------------------------------
# bad input: one line "file:line: message", or skipped and counted

GOOD = {"image": "images/im0.png", "caption": "fine"}
BAD_MANIFEST_LINES = {
    "not found": ({"image": "images/ab12.png", "caption": "x"}, "image 'images/ab12.png' not found"),
    "malformed json": ('{"image": "images/im0.png", "caption": ', "malformed JSON"),
    "not an object": ("[1, 2]", "expected a JSON object"),
    "missing key": ({"image": "images/im0.png"}, "missing key 'caption'"),
    "empty text": ({"image": "images/im0.png", "caption": "  "}, "empty text in 'caption'"),
    "escapes root": ({"image": "../outside.png", "caption": "x"}, "escapes the data root"),
    "absolute outside": ({"image": "/etc/hostname", "caption": "x"}, "escapes the data root"),
}


@pytest.mark.parametrize("kind", sorted(BAD_MANIFEST_LINES))
def test_bad_manifest_line_is_a_one_line_error_or_skipped(world, kind):
    root, _ = world
    bad, message = BAD_MANIFEST_LINES[kind]
    path = write_jsonl(root / "captions_train.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(DataError) as err:
        load_pairs(path)
    assert str(err.value).startswith(f"{path}:3: ") and message in str(err.value)
    assert "\n" not in str(err.value)
    items, n_skipped = load_pairs(path, skip_bad=True)
    assert n_skipped == 1 and [it["source"] for it in items] == [f"{path}:{i}" for i in (1, 2, 4)]


def test_allow_outside_root(world):
    root, _ = world
    Image.new("RGB", (4, 4)).save(root / "outside.png")
    path = write_jsonl(root / "images" / "m.jsonl", [{"image": "../outside.png", "caption": "x"}])
    with pytest.raises(DataError, match="escapes the data root"):
        load_pairs(path)
    items, _ = load_pairs(path, allow_outside_root=True)
    assert items[0]["image"] == str(root / "outside.png")
    path = write_jsonl(root / "images" / "m.jsonl", [{"image": "outside.png", "caption": "x"}])
    items, _ = load_pairs(path, root=root)  # paths are relative to an explicit root, not the manifest
    assert items[0]["image"] == str(root / "outside.png")


def test_whole_file_errors(world):
    root, pairs = world
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        load_pairs(root / "nope.jsonl", skip_bad=True)
    (root / "bad.csv").write_text("image,caption\na.png,x\n")
    with pytest.raises(DataError, match=r"bad\.csv:1: missing column 'filepath'"):
        load_pairs(root / "bad.csv", skip_bad=True)
    (root / "broken.tar").write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(DataError, match=r"broken\.tar: unreadable tar shard"):
        load_pairs(root / "broken.tar")
    with pytest.raises(DataError, match="unsupported pairs format"):
        load_pairs(root / "pairs.parquet")


def test_bad_csv_row_names_its_line(world):
    root, _ = world
    (root / "c.csv").write_text("filepath,title\nimages/im0.png,ok\nimages/im1.png,\nimages/zz.png,x\n")
    with pytest.raises(DataError, match=r"c\.csv:3: empty text in 'caption'"):
        load_pairs(root / "c.csv")
    assert load_pairs(root / "c.csv", skip_bad=True)[1] == 2


def test_bad_tar_samples(world):
    root, _ = world
    png = png_bytes(Image.new("RGB", (4, 4)))
    path = write_tar(root / "s.tar", [("a", {"png": png, "txt": b"ok"}), ("b", {"png": png}), ("c", {"txt": b"x"}),
                                      ("d", {"png": png, "json": b"{not json"}), ("e", {"png": b"garbage", "txt": b"y"})])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:b: missing caption"):
        load_pairs(path)
    items, n = load_pairs(path, skip_bad=True)
    assert n == 3 and [it["source"] for it in items] == [f"{path}:a", f"{path}:e"]
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:e: image data is not a readable image"):
        preload_images(items, 4)


BAD_CONVERSATIONS = {
    "unknown role": ({"conversations": [{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}]}, "turn 0: unknown role"),
    "no assistant": ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
    "empty turn": ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}, "turn 1: empty text"),
    "placeholders": ({"messages": [{"role": "user", "content": "<image> x"}, {"role": "assistant", "content": "y"}]},
                     "1 '<image>' placeholders but 0 images"),
    "missing image": ({"image": "gone.png", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "y"}]},
                      "image 'gone.png' not found"),
    "no turns": ({"id": 3}, "missing key 'messages'"),
}


@pytest.mark.parametrize("kind", sorted(BAD_CONVERSATIONS))
def test_bad_conversation(world, kind):
    root, _ = world
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    bad, message = BAD_CONVERSATIONS[kind]
    path = write_jsonl(root / "sft.jsonl", [good, bad])
    with pytest.raises(DataError) as err:
        load_conversations(path)
    assert str(err.value).startswith(f"{path}:2: ") and message in str(err.value)
    assert load_conversations(path, skip_bad=True)[1] == 1


def test_bad_record(world):
    root, _ = world
    path = write_jsonl(root / "mcq.jsonl", [{"question": "q", "answer": "A"}, {"question": "q"}, {"question": "", "answer": "B"}])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: missing key 'answer'$"):
        load_records(path, ("question", "answer"))
    items, n = load_records(path, ("question", "answer"), skip_bad=True)
    assert n == 2 and len(items) == 1


def bad_image_files():
    """kind -> (file name, bytes, expected message fragment)."""
    good = png_bytes(Image.new("RGB", (32, 32), (9, 99, 199)))
    return {
        "zero-byte": ("empty.png", b"", "is empty (0 bytes)"),
        "truncated": ("cut.png", good[: len(good) // 2], "truncated or corrupt"),
        "not an image": ("text.png", b"just some text, no pixels", "is not a readable image"),
    }


@pytest.mark.parametrize("kind", ["zero-byte", "truncated", "not an image"])
def test_bad_image_is_named_by_its_manifest_line(world, kind):
    root, _ = world
    name, payload, message = bad_image_files()[kind]
    (root / "images" / name).write_bytes(payload)
    path = write_jsonl(root / "captions_train.jsonl", [GOOD, {"image": f"images/{name}", "caption": "x"}, GOOD])
    items, n = load_pairs(path)  # existence is fine; decoding fails later
    assert n == 0
    with pytest.raises(DataError) as err:
        preload_images(items, 8)
    assert str(err.value).startswith(f"{path}:2: image '{root / 'images' / name}'") and message in str(err.value)
    images, kept, n_skipped = preload_images(items, 8, skip_bad=True)
    assert n_skipped == 1 and images.shape == (2, 3, 8, 8) and [it["source"] for it in kept] == [f"{path}:1", f"{path}:3"]


def test_decompression_bomb_guard(world, monkeypatch):
    root, _ = world
    big = root / "big.png"
    Image.new("L", (64, 64)).save(big)
    with pytest.raises(DataError, match=r"^m\.jsonl:7: image .* too large \(decompression-bomb guard"):
        load_image(str(big), "m.jsonl:7", max_pixels=64 * 63)
    assert load_image(str(big), "m.jsonl:7", max_pixels=64 * 64).size == (64, 64)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL's own guard: warning at > 1000, error at > 2000
    for limit_hit in ((40, 40), (50, 50)):  # PIL's warning, then PIL's error
        Image.new("L", limit_hit).save(big)
        with pytest.raises(DataError, match="decompression-bomb guard"):
            load_image(str(big), "m.jsonl:7")


# ---------------------------------------------------------------------------------------------
# images: any mode -> RGB of the right size


def mode_image(mode):
    if mode == "I;16":
        return Image.fromarray(np.full((6, 10), 128 * 257, dtype=np.uint16))
    if mode == "P-transparent":
        img = Image.new("P", (10, 6), 0)
        img.putpalette([255, 0, 0] * 256)
        img.info["transparency"] = 0
        return img
    return Image.new(mode, (10, 6))


@pytest.mark.parametrize("mode,fmt", [("RGB", "PNG"), ("L", "PNG"), ("LA", "PNG"), ("RGBA", "PNG"), ("P", "PNG"),
                                      ("P-transparent", "PNG"), ("I;16", "PNG"), ("I", "TIFF"), ("F", "TIFF"),
                                      ("CMYK", "JPEG"), ("1", "PNG"), ("RGB", "JPEG")])
def test_every_mode_becomes_rgb_of_the_right_size(mode, fmt):
    img = load_image(png_bytes(mode_image(mode), fmt), "x:1")
    assert img.mode == "RGB" and img.size == (10, 6)
    t = image_tensor(png_bytes(mode_image(mode), fmt), "x:1", 8)
    assert t.shape == (3, 8, 8) and t.dtype == torch.uint8


def test_mode_conversion_values():
    mid_grey = load_image(png_bytes(mode_image("I;16")), "x:1")
    assert mid_grey.getpixel((0, 0)) == (128, 128, 128)  # 16-bit values are rescaled, not clipped at 255
    transparent = load_image(png_bytes(Image.new("RGBA", (2, 2), (0, 0, 0, 0))), "x:1")
    assert transparent.getpixel((0, 0)) == (255, 255, 255)  # transparency is slide background
    assert load_image(png_bytes(mode_image("P-transparent")), "x:1").getpixel((0, 0)) == (255, 255, 255)
    half = load_image(png_bytes(Image.new("LA", (2, 2), (0, 128))), "x:1").getpixel((0, 0))
    assert half == (127, 127, 127)  # 0 * 128/255 + 255 * 127/255
    assert load_image(png_bytes(Image.new("L", (2, 2), 100)), "x:1").getpixel((0, 0)) == (100, 100, 100)


def test_resize_center_crop_hand_case():
    img = Image.new("RGB", (4, 2))
    for x in range(4):
        for y in range(2):
            img.putpixel((x, y), (x * 60, 0, 0))
    crop = resize_center_crop(img, 2)  # shorter side already 2: just the centre columns 1, 2
    assert [crop.getpixel((x, 0))[0] for x in range(2)] == [60, 120]
    assert resize_center_crop(Image.new("RGB", (3, 7)), 8).size == (8, 8)  # upscales too
    assert resize_center_crop(Image.new("RGB", (300, 100)), 16).size == (16, 16)


def test_preload_images_shares_decoding_and_keeps_order(world):
    root, pairs = world
    path = write_jsonl(root / "m.jsonl", [{"image": p, "caption": f"c{i}"} for i, (p, _) in enumerate(pairs + pairs[:1])])
    items, _ = load_pairs(path)
    images, kept, n = preload_images(items, 4)
    assert n == 0 and kept == items and images.shape == (4, 3, 4, 4) and images.dtype == torch.uint8
    for i, colour in enumerate(COLOURS + COLOURS[:1]):
        assert images[i, :, 0, 0].tolist() == list(colour)


# ---------------------------------------------------------------------------------------------
# to_float / augment


def test_to_float_hand_case():
    x = torch.zeros(1, 3, 1, 1, dtype=torch.uint8)
    x[0, 0] = 255
    y = to_float(x)
    assert y.dtype == torch.float32
    assert torch.allclose(y[0, :, 0, 0], torch.tensor([(1 - IMAGE_MEAN[0]) / IMAGE_STD[0], -IMAGE_MEAN[1] / IMAGE_STD[1],
                                                        -IMAGE_MEAN[2] / IMAGE_STD[2]]))


def test_stain_jitter_identity_and_white_background():
    x = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    ones, zeros = torch.ones(2, 3), torch.zeros(2, 3)
    assert torch.allclose(stain_jitter(x, ones, zeros), x, atol=1e-5)
    white = torch.ones(1, 3, 2, 2)  # zero optical density: scaling the stains keeps it white
    assert torch.allclose(stain_jitter(white, torch.full((1, 3), 1.3), torch.zeros(1, 3)), white)
    darker = stain_jitter(x, torch.full((2, 3), 1.2), zeros)  # more stain absorbs more light
    assert (darker <= x + 1e-5).all() and (darker < x - 1e-3).any()


def test_augment_is_deterministic_and_keeps_shape():
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    a = augment(images, torch.Generator().manual_seed(7))
    b = augment(images, torch.Generator().manual_seed(7))
    c = augment(images, torch.Generator().manual_seed(8))
    assert a.shape == images.shape and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a - to_float(images)).abs().max() < 4.0  # mild: still in the normalised range


def test_augment_geometry_is_a_dihedral_symmetry():
    images = torch.randint(0, 256, (16, 3, 5, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    out = augment(images, torch.Generator().manual_seed(3), stain_scale=0.0, stain_shift=0.0)
    seen = set()
    for img, aug in zip(images, out):
        candidates = [torch.rot90(f, k, dims=(-2, -1)) for f in (img, img.flip(-1)) for k in range(4)]
        matches = [i for i, cand in enumerate(candidates) if torch.allclose(to_float(cand), aug, atol=1e-4)]
        assert matches, "augmented image is not a flip/rotation of its input"
        seen.add(matches[0])
    assert len(seen) > 2  # and several different symmetries are drawn


# ---------------------------------------------------------------------------------------------
# collators


def test_pad_sequences_hand_case():
    ids, mask = pad_sequences([[5, 6, 7], [8]], pad_value=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_sequences([[5, 6, 7], [8]], pad_value=-1, side="left")
    assert ids.tolist() == [[5, 6, 7], [-1, -1, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == mask.dtype == torch.long


def test_collate_lm_hand_case():
    examples = [([10, 11, 12, 13], [0, 0, 1, 1]), ([20, 21], [0, 1])]
    batch = collate_lm(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[10, 11, 12], [20, 0, 0]]
    assert batch["targets"].tolist() == [[11, 12, 13], [21, -1, -1]]
    assert batch["loss_mask"].tolist() == [[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["loss_mask"].dtype == torch.float32 and batch["targets"].dtype == torch.long


def test_collate_lm_property_targets_are_next_tokens():
    g = torch.Generator().manual_seed(0)
    examples = []
    for n in (3, 7, 5):
        ids = torch.randint(1, 50, (n,), generator=g).tolist()
        examples.append((ids, torch.randint(0, 2, (n,), generator=g).tolist()))
    batch = collate_lm(examples, pad_id=0)
    for row, (ids, mask) in enumerate(examples):
        n = len(ids) - 1
        assert batch["input_ids"][row, :n].tolist() == ids[:-1] and batch["targets"][row, :n].tolist() == ids[1:]
        assert batch["loss_mask"][row, :n].tolist() == [float(m) for m in mask[1:]]
        assert (batch["targets"][row, n:] == -1).all() and (batch["loss_mask"][row, n:] == 0).all()
        assert batch["attention_mask"][row].sum() == n


def test_pack_rows_first_fit_decreasing_hand_case():
    # longest first: 6 -> bin 0; 5 -> bin 1; 4 -> bin 2; 3 -> bin 1 (5 + 3 = 8); 2 -> bin 0 (6 + 2); 1 -> bin 2
    assert pack_rows([3, 6, 1, 5, 2, 4], 8) == [[1, 4], [3, 0], [5, 2]]
    assert pack_rows([9, 2], 8) == [[0], [1]]  # too long for any bin: one of its own


def test_pack_rows_property_every_row_once_within_capacity():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        lengths = torch.randint(1, 40, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist()
        cap = max(lengths)
        bins = pack_rows(lengths, cap)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= cap for b in bins)
        # first fit, longest first: when a row was placed, no earlier bin had room for it
        rank = {i: r for r, i in enumerate(sorted(range(len(lengths)), key=lambda i: -lengths[i]))}
        where = {i: j for j, b in enumerate(bins) for i in b}
        for i, j in where.items():
            for earlier in bins[:j]:
                assert cap - sum(lengths[k] for k in earlier if rank[k] < rank[i]) < lengths[i]


def test_collate_lm_packed_hand_case():
    examples = [([10, 11, 12, 13], [0, 0, 1, 1]), ([20, 21], [0, 1]), ([30, 31, 32], [0, 1, 1])]
    batch = collate_lm(examples, pad_id=0, pack=True)  # next-token lengths 3, 1, 2 in rows of 3
    assert batch["order"].tolist() == [0, 2, 1]
    assert batch["input_ids"].tolist() == [[10, 11, 12], [30, 31, 20]]
    assert batch["targets"].tolist() == [[11, 12, 13], [31, 32, 21]]
    assert batch["loss_mask"].tolist() == [[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 2]]


def test_collate_lm_packed_property_same_tokens_as_unpacked():
    g = torch.Generator().manual_seed(1)
    examples = []
    for n in (3, 9, 5, 2, 7, 4):
        ids = torch.randint(1, 50, (n,), generator=g).tolist()
        examples.append((ids, torch.randint(0, 2, (n,), generator=g).tolist()))
    padded, packed = collate_lm(examples, 0), collate_lm(examples, 0, pack=True)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    # each example's tokens, targets and loss mask, read back out of its segment, in the reading order
    seg = packed["attention_mask"]
    got = [(packed["input_ids"][r][seg[r] == k].tolist(), packed["targets"][r][seg[r] == k].tolist(),
            packed["loss_mask"][r][seg[r] == k].tolist())
           for r in range(seg.shape[0]) for k in range(1, int(seg[r].max()) + 1)]
    want = [(ids[:-1], ids[1:], [float(m) for m in mask[1:]]) for ids, mask in examples]
    assert got == [want[i] for i in packed["order"].tolist()]
    assert (packed["targets"][seg == 0] == -1).all() and (packed["loss_mask"][seg == 0] == 0).all()


def test_data_module_names_exist():
    assert data.DataError is DataError and issubclass(DataError, ValueError)
