"""Parity with Hugging Face transformers' Qwen2ForCausalLM: same config + copied weights => same logits,
loss, gradients and greedy generations. Skipped when transformers is not installed (a bench-only dependency).

    python -m pytest -q tests/test_hf_parity.py
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from bench.peers import qwen2_peer, to_qwen2_state_dict  # noqa: E402
from nanopatho.lm import LM, LMConfig  # noqa: E402

V = 97


def pair(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=48, max_seq_len=64,
               rope_base=5000.0, norm_eps=1e-5)
    cfg.update(kw)
    lm = LM(LMConfig(**cfg))
    for p in lm.parameters():  # non-zero biases and norm weights, so a dropped or misnamed tensor shows
        p.data.add_(0.05 * torch.randn_like(p))
    return lm, qwen2_peer(lm)


def test_state_dict_names_map_one_to_one():
    lm, hf = pair()
    mapped = to_qwen2_state_dict(lm.state_dict())
    assert set(mapped) == set(hf.state_dict())
    assert "model.layers.1.self_attn.q_proj.bias" in mapped and "lm_head.weight" in mapped


@pytest.mark.parametrize("tie", [True, False])
def test_logits_and_loss_match(tie):
    lm, hf = pair(tie_embeddings=tie)
    torch.manual_seed(1)
    ids = torch.randint(0, V, (3, 20))  # (B, T)
    targets = torch.randint(0, V, (3, 20))
    logits, loss = lm(ids, targets)
    out = hf(input_ids=ids, labels=targets, shift_labels=targets)  # shift_labels: targets already aligned
    assert (logits - out.logits).abs().max() < 1e-4
    assert abs(loss.item() - out.loss.item()) < 1e-5


def test_left_padded_logits_match_on_real_tokens():
    lm, hf = pair()
    torch.manual_seed(2)
    ids = torch.randint(1, V, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :5] = 0  # row 1 left-padded by 5
    logits, _ = lm(ids, attention_mask=mask)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    ref = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert (logits[real] - ref[real]).abs().max() < 1e-4


def test_gradients_match():
    lm, hf = pair()
    ids = torch.randint(0, V, (2, 16))
    lm(ids, ids)[1].backward()
    hf(input_ids=ids, labels=ids, shift_labels=ids).loss.backward()
    hf_grads = {k: p.grad for k, p in hf.named_parameters()}
    for name, p in lm.named_parameters():
        assert torch.allclose(p.grad, hf_grads[to_qwen2_state_dict({name: 0}).popitem()[0]], atol=1e-5), name


def test_greedy_generation_matches_hf_generate():
    lm, hf = pair()
    lm.eval(), hf.eval()
    torch.manual_seed(3)
    ids = torch.randint(1, V, (4, 9))
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[1, :3] = 0
    mask[3, :6] = 0
    ids = ids * mask  # pad id 0 on the left
    ours = lm.generate(ids, mask, max_new_tokens=12, temperature=0.0).ids
    theirs = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12, min_new_tokens=12,
                         eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:]
    assert torch.equal(ours, theirs)
