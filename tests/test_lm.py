"""Decoder LM: RoPE, RMSNorm, GQA, padding, loss, KV-cache generation and sampling.

    python -m pytest -q tests/test_lm.py
"""

import math

import pytest
import torch

from nanopatho.lm import (LM, KVCache, LMConfig, RMSNorm, apply_rope, filter_top_k_top_p, lm_loss, padding_attn_mask,
                          positions_from_mask, rope_cos_sin, sample_next)

V = 64


def tiny_lm(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=64, max_seq_len=64)
    cfg.update(kw)
    return LM(LMConfig(**cfg)).eval()


def left_pad(prompts, pad_id=0):
    """list of id lists -> (ids (B, T), mask (B, T)) padded on the left."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p)
        mask[i, T - len(p):] = 1
    return ids, mask


PROMPTS = [[5, 9, 3, 17, 22], [40, 2], [8, 8, 1, 30, 12, 7, 50]]


# ----------------------------------------------------------------------------- building blocks

def test_rmsnorm_hand_case():
    norm = RMSNorm(2, eps=0.0)
    y = norm(torch.tensor([[3.0, 4.0]]))
    rms = math.sqrt((9 + 16) / 2)
    assert torch.allclose(y, torch.tensor([[3 / rms, 4 / rms]]))


def test_rope_hand_case_and_properties():
    # hd = 2: one pair (x1, x2) rotated by angle = pos * base^0 = pos
    cos, sin = rope_cos_sin(torch.tensor([[1]]), head_dim=2, base=10000.0)
    y = apply_rope(torch.tensor([1.0, 0.0]).view(1, 1, 1, 2), cos, sin).flatten()
    assert torch.allclose(y, torch.tensor([math.cos(1), math.sin(1)]))
    # norms preserved; q_m . k_n depends only on m - n
    torch.manual_seed(0)
    hd = 16
    q, k = torch.randn(1, 1, 1, hd), torch.randn(1, 1, 1, hd)

    def rot(x, pos):
        c, s = rope_cos_sin(torch.tensor([[pos]]), hd, 10000.0)
        return apply_rope(x, c, s)

    assert torch.allclose(rot(q, 37).norm(), q.norm(), atol=1e-5)
    d1 = (rot(q, 5) * rot(k, 2)).sum()
    d2 = (rot(q, 23) * rot(k, 20)).sum()
    d3 = (rot(q, 15) * rot(k, 2)).sum()
    assert torch.allclose(d1, d2, atol=1e-5)
    assert (d1 - d3).abs() > 0.1


def test_gqa_matches_repeat_kv_reference():
    lm = tiny_lm(n_head=4, n_kv_head=2)
    attn = lm.layers[0].self_attn
    B, T, C, hd = 2, 6, 32, 8
    x = torch.randn(B, T, C)
    cos, sin = rope_cos_sin(torch.arange(T).expand(B, T), hd, 10000.0)
    got = attn(x, cos, sin)
    q = apply_rope(attn.q_proj(x).view(B, T, 4, hd).transpose(1, 2), cos, sin)
    k = apply_rope(attn.k_proj(x).view(B, T, 2, hd).transpose(1, 2), cos, sin)
    v = attn.v_proj(x).view(B, T, 2, hd).transpose(1, 2)
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)  # query head h uses kv head h // 2
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    ref = attn.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C))
    assert torch.allclose(got, ref, atol=1e-5)


def test_tied_embeddings_and_qwen2_names():
    lm = tiny_lm()
    assert lm.lm_head.weight is lm.embed_tokens.weight
    names = set(lm.state_dict())
    for n in ["embed_tokens.weight", "layers.0.self_attn.q_proj.bias", "layers.0.self_attn.o_proj.weight",
              "layers.1.mlp.gate_proj.weight", "layers.1.input_layernorm.weight",
              "layers.1.post_attention_layernorm.weight", "norm.weight"]:
        assert n in names, n
    assert "layers.0.self_attn.o_proj.bias" not in names
    assert tiny_lm(tie_embeddings=False).lm_head.weight is not tiny_lm().embed_tokens.weight


# ----------------------------------------------------------------------------- forward

def test_causality():
    lm = tiny_lm()
    ids = torch.randint(0, V, (2, 10))
    logits, _ = lm(ids)
    changed = ids.clone()
    changed[:, 6] = (changed[:, 6] + 1) % V
    logits2, _ = lm(changed)
    assert torch.equal(logits[:, :6], logits2[:, :6])
    assert not torch.allclose(logits[:, 6:], logits2[:, 6:])
    # the same through the padding-mask path
    mask = torch.ones_like(ids)
    l3, _ = lm(ids, attention_mask=mask)
    l4, _ = lm(changed, attention_mask=mask)
    assert torch.allclose(l3[:, :6], l4[:, :6], atol=0) and torch.allclose(l3, logits, atol=1e-5)


def test_padding_mask_hand_case():
    m = padding_attn_mask(torch.tensor([[0, 1, 1]]))[0, 0].int().tolist()
    # query 0 is a pad: it sees only itself; queries 1, 2 see real keys up to themselves
    assert m == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    assert positions_from_mask(torch.tensor([[0, 0, 1, 1, 1], [1, 1, 0, 1, 0]])).tolist() == [[0, 0, 0, 1, 2], [0, 1, 1, 2, 2]]


def test_packed_mask_hand_case():
    # row: sequence 1 (2 tokens), sequence 2 (2 tokens), a pad
    m = padding_attn_mask(torch.tensor([[1, 1, 2, 2, 0]]))[0, 0].int().tolist()
    assert m == [[1, 0, 0, 0, 0],
                 [1, 1, 0, 0, 0],
                 [0, 0, 1, 0, 0],   # sequence 2 starts afresh: it never sees sequence 1
                 [0, 0, 1, 1, 0],
                 [1, 1, 1, 1, 1]]   # the pad sees every real key before it and itself, as with a 0/1 mask
    assert positions_from_mask(torch.tensor([[1, 1, 1, 2, 2, 0], [0, 1, 1, 2, 3, 3]])).tolist() == \
        [[0, 1, 2, 0, 1, 4], [0, 0, 1, 0, 0, 1]]


def test_packed_sequences_give_each_sequence_alone():
    """Sequences end to end in one row, attention_mask = 1, 2, 3 for the first, second, third: each one's
    logits are those it has alone; so are the logits of a single-sequence row beside it."""
    lm = tiny_lm()
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, V, (n,), generator=g).tolist() for n in (7, 4, 9, 11)]
    ids = torch.tensor([seqs[0] + seqs[1] + seqs[2], seqs[3] + [0] * 9])  # (2, 20)
    mask = torch.tensor([[1] * 7 + [2] * 4 + [3] * 9, [1] * 11 + [0] * 9])
    logits, _ = lm(ids, attention_mask=mask)  # (2, 20, V)
    starts = [(0, 0), (0, 7), (0, 11), (1, 0)]
    for s, (row, start) in zip(seqs, starts):
        alone, _ = lm(torch.tensor([s]))
        torch.testing.assert_close(logits[row, start:start + len(s)], alone[0], atol=1e-5, rtol=1e-5)
    # and not what a plain 0/1 mask over the same row gives (sequence 2 would see sequence 1)
    joined, _ = lm(ids, attention_mask=(mask > 0).long())
    assert not torch.allclose(joined[0, 7:11], logits[0, 7:11], atol=1e-3)


def test_padding_either_side_matches_unpadded():
    lm = tiny_lm()
    p = PROMPTS[0]
    alone, _ = lm(torch.tensor([p]))
    ids = torch.tensor([[0, 0] + p, p + [0, 0]])
    mask = torch.tensor([[0, 0] + [1] * 5, [1] * 5 + [0, 0]])
    logits, _ = lm(ids, attention_mask=mask)
    assert torch.allclose(logits[0, 2:], alone[0], atol=1e-5)
    assert torch.allclose(logits[1, :5], alone[0], atol=1e-5)
    # a fully padded row stays finite (each query always sees itself)
    logits, _ = lm(ids, attention_mask=torch.zeros_like(mask))
    assert torch.isfinite(logits).all()


def test_loss_ignores_negative_targets_and_masked_tokens():
    lm = tiny_lm()
    ids = torch.randint(0, V, (2, 5))
    targets = torch.randint(0, V, (2, 5))
    targets[0, 1] = -1
    loss_mask = torch.ones(2, 5)
    loss_mask[1, 3:] = 0
    logits, loss = lm(ids, targets, loss_mask=loss_mask)
    _, loss_sum = lm(ids, targets, loss_mask=loss_mask, reduction="sum")
    nll = -logits.log_softmax(-1)
    kept = [(0, 0), (0, 2), (0, 3), (0, 4), (1, 0), (1, 1), (1, 2)]
    ref = sum(nll[b, t, targets[b, t]] for b, t in kept)
    assert torch.allclose(loss_sum, ref, atol=1e-5)
    assert torch.allclose(loss, ref / len(kept), atol=1e-6)
    assert torch.allclose(lm_loss(logits, targets, loss_mask), loss)
    loss.backward()  # differentiable


def test_inputs_embeds_equals_ids():
    lm = tiny_lm()
    ids = torch.randint(0, V, (2, 7))
    a, _ = lm(ids)
    b, _ = lm(inputs_embeds=lm.embed_tokens(ids))
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- KV cache and generation

def test_kv_cache_logits_match_full_forward():
    lm = tiny_lm()
    ids, mask = left_pad(PROMPTS)
    full, _ = lm(ids, attention_mask=mask)  # (B, T, V)
    T, split = ids.shape[1], 3
    cache = KVCache(lm.config.n_layer, T)
    pos = positions_from_mask(mask)
    h = lm.hidden_states(lm.embed_tokens(ids[:, :split]), pos[:, :split], padding_attn_mask(mask[:, :split]), cache, 0)
    steps = [lm.lm_head(h)]
    for t in range(split, T):
        key_mask = mask.bool()[:, None, None, :t + 1].clone()
        key_mask[..., t] = True
        h = lm.hidden_states(lm.embed_tokens(ids[:, t:t + 1]), pos[:, t:t + 1], key_mask, cache, t)
        steps.append(lm.lm_head(h))
    cached = torch.cat(steps, dim=1)
    real = mask.bool()
    assert torch.allclose(cached[real], full[real], atol=1e-5)


def full_recompute_greedy(lm, ids, mask, n):
    """Reference: re-run the whole sequence every step, no cache."""
    out, logps = [], []
    for _ in range(n):
        logits, _ = lm(ids, attention_mask=mask)
        last = logits[:, -1]
        tok = last.argmax(-1)
        logps.append(last.log_softmax(-1).gather(-1, tok[:, None]).squeeze(-1))
        out.append(tok)
        ids = torch.cat([ids, tok[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(out, 1), torch.stack(logps, 1)


def test_kv_cache_greedy_equals_full_recompute():
    lm = tiny_lm()
    ids, mask = left_pad(PROMPTS)
    out = lm.generate(ids, mask, max_new_tokens=12, temperature=0)
    ref_ids, ref_logp = full_recompute_greedy(lm, ids, mask, 12)
    assert torch.equal(out.ids, ref_ids)
    assert out.mask.all()
    assert torch.allclose(out.logprobs, ref_logp, atol=1e-5)


def test_dropping_finished_rows_samples_what_a_full_recompute_samples(monkeypatch):
    """generate drops rows once a quarter of them have stopped; with the same uniforms every step, the tokens,
    masks and log-probs are those of re-running every row's whole sequence with no cache and no dropping."""
    drops = []
    keep_rows = KVCache.keep_rows
    monkeypatch.setattr(KVCache, "keep_rows", lambda self, rows: (drops.append(len(rows)), keep_rows(self, rows)))
    lm = tiny_lm()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, V, (int(n),), generator=g).tolist() for n in torch.randint(2, 9, (12,), generator=g)]
    ids, mask = left_pad(prompts)
    stop, n, temp = tuple(range(56, 64)), 24, 0.9
    out = lm.generate(ids, mask, max_new_tokens=n, temperature=temp, stop_ids=stop, pad_id=-1,
                      generator=torch.Generator().manual_seed(0))
    assert len(drops) >= 2 and drops == sorted(drops, reverse=True)  # it did drop rows, more than once
    ref = torch.Generator().manual_seed(0)
    done = torch.zeros(len(prompts), dtype=torch.bool)
    for t in range(out.ids.shape[1]):  # reference: full recompute, one uniform per row per step (sample_next's draw)
        logits, _ = lm(ids, attention_mask=mask)
        tok, logp = sample_next(logits[:, -1], temp, generator=ref)  # (B,), (B,)
        assert torch.equal(out.mask[:, t], ~done)
        assert torch.equal(out.ids[~done, t], tok[~done]) and (out.ids[done, t] == -1).all()
        assert torch.allclose(out.logprobs[~done, t], logp[~done], atol=1e-5)
        done = done | torch.isin(tok, torch.tensor(stop))
        ids, mask = torch.cat([ids, tok[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    assert done.all() or out.ids.shape[1] == n


def test_left_padded_row_equals_prompt_alone():
    lm = tiny_lm()
    ids, mask = left_pad(PROMPTS)
    batch = lm.generate(ids, mask, max_new_tokens=8, temperature=0)
    for i, p in enumerate(PROMPTS):
        alone = lm.generate(torch.tensor([p]), max_new_tokens=8, temperature=0)
        assert torch.equal(batch.ids[i], alone.ids[0])
        assert torch.allclose(batch.logprobs[i], alone.logprobs[0], atol=1e-5)
    right_ids, right_mask = ids.flip(1), mask.flip(1)
    with pytest.raises(AssertionError, match="left-padded"):
        lm.generate(right_ids, right_mask, max_new_tokens=2)


def test_generate_logprobs_match_separate_forward():
    lm = tiny_lm()
    ids, mask = left_pad(PROMPTS)
    T, n, temp = ids.shape[1], 10, 0.7
    g = torch.Generator().manual_seed(1)
    out = lm.generate(ids, mask, max_new_tokens=n, temperature=temp, generator=g)
    seq = torch.cat([ids, out.ids], 1)
    seq_mask = torch.cat([mask, out.mask.long()], 1)
    logits, _ = lm(seq, attention_mask=seq_mask)
    logp = (logits[:, T - 1:-1] / temp).log_softmax(-1).gather(-1, out.ids[..., None]).squeeze(-1)  # (B, n)
    assert torch.allclose(out.logprobs[out.mask], logp[out.mask], atol=1e-5)
    greedy = lm.generate(ids, mask, max_new_tokens=n, temperature=0)
    assert not torch.equal(out.ids, greedy.ids)  # it did sample


def test_top_k_top_p_restrict_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda **kw: torch.isfinite(filter_top_k_top_p(logits, **kw))[0].tolist()  # noqa: E731
    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_p=0.7) == [True, True, False, False]  # 0.5 < 0.7, 0.5+0.3 reaches it
    assert kept(top_p=0.85) == [True, True, True, False]
    assert kept(top_p=0.4) == [True, False, False, False]
    assert kept(top_k=3, top_p=0.6) == [True, True, False, False]
    exact = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))  # binary fractions: no rounding at the boundary
    assert torch.isfinite(filter_top_k_top_p(exact, top_p=0.5))[0].tolist() == [True, False, False]  # 0.5 reaches 0.5
    # in generation: top_k=1 and a tiny top_p both reduce sampling to greedy
    lm = tiny_lm()
    ids, mask = left_pad(PROMPTS)
    greedy = lm.generate(ids, mask, max_new_tokens=6, temperature=0)
    for kw in (dict(top_k=1), dict(top_p=1e-4)):
        out = lm.generate(ids, mask, max_new_tokens=6, temperature=1.5, generator=torch.Generator().manual_seed(0), **kw)
        assert torch.equal(out.ids, greedy.ids)
    # samples stay inside the top-3 of the model's own next-token distribution
    logits, _ = lm(ids, attention_mask=mask)
    top3 = logits[:, -1].topk(3).indices
    for seed in range(5):
        out = lm.generate(ids, mask, max_new_tokens=1, temperature=2.0, top_k=3, generator=torch.Generator().manual_seed(seed))
        assert (out.ids[:, :1] == top3).any(-1).all()


def test_sampling_frequencies_follow_the_distribution():
    # inverse-CDF sampling: 40,000 rows of one distribution with a zero-probability token and a tiny one
    probs = torch.tensor([0.5, 0.0, 0.25, 0.2499, 0.0001])
    logits = probs.log().expand(40000, 5).contiguous()  # log 0 = -inf: never drawable
    tok, logp = sample_next(logits, temperature=1.0, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(tok, minlength=5).double() / len(tok)
    sigma = (probs.double() * (1 - probs.double()) / len(tok)).sqrt()
    assert freq[1] == 0 and ((freq - probs.double()).abs() <= 4 * sigma + 1e-12).all(), freq.tolist()
    assert torch.allclose(logp, probs.log()[tok])  # log p of the drawn token
    # a greedy-peaked row and a uniform row at temperature 2: tokens stay in the vocabulary
    tok, _ = sample_next(torch.tensor([[50.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), temperature=2.0,
                         generator=torch.Generator().manual_seed(1))
    assert tok[0] == 0 and 0 <= tok[1] < 3


def test_suppressed_ids_are_never_drawn_but_stay_in_the_logprob():
    """suppress only restricts the draw, as top-k / top-p: the log-prob is the full softmax's (RL's pi_old)."""
    logits = torch.tensor([[3.0, 0.0, 1.0, 0.5]]).expand(200, 4)  # token 0 the likeliest
    for temperature in (0.0, 0.7):
        tok, logp = sample_next(logits, temperature, generator=torch.Generator().manual_seed(0),
                                suppress=torch.tensor([0]))
        full = (logits / (temperature or 1.0)).log_softmax(-1)  # (200, 4)
        assert (tok != 0).all() and torch.allclose(logp, full.gather(-1, tok[:, None])[:, 0])


def test_stop_tokens_end_rows():
    lm = tiny_lm()
    ids, mask = left_pad(PROMPTS)
    greedy = lm.generate(ids, mask, max_new_tokens=8, temperature=0)
    stop = int(greedy.ids[0, 2])
    first = (greedy.ids[0] == stop).nonzero()[0, 0].item()
    out = lm.generate(ids, mask, max_new_tokens=8, temperature=0, stop_ids=(stop,), pad_id=-7)
    assert out.mask[0, :first + 1].all() and not out.mask[0, first + 1:].any()
    assert out.ids[0, first] == stop and (out.ids[0, first + 1:] == -7).all()
    assert (out.logprobs[0, first + 1:] == 0).all()
    assert torch.equal(out.ids[0, :first + 1], greedy.ids[0, :first + 1])
    # every row stops at once -> the loop exits after one step
    out = lm.generate(ids, mask, max_new_tokens=8, temperature=0, stop_ids=tuple(range(V)))
    assert out.ids.shape == (3, 1) and out.mask.all()
