"""data/synthpath/readout.py: what a VLM's LM says about a tile's findings, scored word by word."""

import json

import pytest
import torch
import torch.nn.functional as F

from data.synthpath import perception, readout
from nanopatho.data import to_float


def tiny_vlm(image_size=32):
    from nanopatho.lm import LMConfig
    from nanopatho.tokenizer import Tokenizer
    from nanopatho.vit import ViTConfig
    from nanopatho.vlm import VLM, VLMConfig

    text = ("Tumour findings: gland formation is good, moderate, poor; pleomorphism is mild, moderate, marked; "
            "mitotic count is 0 1 2 3 4; necrosis is absent or present; mucin is absent or present.")
    tok = Tokenizer.train([text] * 5, vocab_size=300)
    vit = ViTConfig(image_size=image_size, patch_size=8, n_layer=1, n_head=2, n_embd=32)
    lm = LMConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, intermediate_size=64,
                  max_seq_len=64)
    torch.manual_seed(0)
    return VLM(VLMConfig(vision=vit, lm=lm, image_token_id=tok.image_id, pixel_shuffle=2, pooled_token=True)), tok


def test_level_word_hand_cases():
    attrs = {"gland_formation": "poor", "pleomorphism": "mild", "mitoses": 3, "necrosis": True, "mucin": False}
    assert [readout.level_word(attrs, a) for a in readout.FINDINGS] == ["poor", "mild", "3", "present", "absent"]
    for name, (_, words) in readout.FINDINGS.items():  # every word a tile can have is a candidate
        assert readout.level_word(attrs, name) in words


def test_readout_stats_hand_case():
    logp = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.5, 0.3, 0.2], [0.2, 0.2, 0.6]]))  # (4, 3)
    truth = torch.tensor([0, 1, 1, 1])  # said 0, 1, 0, 2: right on rows 0 and 1
    s = readout.readout_stats(logp, truth, ("a", "b", "c"))
    assert s["n"] == 4 and s["accuracy"] == pytest.approx(0.5)
    assert s["chance"] == pytest.approx(1 / 3) and s["majority"] == pytest.approx(0.75)  # "b" is 3 of 4
    assert s["said"] == pytest.approx({"a": 0.5, "b": 0.25, "c": 0.25})


def test_tiles_are_perceptions_held_out_draws():
    images, attrs = perception.tumour_draws(200, 6, 32)
    x, labels = perception.tumour_tiles(200, 6, 32)
    assert images.shape == (6, 32, 32, 3) and images.dtype.name == "uint8"
    assert torch.equal(x, to_float(torch.from_numpy(images).permute(0, 3, 1, 2)))  # as train_clip / the VLM see it
    for a, classes in perception.ATTRIBUTES.items():
        assert labels[a].tolist() == [classes.index(t[a]) for t in attrs]
    other, _ = perception.tumour_draws(201, 6, 32)
    assert not (other == images).all()


def test_word_logprobs_equal_full_forward_per_tile():
    """Each (tile, word) score is the sum of the word's token log-probs under one plain forward of
    `<|bos|> <image>*k prompt word`, whatever the batching (multi-token words included)."""
    from nanopatho.data import to_float

    model, tok = tiny_vlm()
    model.eval()
    images = torch.from_numpy(perception.tumour_draws(200, 5, 32)[0]).permute(0, 3, 1, 2).contiguous()  # (5, 3, 32, 32)
    prompt, words = "Tumour findings: pleomorphism is", ("mild", "moderate", "marked", "absent or present")
    got = readout.word_logprobs(model, tok, images, prompt, words, batch_size=2)  # (5, 4)
    assert got.shape == (5, 4)
    head = [tok.bos_id] + [tok.image_id] * model.n_image_tokens + tok.encode(prompt)
    for i in range(5):
        for j, w in enumerate(words):
            tail = tok.encode(f"{prompt} {w}")[len(tok.encode(prompt)):]
            ids = torch.tensor([head + tail])  # (1, T)
            with torch.no_grad():
                logits, _ = model(ids, to_float(images[i:i + 1]))  # (1, T, V)
            logp = F.log_softmax(logits[0, len(head) - 1:-1].float(), -1)  # (len(tail), V)
            want = logp.gather(-1, torch.tensor(tail)[:, None]).sum()
            assert got[i, j].item() == pytest.approx(want.item(), abs=1e-4)
    assert len(tok.encode(f"{prompt} absent or present")) - len(tok.encode(prompt)) > 1  # a multi-token word was scored


def test_cli_writes_every_finding(tmp_path, capsys):
    from nanopatho.checkpoint import save_model

    model, tok = tiny_vlm()
    save_model(str(tmp_path / "vlm"), model, tok)
    out = tmp_path / "readout.json"
    readout.main(["--ckpt", str(tmp_path / "vlm"), "--n", "7", "--batch_size", "3", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["tiles"] == 7 and set(r["readout"]) == set(readout.FINDINGS)
    for name, s in r["readout"].items():
        assert s["n"] == 7 and 0 <= s["accuracy"] <= 1 and sum(s["said"].values()) == pytest.approx(1.0)
        assert s["chance"] == pytest.approx(1 / len(readout.FINDINGS[name][1]))
    assert "mitoses" in capsys.readouterr().out


def test_cli_refuses_a_clip_checkpoint(tmp_path):
    from nanopatho.checkpoint import CheckpointError, save_model
    from nanopatho.clip import CLIPConfig, PathoCLIP, TextConfig
    from nanopatho.vit import ViTConfig

    _, tok = tiny_vlm()
    clip = PathoCLIP(CLIPConfig(vision=ViTConfig(image_size=32, patch_size=8, n_layer=1, n_head=2, n_embd=32),
                                text=TextConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32, max_len=32),
                                embed_dim=16))
    save_model(str(tmp_path / "clip"), clip, tok)
    with pytest.raises(CheckpointError, match="vlm"):
        readout.main(["--ckpt", str(tmp_path / "clip"), "--n", "2"])
