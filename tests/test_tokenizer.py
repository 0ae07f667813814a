"""Tokenizer: special tokens are single ids, chat template and loss masks, loading foreign files."""

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers

from nanopatho.data import DataError
from nanopatho.prompts import SYSTEM_PROMPT, format_question
from nanopatho.tokenizer import SPECIAL_TOKENS, Tokenizer

TEXTS = [
    "Adipose tissue with large empty vacuoles and thin membranes.",
    "Dense sheets of small round lymphocytes with dark nuclei.",
    "<think>Glands are irregular and nuclei are pleomorphic.</think><answer>B</answer>",
    "High grade adenocarcinoma: many mitotic figures, 3 or more per field.",
] * 20


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(TEXTS, vocab_size=400)


def test_special_tokens_are_distinct_single_ids(tok):
    ids = {name: tok.encode(token) for name, token in SPECIAL_TOKENS.items()}
    assert all(len(v) == 1 for v in ids.values()), ids
    assert len({v[0] for v in ids.values()}) == len(SPECIAL_TOKENS)
    for name, v in ids.items():
        assert getattr(tok, f"{name}_id") == v[0]


def test_special_tokens_survive_encode_decode(tok):
    text = "<|im_start|>assistant\n<think>two glands</think> <answer>A</answer><|im_end|>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    for token in ("<think>", "</think>", "<answer>", "</answer>", "<|im_start|>", "<|im_end|>"):
        assert ids.count(tok.token_to_id(token)) == 1
    assert tok.decode(ids, skip_special=True) == "assistant\ntwo glands A"


def test_any_text_round_trips_through_bytes(tok):
    text = "Größe 3 µm — 🔬 mitoses: 4+\n\ttab"  # characters never seen in training
    assert tok.decode(tok.encode(text)) == text


def test_no_bos_or_eos_added(tok):
    ids = tok.encode("lymphocytes")
    assert tok.bos_id not in ids and tok.eos_id not in ids


def test_save_and_load_keep_ids(tok, tmp_path):
    tok.save(tmp_path / "tokenizer.json")
    loaded = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert loaded.special_ids == tok.special_ids and loaded.vocab_size == tok.vocab_size
    assert loaded.encode(TEXTS[2]) == tok.encode(TEXTS[2])


def test_train_rejects_too_small_vocab():
    with pytest.raises(AssertionError, match="vocab_size"):
        Tokenizer.train(TEXTS, vocab_size=100)


def test_render_chat_hand_case(tok):
    """One user and one assistant turn, every position checked by hand."""
    enc = tok.encode
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    ids, mask = tok.render_chat(messages, n_image_tokens=2)
    user = [tok.im_start_id] + enc("user\n") + enc("hi") + [tok.im_end_id] + enc("\n")
    asst_head = [tok.im_start_id] + enc("assistant\n")
    asst_body = enc("ok") + [tok.im_end_id]
    assert ids == user + asst_head + asst_body + enc("\n")
    assert mask == [0] * len(user + asst_head) + [1] * len(asst_body) + [0] * len(enc("\n"))


def test_loss_mask_covers_exactly_assistant_spans_multi_turn(tok):
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": format_question("Which tissue?", ["A) adipose", "B) mucus"])},
        {"role": "assistant", "content": "<think>empty vacuoles</think><answer>A</answer>"},
        {"role": "user", "content": "Are there lymphocytes?"},
        {"role": "assistant", "content": "<answer>no</answer>"},
    ]
    ids, mask = tok.render_chat(messages, n_image_tokens=4)
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    trained = [i for i, m in zip(ids, mask) if m]
    expected = []
    for m in messages:
        if m["role"] == "assistant":
            expected += tok.encode(m["content"]) + [tok.im_end_id]
    assert trained == expected
    # masked runs are contiguous and each ends on <|im_end|>: one run per assistant turn
    runs = [ids[i] for i in range(len(ids)) if mask[i] and (i + 1 == len(ids) or not mask[i + 1])]
    assert runs == [tok.im_end_id, tok.im_end_id]
    # the text is exactly the ChatML template
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    assert tok.decode(ids) == text.replace("<image>", "<|image|>" * 4)


def test_image_placeholder_expands_to_n_image_tokens(tok):
    for n in (1, 5):
        ids, mask = tok.render_chat([{"role": "user", "content": "<image>\nWhat is shown?"}], n_image_tokens=n)
        first = ids.index(tok.image_id)
        assert ids.count(tok.image_id) == n and ids[first:first + n] == [tok.image_id] * n
        assert not any(mask)
    ids, _ = tok.render_chat([{"role": "user", "content": "<image> and <image>"}], n_image_tokens=3)
    assert ids.count(tok.image_id) == 6


def test_generation_prompt_and_render_prompt(tok):
    user = format_question("Which tissue?")
    ids, mask = tok.render_chat([{"role": "user", "content": user}], 2, add_generation_prompt=True)
    tail = [tok.im_start_id] + tok.encode("assistant\n")
    assert ids[-len(tail):] == tail and not any(mask)
    prompt = tok.render_prompt(user, 2)
    full, _ = tok.render_chat([{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}], 2, True)
    assert prompt == full
    assert tok.render_prompt(user, 2, system=None) == ids


def test_unknown_role_is_rejected(tok):
    with pytest.raises(AssertionError, match="unknown role"):
        tok.render_chat([{"role": "gpt", "content": "x"}], 1)


def _qwen_like_file(path, specials):
    """A small tokenizer.json shaped like Qwen2's: NFC, regex split + byte-level, ChatML specials."""
    hf = HFTokenizer(models.BPE())
    hf.normalizer = normalizers.NFC()
    split = pre_tokenizers.Split(Regex(r"\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+"), behavior="isolated")
    hf.pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=350, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(TEXTS, trainer)
    hf.save(str(path))
    return hf


def test_qwen2_style_file_maps_specials_by_name(tmp_path, capsys):
    path = tmp_path / "tokenizer.json"
    raw = _qwen_like_file(path, ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>"])
    tok = Tokenizer.from_file(path)
    eot = raw.token_to_id("<|endoftext|>")
    assert tok.pad_id == tok.bos_id == tok.eos_id == eot
    assert tok.im_start_id == raw.token_to_id("<|im_start|>") and tok.im_end_id == raw.token_to_id("<|im_end|>")
    assert tok.image_id == raw.token_to_id("<|image_pad|>")
    # only the four reasoning markers are appended, after the existing vocabulary, with a note
    n = raw.get_vocab_size(with_added_tokens=True)
    assert tok.vocab_size == n + 4
    assert sorted([tok.think_id, tok.think_end_id, tok.answer_id, tok.answer_end_id]) == list(range(n, n + 4))
    assert capsys.readouterr().out.count("added special token") == 4
    text = "Dense sheets of small round lymphocytes."
    assert tok.encode(text) == raw.encode(text, add_special_tokens=False).ids  # existing ids unchanged
    ids, mask = tok.render_chat([{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "<answer>A</answer>"}], 3)
    assert ids.count(tok.image_id) == 3 and sum(mask) == 4  # <answer> A </answer> <|im_end|>


def test_foreign_file_missing_required_special_is_an_error(tmp_path):
    path = tmp_path / "tokenizer.json"
    _qwen_like_file(path, ["<|endoftext|>", "<|im_start|>"])
    with pytest.raises(DataError, match=r"tokenizer\.json: tokenizer has no im_end token \('<\|im_end\|>'\)"):
        Tokenizer.from_file(path)


def test_special_present_as_ordinary_vocab_entry_keeps_its_id(tmp_path):
    """A vocab that merely contains "<think>" as a BPE entry: loading makes it atomic, same id."""
    vocab = {"<": 0, "think": 1, ">": 2, "<think>": 3, "a": 4, "<|endoftext|>": 5, "<|im_start|>": 6, "<|im_end|>": 7}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert tok.think_id == 3 and tok.encode("a<think>a") == [4, 3, 4]
