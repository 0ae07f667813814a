"""train_rl --types: which question types RL trains on.

    python -m pytest -q tests/test_rl_types.py

Pinned here: an empty spec keeps every row as it is; listed types are kept in file order and name:N keeps
the first N rows of that type; a malformed entry, a type no row has and --types with --stream each stop
with one message naming the file and the flag; load_questions decodes only the kept rows' images.
"""

import json

import pytest
from PIL import Image

import train_rl
from nanopatho.data import DataError

PATH = "data/rl_train.jsonl"


def rows():
    """Eight questions: three tissue, two glands, one grade, one mucin and one without a type."""
    types = ["tissue", "glands", "tissue", "grade", "glands", "tissue", "mucin", None]
    return [dict(id=i, question=f"q{i}", **({} if t is None else {"type": t})) for i, t in enumerate(types)]


def ids(items):
    return [item["id"] for item in items]


def test_empty_spec_keeps_every_row():
    items = rows()
    assert train_rl.select_types(items, "", PATH) is items


def test_listed_types_in_file_order():
    assert ids(train_rl.select_types(rows(), "glands,tissue", PATH)) == [0, 1, 2, 4, 5]
    assert ids(train_rl.select_types(rows(), " mucin , grade ", PATH)) == [3, 6]  # file order, not the spec's


def test_count_keeps_the_first_rows_of_its_type():
    assert ids(train_rl.select_types(rows(), "tissue:2", PATH)) == [0, 2]
    assert ids(train_rl.select_types(rows(), "tissue:2,glands", PATH)) == [0, 1, 2, 4]
    assert ids(train_rl.select_types(rows(), "tissue:9", PATH)) == [0, 2, 5]  # N above the rows there are: all


@pytest.mark.parametrize("spec, entry", [("tissue:x", "tissue:x"), ("tissue:0", "tissue:0"), ("tissue:-1", "tissue:-1"),
                                         ("tissue:", "tissue:"), ("glands,,tissue", ""), (":3", ":3"),
                                         ("glands,", ""), ("tissue,tissue:2", "tissue:2")])
def test_malformed_entry_fails(spec, entry):
    with pytest.raises(DataError) as error:
        train_rl.select_types(rows(), spec, PATH)
    assert str(error.value).startswith(f"{PATH}: --types {spec!r}: entry {entry!r} must be")


def test_type_without_rows_fails():
    with pytest.raises(DataError, match=r"^data/rl_train.jsonl: --types lists necrosis, stroma, which no row has"):
        train_rl.select_types(rows(), "tissue,necrosis,stroma:3", PATH)


def test_types_with_stream_fails(tmp_path, capsys):
    cfg = train_rl.Config(data=str(tmp_path), stream=True, types="tissue")
    with pytest.raises(SystemExit) as exit_info:
        train_rl.load_questions(cfg, 16)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path / 'rl_train.jsonl'}: --types selects from the preloaded questions; " \
                  "it does not combine with --stream"


def write_questions(data):
    """rl_train.jsonl of rows() with a 4x4 image each (the row without a type included)."""
    data.joinpath("images").mkdir()
    with open(data / "rl_train.jsonl", "w") as f:
        for item in rows():
            Image.new("RGB", (4, 4), (item["id"] * 30, 0, 0)).save(data / "images" / f"{item['id']}.png")
            f.write(json.dumps(dict(item, image=f"images/{item['id']}.png", answer="yes", kind="yesno")) + "\n")


def test_load_questions_decodes_only_the_kept_rows(tmp_path, capsys):
    write_questions(tmp_path)
    (all_items, all_images), bad = train_rl.load_questions(train_rl.Config(data=str(tmp_path)), 8)
    assert bad == 0 and ids(all_items) == list(range(8)) and all_images.shape == (8, 3, 8, 8)
    assert "--types" not in capsys.readouterr().out  # the default prints nothing new
    cfg = train_rl.Config(data=str(tmp_path), types="tissue:2,glands")
    (items, images), bad = train_rl.load_questions(cfg, 8)
    assert ids(items) == [0, 1, 2, 4] and images.shape == (4, 3, 8, 8)
    assert images.equal(all_images[[0, 1, 2, 4]])
    assert capsys.readouterr().out.strip() == "[rl] --types: 4 rows of 8 kept (glands 2, tissue 2)"
