"""Importing released LMs (nanopatho/hf_import.py) against transformers: tiny random Qwen2 / Llama models
saved with save_pretrained (nothing downloaded) give the same logits, loss and greedy generations in
nanopatho; the tokenizer merge appends rows set to the mean; every refused feature and every bad file is
a one-line error naming the file and the key.

    python -m pytest -q tests/test_hf_import_lm.py
"""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from hf_util import QWEN_SPECIALS, from_dir, save_llama, save_qwen2  # noqa: E402
from nanopatho import checkpoint, hf_import  # noqa: E402
from nanopatho.checkpoint import CheckpointError  # noqa: E402
from nanopatho.training import run  # noqa: E402


def batch(vocab, seed=0, B=3, T=14):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g), torch.randint(0, vocab, (B, T), generator=g)


def assert_same_lm(lm, hf, vocab):
    ids, targets = batch(vocab)
    logits, loss = lm(ids, targets)
    ref = hf(input_ids=ids, labels=targets, shift_labels=targets)  # shift_labels: targets already aligned
    assert (logits - ref.logits).abs().max() < 1e-5
    assert abs(loss.item() - ref.loss.item()) < 1e-5
    # left padding, positions from the mask, as generation and the VLM use them
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :9] = 0
    logits, _ = lm(ids, attention_mask=mask)
    ref = hf(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
    assert (logits[mask.bool()] - ref[mask.bool()]).abs().max() < 1e-5
    ids = ids * mask
    ours = lm.generate(ids, mask, max_new_tokens=10, temperature=0.0).ids
    theirs = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=10, min_new_tokens=10,
                         eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:]
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("tie", [True, False])
def test_qwen2_logits_loss_and_generation_match(tmp_path, tie):
    d = save_qwen2(tmp_path, tie=tie)
    lm, tok = hf_import.load_lm(d)
    cfg = lm.config
    assert (cfg.qkv_bias, cfg.tie_embeddings, cfg.rope_base, cfg.max_seq_len, cfg.n_kv_head) == (True, tie, 5000.0, 96, 2)
    assert (lm.lm_head.weight is lm.embed_tokens.weight) == tie
    assert cfg.vocab_size == 320  # every nanopatho special is in the tokenizer: nothing appended
    assert tok.im_start_id == tok.token_to_id("<|im_start|>") and tok.image_id == tok.token_to_id("<|image_pad|>")
    assert_same_lm(lm, from_dir(d, "qwen2"), 320)


def test_llama_sharded_with_appended_tokens_matches(tmp_path, capsys):
    """SmolLM2-shaped (no bias, untied, GQA 4:1), saved in several shards + index; the tokenizer lacks
    the image and reasoning specials, so they take the padded rows 300..304, set to the mean rows."""
    d = save_llama(tmp_path, max_shard_size="20KB")
    assert os.path.exists(os.path.join(d, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(d) if f.endswith(".safetensors")]) > 1
    lm, tok = hf_import.load_lm(d)
    out = capsys.readouterr().out
    assert "im_start -> '<|im_start|>'" in out and "added '<|image|>' (300)" in out and "'</answer>' (304)" in out
    assert not lm.config.qkv_bias and lm.config.vocab_size == 320
    hf = from_dir(d, "llama")
    with torch.no_grad():  # the same merge by hand on the transformers model: mean of the 300 trained rows
        for w in (hf.model.embed_tokens.weight, hf.lm_head.weight):
            w[300:305] = w[:300].mean(dim=0)
    assert_same_lm(lm, hf, 300)


def test_merge_grows_embedding_rows_to_their_mean(tmp_path):
    """Tokenizer of exactly vocab_size tokens, without the reasoning markers: the embedding and the untied
    lm_head grow by 4 rows, each the mean of the old rows; old ids and the text encoding are unchanged,
    and the logits equal transformers' after resize_token_embeddings + the same rows."""
    probe = save_qwen2(tmp_path, name="probe", specials=QWEN_SPECIALS)
    n = len(json.load(open(os.path.join(probe, "tokenizer.json")))["model"]["vocab"])
    d = save_qwen2(tmp_path, tie=False, vocab_size=n, specials=QWEN_SPECIALS)
    lm, tok = hf_import.load_lm(d)
    hf = from_dir(d, "qwen2")
    assert lm.config.vocab_size == n + 4 == tok.vocab_size
    assert [tok.think_id, tok.think_end_id, tok.answer_id, tok.answer_end_id] == list(range(n, n + 4))
    for ours, theirs in ((lm.embed_tokens.weight, hf.model.embed_tokens.weight), (lm.lm_head.weight, hf.lm_head.weight)):
        assert torch.equal(ours[:n], theirs)
        mean = theirs.sum(0) / n
        assert torch.allclose(ours[n:], mean.expand(4, -1), atol=1e-7)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(d, "tokenizer.json"))
    fast.add_special_tokens({"additional_special_tokens": ["<think>", "</think>", "<answer>", "</answer>"]})
    text = "<|im_start|>user\nDense sheets of lymphocytes.<think>why</think><answer>B</answer><|im_end|>"
    assert tok.encode(text) == fast.encode(text, add_special_tokens=False)
    hf.resize_token_embeddings(n + 4, mean_resizing=False)
    with torch.no_grad():
        hf.model.embed_tokens.weight[n:] = lm.embed_tokens.weight[n:]
        hf.lm_head.weight[n:] = lm.lm_head.weight[n:]
    assert_same_lm(lm, hf, n + 4)


def test_bf16_checkpoint_loads_in_fp32(tmp_path):
    d = save_qwen2(tmp_path)
    hf = from_dir(d, "qwen2").to(torch.bfloat16)
    hf.save_pretrained(d)
    lm, _ = hf_import.load_lm(d)
    assert lm.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(lm.layers[1].mlp.up_proj.weight, hf.model.layers[1].mlp.up_proj.weight.float())
    assert_same_lm(lm, transformers.Qwen2ForCausalLM.from_pretrained(d, dtype=torch.float32).eval(), 320)


def test_convert_cli_writes_a_nanopatho_checkpoint(tmp_path):
    d = save_qwen2(tmp_path)
    hf_import.main([d, "--out", str(tmp_path / "ck")])
    lm, config, tok = checkpoint.load(str(tmp_path / "ck"), expect="lm")
    assert config["run"]["source"] == "qwen2" and not hf_import.is_released(str(tmp_path / "ck"))
    assert_same_lm(lm, from_dir(d, "qwen2"), 320)


# -----------------------------------------------------------------------------
# refused architectures and bad files: one line, naming the file and the key


def edit_config(d, **changes):
    path = os.path.join(d, "config.json")
    c = json.load(open(path))
    c.update(changes)
    json.dump(c, open(path, "w"))


REFUSED = [
    (dict(model_type="qwen3"), r"model_type 'qwen3' cannot be imported \(per-head q/k RMSNorm"),
    (dict(model_type="mistral"), r"model_type 'mistral' cannot be imported \(sliding-window"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), r"rope_scaling type 'yarn'"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), r"rope_scaling type 'linear'"),
    (dict(use_sliding_window=True, sliding_window=16), r"sliding-window attention"),
    (dict(hidden_act="gelu"), r"hidden_act 'gelu'"),
    (dict(head_dim=16), r"head_dim 16 != hidden_size / heads"),
    (dict(quantization_config={"quant_method": "gptq"}), r"quantization_config"),
]


@pytest.mark.parametrize("changes,message", REFUSED)
def test_unsupported_features_are_refused(tmp_path, changes, message):
    d = save_qwen2(tmp_path)
    edit_config(d, **changes)
    with pytest.raises(CheckpointError, match=r"config\.json: " + message) as err:
        hf_import.load_lm(d)
    assert "\n" not in str(err.value)


def test_llama_attention_bias_is_refused(tmp_path):
    d = save_llama(tmp_path)
    edit_config(d, attention_bias=True)
    with pytest.raises(CheckpointError, match=r"config\.json: attention_bias: true"):
        hf_import.load_lm(d)


def rewrite_weights(d, fn):
    path = os.path.join(d, "model.safetensors")
    sd = load_file(path)
    fn(sd)
    save_file(sd, path)


BAD_TENSORS = [
    (lambda sd: sd.__setitem__("model.layers.0.mlp.up_proj.weight", torch.zeros(47, 32)),
     r"model\.layers\.0\.mlp\.up_proj\.weight has shape \(47, 32\), but its config\.json gives \(48, 32\)"),
    (lambda sd: sd["model.layers.1.self_attn.k_proj.bias"].__setitem__(3, float("nan")),
     r"model\.safetensors: tensor 'model\.layers\.1\.self_attn\.k_proj\.bias' has non-finite values"),
    (lambda sd: sd.__setitem__("model.norm.weight", torch.ones(32, dtype=torch.int32)),
     r"tensor 'model\.norm\.weight' has dtype torch\.int32, expected a float type"),
    (lambda sd: sd.pop("model.layers.1.post_attention_layernorm.weight"),
     r"no tensor 'model\.layers\.1\.post_attention_layernorm\.weight'"),
    (lambda sd: sd.__setitem__("model.layers.0.self_attn.q_norm.weight", torch.ones(8)),
     r"tensor 'model\.layers\.0\.self_attn\.q_norm\.weight' has no place in nanopatho's model"),
]


@pytest.mark.parametrize("corrupt,message", BAD_TENSORS)
def test_bad_tensors_name_the_first_bad_key(tmp_path, corrupt, message):
    d = save_qwen2(tmp_path)
    rewrite_weights(d, corrupt)
    with pytest.raises(CheckpointError, match=message):
        hf_import.load_lm(d)


def test_pickled_weights_are_refused_with_a_conversion_command(tmp_path, capsys):
    d = save_qwen2(tmp_path)
    torch.save(load_file(os.path.join(d, "model.safetensors")), os.path.join(d, "pytorch_model.bin"))
    os.remove(os.path.join(d, "model.safetensors"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as ex:  # the CLI's wrapper: exit status 2 and one line on stderr
        run(lambda argv: hf_import.main([d, "--out", str(tmp_path / "ck")]))
    err = capsys.readouterr().err.strip()
    assert ex.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"error: {d}/pytorch_model.bin: pickled weights are never loaded")
    assert "weights_only=True" in err and f"{d}/model.safetensors" in err


def test_missing_shard_and_missing_tokenizer_are_named(tmp_path):
    d = save_llama(tmp_path, max_shard_size="20KB")
    shard = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))[-1]
    os.remove(os.path.join(d, shard))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors\.index\.json: shard '{shard}' is missing"):
        hf_import.load_lm(d)
    d = save_qwen2(tmp_path)
    os.remove(os.path.join(d, "tokenizer.json"))
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: missing; the model's own tokenizer\.json is needed"):
        hf_import.load_lm(d)


def test_nanopatho_lm_checkpoint_still_loads_through_the_same_entry_point(tmp_path):
    d = save_qwen2(tmp_path)
    lm, tok = hf_import.load_lm(d)
    checkpoint.save_model(str(tmp_path / "ours"), lm, tok)
    again, tok2 = hf_import.load_lm(str(tmp_path / "ours"))
    assert all(torch.equal(a, b) for a, b in zip(lm.state_dict().values(), again.state_dict().values()))
    assert tok2.encode("mucin pools") == tok.encode("mucin pools")
    with pytest.raises(CheckpointError, match="holds a released qwen2 lm, but a 'clip' model is needed"):
        checkpoint.load(d, expect="clip")
