"""Streaming data (nanopatho/stream.py): who reads what, the shuffle buffer, resume, bad samples, and
manifests exported by Windows tools (byte-order mark, CRLF). In-process, tiny data, DataLoader workers
forked for real.

    python -m pytest -q tests/test_stream.py
"""

import csv
import io
import itertools
import json
import random

import pytest
import torch
from PIL import Image

from e2e_util import write_tar
from nanopatho import stream
from nanopatho.data import BOM, DataError, image_tensor, load_conversations, load_pairs, load_records

N_SHARDS, PER_SHARD = 4, 6


def png(colour, size=(10, 6)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def shards(tmp_path, n_shards=N_SHARDS, per_shard=PER_SHARD):
    """n_shards tars of per_shard samples; sample i is a tile of colour (i, 0, 0) captioned 'caption i'."""
    (tmp_path / "shards").mkdir(exist_ok=True)
    for s in range(n_shards):
        samples = [(f"{i:04d}", {"png": png((i, 0, 0)), "txt": f"caption {i}".encode()})
                   for i in range(s * per_shard, (s + 1) * per_shard)]
        write_tar(tmp_path / "shards" / f"shard-{s:03d}.tar", samples)
    return tmp_path / "shards"


class SourcesPlan:
    """A plan whose batches are the samples' sources and 4-px tiles (what a training plan does, minus tokens)."""

    def __init__(self, batch_size=3):
        self.batch_size = batch_size

    def rows(self, k):
        return self.batch_size

    def sample(self, item):
        return item["source"], image_tensor(item["image"], item["source"], 4)

    def collate(self, samples, k):
        return {"sources": [s for s, _ in samples], "pixels": torch.stack([p for _, p in samples]), "k": k}


def take(s, n):
    return [next(s) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# the shuffle buffer


class ScriptedRng:
    """randrange answers from a script; shuffle reverses (a hand-checkable stand-in for random.Random)."""

    def __init__(self, picks):
        self.picks = list(picks)

    def randrange(self, n):
        return self.picks.pop(0)

    def shuffle(self, items):
        items.reverse()


def test_shuffle_buffer_hand_case():
    # buffer [a, b]; c replaces slot 1 (b leaves), d replaces slot 0 (a leaves); the rest [d, c] reversed
    assert list(stream.shuffle_buffer("abcd", 2, ScriptedRng([1, 0]))) == ["b", "a", "c", "d"]
    assert list(stream.shuffle_buffer("abcd", 1, ScriptedRng([]))) == ["a", "b", "c", "d"]
    bad = stream.Bad("x.tar: unreadable")  # passes straight through; then c replaces slot 0 (a), rest [c, b] reversed
    assert list(stream.shuffle_buffer(["a", bad, "b", "c"], 2, ScriptedRng([0]))) == [bad, "a", "b", "c"]


@pytest.mark.parametrize("n,size", [(0, 3), (5, 10), (50, 7), (200, 200)])
def test_shuffle_buffer_is_a_seeded_permutation(n, size):
    out = list(stream.shuffle_buffer(range(n), size, random.Random(n)))
    assert sorted(out) == list(range(n))
    assert out == list(stream.shuffle_buffer(range(n), size, random.Random(n)))
    if n >= 50:
        assert out != list(range(n)) and out != list(stream.shuffle_buffer(range(n), size, random.Random(n + 1)))


# ---------------------------------------------------------------------------------------------
# who reads what


def slot_rows(source, epoch, seed, n_slots):
    return [list(source.epoch_refs(epoch, seed, s, n_slots)) for s in range(n_slots)]


def keys(refs):
    return [(r[0], r[1]) for r in refs]


@pytest.mark.parametrize("n_slots", [1, 3, 4, 6])
def test_slots_split_an_epoch_without_overlap(tmp_path, n_slots):
    """Tar shards (more and fewer shards than slots) and a JSONL: each epoch the slots' shares are disjoint
    and together every sample once; the order is a pure function of (seed, epoch)."""
    tar = stream.TarShards(sorted(shards(tmp_path).iterdir()), buffer=5)
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"i": i}) + "\n" for i in range(25)))
    jsonl = stream.IndexedFile(path, lambda source, raw: raw)
    for source, everything in ((tar, N_SHARDS * PER_SHARD), (jsonl, 25)):
        by_slot = slot_rows(source, 0, 7, n_slots)
        flat = [keys(rows) if source is tar else rows for rows in by_slot]
        union = [k for rows in flat for k in rows]
        assert len(union) == len(set(union)) == everything
        assert slot_rows(source, 0, 7, n_slots) == by_slot  # a pure function of (seed, epoch)
        assert slot_rows(source, 1, 7, n_slots) != by_slot  # and a new order each epoch
        assert slot_rows(source, 0, 8, n_slots) != by_slot
    assert len(slot_rows(tar, 0, 7, 4)[0]) == PER_SHARD  # 4 shards, 4 slots: one shard each


def test_indexed_rows_equal_the_preloaded_loaders(tmp_path):
    """JSONL with a byte-order mark, CRLF ends and blank lines; CSV with a BOM and a quoted newline: every
    row read by seek is the item (source file:line included) the preloaded loader gives."""
    (tmp_path / "images").mkdir()
    for i in range(3):
        Image.new("RGB", (5, 5), (i, 9, 9)).save(tmp_path / "images" / f"{i}.png")
    rows = [{"image": f"images/{i}.png", "caption": f"tile {i}, \"quoted\"\nsecond line"} for i in range(3)]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_bytes(BOM + b"\r\n\r\n".join(json.dumps(r).encode() for r in rows) + b"\r\n")
    with open(tmp_path / "pairs.csv", "w", newline="", encoding="utf-8-sig") as f:  # utf-8-sig writes the BOM
        csv.writer(f).writerows([["filepath", "title"], *[[r["image"], r["caption"]] for r in rows]])
    for path in (jsonl, tmp_path / "pairs.csv"):
        source = stream.open_pairs(path)
        items, n_bad = load_pairs(path)
        assert n_bad == 0 and len(items) == len(source) == 3
        assert [source.read(r) for r in source.in_order()] == items
    assert [it["source"].rsplit(":", 1)[1] for it in load_pairs(jsonl)[0]] == ["1", "3", "5"]


def test_bom_and_crlf_manifests_load(tmp_path):
    """What Windows tools export: UTF-8 BOM + CRLF, for pairs, conversations, records and a .json array."""
    (tmp_path / "a.png").write_bytes(png((1, 2, 3)))
    conv = {"messages": [{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "x"}],
            "images": ["a.png"]}
    for name, obj, load in (("p.jsonl", {"image": "a.png", "caption": "c"}, load_pairs),
                            ("c.jsonl", conv, load_conversations),
                            ("r.jsonl", {"image": "a.png", "question": "q"}, lambda p: load_records(p, ("question",)))):
        path = tmp_path / name
        path.write_bytes(BOM + (json.dumps(obj) + "\r\n").encode() * 2)
        items, n_bad = load(path)
        assert n_bad == 0 and len(items) == 2 and items[0]["source"].endswith(":1")
    (tmp_path / "p.json").write_bytes(BOM + json.dumps([{"image": "a.png", "caption": "c"}]).encode() + b"\r\n")
    assert load_pairs(tmp_path / "p.json")[0][0]["caption"] == "c"
    with pytest.raises(DataError, match=r"p\.json: --stream reads \.jsonl"):
        stream.open_pairs(tmp_path / "p.json")


# ---------------------------------------------------------------------------------------------
# batches from worker processes


@pytest.mark.parametrize("workers", [0, 2])
def test_one_epoch_reads_every_sample_once(tmp_path, workers):
    """4 equal shards, 2 roles (or 1): the first 24 / 3 = 8 batches are epoch 0, each sample once."""
    s = stream.Stream(stream.open_pairs(shards(tmp_path), shuffle_buffer_size=4), SourcesPlan(), seed=3,
                      num_workers=workers)
    first = take(s, N_SHARDS * PER_SHARD // 3)
    sources = [src for b in first for src in b["sources"]]
    assert len(set(sources)) == len(sources) == N_SHARDS * PER_SHARD
    assert [b["k"] for b in first] == list(range(8))
    assert all(epoch == 0 for epoch, _ in s.positions)
    second = [src for b in take(s, 8) for src in b["sources"]]
    assert sorted(second) == sorted(sources) and second != sources  # epoch 1: all again, in another order
    s.close()


def test_zero_and_one_worker_give_the_same_batches(tmp_path):
    root = shards(tmp_path)
    a, b = (stream.Stream(stream.open_pairs(root), SourcesPlan(), seed=1, num_workers=w) for w in (0, 1))
    for x, y in zip(take(a, 10), take(b, 10)):
        assert x["sources"] == y["sources"] and torch.equal(x["pixels"], y["pixels"])
    b.close()


@pytest.mark.parametrize("source_kind", ["tar", "jsonl"])
def test_resume_continues_with_the_same_batches(tmp_path, source_kind):
    """Consume 5 batches from 2 workers, save the state, restart: the next 7 equal the uninterrupted run's
    (a position mid-epoch, batches past the epoch end, the first batch from the role it came from)."""
    if source_kind == "tar":
        make = lambda: stream.open_pairs(shards(tmp_path), shuffle_buffer_size=5)  # noqa: E731
    else:
        (tmp_path / "images").mkdir()
        rows = []
        for i in range(20):
            (tmp_path / "images" / f"{i}.png").write_bytes(png((i, 5, 5)))
            rows.append(json.dumps({"image": f"images/{i}.png", "caption": f"c{i}"}))
        (tmp_path / "pairs.jsonl").write_text("\n".join(rows) + "\n")
        make = lambda: stream.open_pairs(tmp_path / "pairs.jsonl")  # noqa: E731
    full = stream.Stream(make(), SourcesPlan(), seed=5, num_workers=2)
    reference = take(full, 12)
    full.close()
    cut = stream.Stream(make(), SourcesPlan(), seed=5, num_workers=2)
    take(cut, 5)
    state = json.loads(json.dumps(cut.state()))  # what a snapshot stores
    cut.close()
    assert state["batches"] == 5 and any(0 < cursor for _, cursor in state["positions"])
    resumed = stream.Stream(make(), SourcesPlan(), seed=5, num_workers=2)
    resumed.resume_at(state)
    for got, want in zip(take(resumed, 7), reference[5:]):
        assert got["sources"] == want["sources"] and got["k"] == want["k"]
        assert torch.equal(got["pixels"], want["pixels"])
    resumed.close()


def test_resume_with_another_worker_count_restarts_the_epoch(tmp_path, capsys):
    root = shards(tmp_path)
    two = stream.Stream(stream.open_pairs(root), SourcesPlan(), seed=5, num_workers=2)
    take(two, 3)
    state = two.state()
    two.close()
    one = stream.Stream(stream.open_pairs(root), SourcesPlan(), seed=5, num_workers=0)
    one.resume_at(state)
    assert "restarts at the start of epoch 0" in capsys.readouterr().out
    assert one.positions == [[0, 0]] and one.batches == 3
    epoch = [src for b in take(one, 8) for src in b["sources"]]
    assert len(set(epoch)) == N_SHARDS * PER_SHARD  # the whole epoch again, nothing lost


# ---------------------------------------------------------------------------------------------
# bad samples


def bad_shards(tmp_path):
    """shard 0: key 0001 is not an image, key 0003 has no caption; shard 1 (0006-0011) is cut inside the
    image of its 4th sample (0009); shard 2 is not a tar at all; shard 3 is fine: 5 bad, 4 + 3 + 6 good."""
    root = shards(tmp_path)
    good = [(f"{i:04d}", {"png": png((i, 0, 0)), "txt": b"ok"}) for i in range(6)]
    good[1] = ("0001", {"png": b"not an image" * 10, "txt": b"ok"})
    good[3] = ("0003", {"png": png((3, 0, 0))})
    write_tar(root / "shard-000.tar", good)
    whole = (root / "shard-001.tar").read_bytes()
    (root / "shard-001.tar").write_bytes(whole[: 512 * 13 + 20])  # 3 samples x 4 blocks, 0009.png's header, 20 bytes
    (root / "shard-002.tar").write_bytes(b"this is not a tar archive" * 40)
    return root


def test_bad_samples_raise_one_line_errors_from_workers(tmp_path):
    s = stream.Stream(stream.open_pairs(bad_shards(tmp_path)), SourcesPlan(batch_size=2), seed=0, num_workers=2)
    with pytest.raises(DataError) as err:
        take(s, 20)
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message and "worker" not in message
    assert ".tar" in message and any(m in message for m in ("not a readable image", "missing caption",
                                                            "unreadable tar shard", "cut short"))


def test_skip_bad_samples_counts_exactly_what_the_consumed_batches_skipped(tmp_path):
    """2 workers: n_bad is the number of bad entries among the refs each role pulled for the batches
    consumed (recounted here from the role's own epoch order), and a whole epoch has 5."""
    root = bad_shards(tmp_path)
    s = stream.Stream(stream.open_pairs(root), SourcesPlan(batch_size=1), seed=0, num_workers=2, skip_bad=True)
    sources = [b["sources"][0] for b in take(s, 4)]
    recount = 0
    for role, (epoch, cursor) in enumerate(s.positions):
        assert epoch == 0
        for ref in itertools.islice(s.source.epoch_refs(0, 0, role, 2), cursor):
            try:
                SourcesPlan().sample(s.source.read(ref)) if not isinstance(ref, stream.Bad) else None
            except DataError:
                ref = stream.Bad("")
            recount += isinstance(ref, stream.Bad)
    assert s.n_bad == recount and stream.total_bad(s) == recount
    assert not any(x.endswith(("shard-000.tar:0001", "shard-000.tar:0003", "shard-001.tar:0009")) for x in sources)
    s.close()
    one = stream.Stream(stream.open_pairs(root), SourcesPlan(batch_size=13), seed=0, skip_bad=True)
    assert len(set(next(one)["sources"])) == 13 and one.n_bad <= 5  # epoch 0's 13 good samples
    next(one)  # the rest of epoch 0, and epoch 1 up to its 13th good sample
    assert 5 <= one.n_bad <= 10 and one.positions[0][0] == 1


def test_bad_manifest_lines_name_their_line_through_workers(tmp_path):
    """A JSONL read by workers: a malformed line, a missing image; one-line file:line errors, or counted."""
    (tmp_path / "a.png").write_bytes(png((1, 2, 3)))
    lines = [json.dumps({"image": "a.png", "caption": f"c{i}"}) for i in range(8)]
    lines[2], lines[5] = '{"image": "a.png", "caption": ', json.dumps({"image": "gone.png", "caption": "c"})
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    s = stream.Stream(stream.open_pairs(path), SourcesPlan(batch_size=2), seed=0, num_workers=2)
    with pytest.raises(DataError, match=rf"^{path}:(3: malformed JSON|6: image 'gone.png' not found)"):
        take(s, 4)
    skipping = stream.Stream(stream.open_pairs(path), SourcesPlan(batch_size=2), seed=0, num_workers=1, skip_bad=True)
    sources = [src for b in take(skipping, 3) for src in b["sources"]]  # one worker: its 6 good lines, one epoch
    assert sorted(sources) == [f"{path}:{n}" for n in (1, 2, 4, 5, 7, 8)] and skipping.n_bad <= 2
    skipping.close()


def test_truncated_shard_error_without_skip(tmp_path):
    root = bad_shards(tmp_path)
    s = stream.Stream(stream.TarShards([root / "shard-001.tar"]), SourcesPlan(batch_size=1), seed=0)
    with pytest.raises(DataError, match=r"shard-001\.tar(:0009: \.png is cut short|: unreadable tar shard)"):
        take(s, 6)


def test_a_slot_with_nothing_readable_is_an_error_even_when_skipping(tmp_path):
    root = bad_shards(tmp_path)
    s = stream.Stream(stream.TarShards([root / "shard-002.tar"]), SourcesPlan(), seed=0, skip_bad=True)
    with pytest.raises(DataError, match=r"shard-002\.tar: no readable sample for rank 0's worker 0 .* in 3 epochs"):
        next(s)


def test_head_reads_the_first_good_items_in_order(tmp_path):
    """head checks what a read can (keys, captions; images are decoded by the caller)."""
    items, n_bad = stream.head(stream.open_pairs(bad_shards(tmp_path)), 4, skip_bad=True)
    assert [it["source"].rsplit(":", 1)[1] for it in items] == ["0000", "0001", "0002", "0004"] and n_bad == 1
    with pytest.raises(DataError, match=r"shard-000\.tar:0003: missing caption"):
        stream.head(stream.open_pairs(bad_shards(tmp_path)), 4)
