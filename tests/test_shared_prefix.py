"""One image and one prompt per GRPO group (issue 18): the shared-prefix forward, the shared
prefill in generation, and train_rl's score / update on both paths.

    python -m pytest -q tests/test_shared_prefix.py

Every check compares the shared path with the per-row path it replaces (each row running its
own prompt + completion), on batches shaped like train_rl's: left-padded prompts of unequal
lengths, right-padded completions of unequal lengths, and groups as DAPO's dynamic sampling
leaves them (rounds of different prompt widths concatenated, whole groups dropped).
"""

import types

import pytest
import torch

import train_rl
from nanopatho import rl
from nanopatho.kernels import fused_policy_loss
from nanopatho.lm import LM, LMConfig
from nanopatho.shared_prefix import continuation_attn_mask, continuation_logits
from nanopatho.tokenizer import Tokenizer
from nanopatho.vit import ViTConfig
from nanopatho.vlm import VLM, VLMConfig

V, IMG, G = 64, 3, 3  # vocabulary, image placeholder id, group size


def tiny_vlm(seed=0):
    torch.manual_seed(seed)
    lm = LMConfig(vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=64, max_seq_len=64)
    vision = ViTConfig(image_size=32, patch_size=8, n_layer=1, n_head=2, n_embd=32)
    return VLM(VLMConfig(vision=vision, lm=lm, image_token_id=IMG))


def rollout_round(model, n_prompts, width, lengths_seed):
    """One round as train_rl.rollout returns it: P prompts of unequal lengths (left-padded to `width`),
    each with its image, repeated G times; G completions each of unequal lengths (right-padded)."""
    g = torch.Generator().manual_seed(lengths_seed)
    n_img, N = model.n_image_tokens, 7
    ids = torch.zeros(n_prompts, width, dtype=torch.long)
    mask = torch.zeros(n_prompts, width, dtype=torch.long)
    for p in range(n_prompts):
        n = int(torch.randint(n_img + 2, width + 1, (1,), generator=g))
        ids[p, width - n:] = torch.cat([torch.tensor([1] + [IMG] * n_img), torch.randint(5, V, (n - n_img - 1,), generator=g)])
        mask[p, width - n:] = 1
    B = n_prompts * G
    lengths = torch.randint(1, N + 1, (B,), generator=g)
    c_mask = torch.arange(N)[None] < lengths[:, None]  # (B, N) bool
    reward = torch.randint(0, 2, (B,), generator=g).float()
    return dict(prompt_ids=ids.repeat_interleave(G, 0), prompt_mask=mask.repeat_interleave(G, 0),
                pixels=torch.randn(n_prompts, 3, 32, 32, generator=g).repeat_interleave(G, 0),
                ids=torch.randint(5, V, (B, N), generator=g) * c_mask, mask=c_mask, reward=reward)


def dynamic_sampling_batch(model):
    """Two rounds of different prompt widths; groups whose rewards are all equal dropped (DAPO):
    an uneven number of groups, concatenated exactly as train_rl.collect does."""
    parts = []
    for round_seed, (n_prompts, width) in enumerate([(4, 11), (3, 15)]):
        batch = rollout_round(model, n_prompts, width, round_seed)
        batch["reward"][:G] = 1.0  # the first group of each round is uninformative
        keep = rl.informative_groups(batch["reward"], G)
        parts.append(train_rl.select_groups(batch, keep, G))
    batch = train_rl.cat_rollouts(parts)
    assert batch["ids"].shape[0] % G == 0 and batch["ids"].shape[0] // G not in (0, 7)  # some groups were dropped
    return batch


# -----------------------------------------------------------------------------
# the attention mask and the LM-level forward


def test_continuation_attn_mask_hand_case():
    prefix_mask = torch.tensor([[0, 1, 1]])  # one left pad
    mask = torch.tensor([[1, 1, 0]])  # a continuation of 2 real tokens, then a pad
    got = continuation_attn_mask(prefix_mask, mask)[0, 0].int().tolist()
    assert got == [[0, 1, 1, 1, 0, 0],   # continuation token 0: real prefix keys and itself
                   [0, 1, 1, 1, 1, 0],   # token 1: also token 0
                   [0, 1, 1, 1, 1, 1]]   # the pad query: real keys before it, and itself (keeps it finite)


def full_forward_logits(lm, prefix_ids, prefix_mask, ids, mask, prefix_of_row):
    """Reference: each row's whole prompt + continuation through the LM, sliced at the continuation."""
    seq = torch.cat([prefix_ids[prefix_of_row], ids], 1)
    attn = torch.cat([prefix_mask[prefix_of_row], mask.long()], 1)
    logits, _ = lm(seq, attention_mask=attn)
    Tp, N = prefix_ids.shape[1], ids.shape[1]
    return logits[:, Tp - 1:Tp + N - 1]


@pytest.mark.parametrize("N", [1, 2, 6])
def test_continuation_logits_equal_full_forward(N):
    torch.manual_seed(0)
    lm = LM(LMConfig(vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=64, max_seq_len=64))
    g = torch.Generator().manual_seed(1)
    prefix_ids = torch.randint(1, V, (3, 8), generator=g)
    prefix_mask = torch.tensor([[1] * 8, [0, 0, 0] + [1] * 5, [0] * 7 + [1]])  # unequal lengths, one of 1 token
    prefix_of_row = torch.tensor([2, 0, 0, 1, 2, 0, 1])  # any order, any number of rows per prefix
    lengths = torch.tensor([N, 1, N, max(N - 1, 1), 1, N, 0])  # the last row has no real token at all
    mask = torch.arange(N)[None] < lengths[:, None]
    ids = torch.randint(1, V, (7, N), generator=g) * mask
    ref = full_forward_logits(lm, prefix_ids, prefix_mask, ids, mask, prefix_of_row)
    got = continuation_logits(lm, lm.embed_tokens(prefix_ids), prefix_mask, ids, mask, prefix_of_row)
    assert got.shape == (7, N, V)
    assert torch.allclose(got[mask], ref[mask], atol=1e-5)


# -----------------------------------------------------------------------------
# train_rl: completion logits, score, update


def test_completion_logits_and_every_gradient_equal_the_per_row_path():
    model = tiny_vlm()
    batch = dynamic_sampling_batch(model)
    rows = torch.randperm(batch["ids"].shape[0], generator=torch.Generator().manual_seed(5))[:9]  # groups split unevenly
    n = batch["mask"][rows].float()
    adv, logp_old = torch.randn(len(rows)), -torch.rand(*n.shape) * 3
    results = []
    for group_size in (None, G):
        model.zero_grad()
        logits = train_rl.completion_logits(model, batch, rows, group_size)  # (b, N, V)
        loss, _ = fused_policy_loss(logits, batch["ids"][rows], logp_old, adv, n, eps_low=0.2, eps_high=0.28, impl="torch")
        loss.backward()
        results.append((logits.detach(), loss.item(), {k: p.grad.clone() for k, p in model.named_parameters()}))
    (logits_a, loss_a, grads_a), (logits_b, loss_b, grads_b) = results
    real = batch["mask"][rows]
    assert torch.allclose(logits_a[real], logits_b[real], atol=1e-5)
    assert loss_b == pytest.approx(loss_a, rel=1e-5, abs=1e-7)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:  # the vision tower too: the prompt's image is in the graph once, its grad summed over rows
        scale = grads_a[name].abs().max().clamp(min=1e-8)
        assert (grads_a[name] - grads_b[name]).abs().max() / scale < 1e-4, name
    assert grads_a["vision.patch_embed.weight"].abs().sum() > 0


def test_score_equal_the_per_row_path():
    model = tiny_vlm().eval()
    batch = dynamic_sampling_batch(model)
    a = train_rl.score(model, batch, 0.7, "torch")
    b = train_rl.score(model, batch, 0.7, "torch", group_size=G, chunk=4)  # chunks rounded to whole groups
    assert torch.allclose(a[batch["mask"]], b[batch["mask"]], atol=1e-5)


def test_score_runs_each_chunk_to_its_longest_completion_only(monkeypatch):
    """The cut changes no log-prob (causal attention): equal to one full-width forward of every row, 0 past each
    completion's end (the sampler's convention), and some chunk did run narrower than the batch."""
    model = tiny_vlm().eval()
    batch = dynamic_sampling_batch(model)
    mask = batch["mask"]  # (B, N)
    with torch.no_grad():
        logits = train_rl.completion_logits(model, batch, torch.arange(mask.shape[0]))  # (B, N, V)
    full = rl.token_logprobs_torch(logits, batch["ids"], 0.7)  # (B, N)
    widths, forward = [], train_rl.completion_logits

    def spy(m, b, rows, group_size=None):  # records the width each chunk ran at
        widths.append(b["ids"].shape[1])
        return forward(m, b, rows, group_size)

    monkeypatch.setattr(train_rl, "completion_logits", spy)
    for group_size, chunk in ((None, 2), (G, G)):
        got = train_rl.score(model, batch, 0.7, "torch", group_size=group_size, chunk=chunk)
        assert torch.allclose(got[mask], full[mask], atol=1e-5)
        assert (got[~mask] == 0).all()
    assert max(widths) == mask.shape[1] and min(widths) < mask.shape[1], widths


def rl_cfg(agg, share_prefix):
    return types.SimpleNamespace(seed=0, ppo_epochs=2, num_minibatches=2, temperature=0.8, eps_low=0.2, eps_high=0.28,
                                 beta=0.04, agg=agg, max_new_tokens=7, loss_impl="torch", entropy_coef=0.01,
                                 grad_clip=0.0, on_nonfinite="stop", group_size=G, share_prefix=share_prefix)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_update_equals_the_per_row_path(agg):
    """train_rl.update (2 epochs x 2 random mini-batches, KL, entropy bonus) from the same weights on
    the same batch: the same stats and, with plain SGD, the same weights after every step."""
    batch = dynamic_sampling_batch(tiny_vlm())
    ref = tiny_vlm(seed=1).eval()
    logp_old = train_rl.score(tiny_vlm(), batch, 0.8, "torch")
    logp_ref = train_rl.score(ref, batch, 0.8, "torch")
    adv = rl.group_advantages(batch["reward"], G)
    after = []
    for share in (False, True):
        model = tiny_vlm()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        stats = train_rl.update(rl_cfg(agg, share), model, optimizer, batch, logp_old, logp_ref, adv,
                                batch["mask"].float(), torch.device("cpu"))
        after.append((stats, model.state_dict()))
    (stats_a, w_a), (stats_b, w_b) = after
    for k in stats_a:
        assert stats_b[k] == pytest.approx(stats_a[k], rel=1e-4, abs=1e-6), k
    moved = 0
    for name in w_a:
        assert torch.allclose(w_a[name], w_b[name], atol=1e-5), name
        moved += int(not torch.equal(w_a[name], tiny_vlm().state_dict()[name]))
    assert moved > 10  # the update did change the weights


def rollout_vlm(tok):
    """A tiny VLM speaking tok's vocabulary (room for the chat template's system prompt)."""
    torch.manual_seed(0)
    lm = LMConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=64,
                  max_seq_len=256)
    vision = ViTConfig(image_size=32, patch_size=8, n_layer=1, n_head=2, n_embd=32)
    return VLM(VLMConfig(vision=vision, lm=lm, image_token_id=tok.image_id))


@pytest.mark.parametrize("share", [False, True])
def test_rollout_old_logprobs_equal_a_full_recompute(share):
    """train_rl.rollout records the sampler's log-probs as logp_old (T 0.8, the image placeholder barred
    from the draw but kept in the softmax): they equal every row's full prompt + completion forward
    (train_rl.score, the recompute they replace), and an update given them ends with the stats and
    weights of an update given the recompute."""
    tok = Tokenizer.train(["<think>dense nuclei</think><answer>A) tumour</answer> which tissue is shown"] * 5, 300)
    cfg = types.SimpleNamespace(**vars(rl_cfg("seq-mean-token-mean", share)), top_p=1.0, w_format=0.1, w_acc=0.9,
                                overlong_shaping=0)
    items = [dict(question="Which tissue is shown?", options=["A) tumour", "B) stroma"], answer="A", kind="mcq"),
             dict(question="Is it tumour?", answer="yes", kind="yesno")]  # prompts of unequal lengths
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    model = rollout_vlm(tok)
    batch = train_rl.rollout(cfg, model, tok, items, images, [0, 1], torch.Generator().manual_seed(0), torch.device("cpu"))
    full = train_rl.score(model, batch, cfg.temperature, "torch")  # (B, N) per-row full forward
    real = batch["mask"]
    assert real.sum() > 10 and not (batch["ids"] == tok.image_id).any()
    assert torch.allclose(batch["logp_old"][real], full[real], rtol=0, atol=5e-6)
    adv = rl.group_advantages(batch["reward"] + torch.arange(len(real)) % 2, G)  # nonzero advantages
    ref = rollout_vlm(tok).eval()
    logp_ref = train_rl.score(ref, batch, cfg.temperature, "torch") + 0.01
    after = []
    for old in (full, batch["logp_old"]):
        model = rollout_vlm(tok)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        stats = train_rl.update(cfg, model, optimizer, batch, old, logp_ref, adv, real.float(), torch.device("cpu"))
        after.append((stats, model.state_dict()))
    (stats_a, w_a), (stats_b, w_b) = after
    for k in stats_a:
        assert stats_b[k] == pytest.approx(stats_a[k], rel=1e-4, abs=1e-6), k
    for name in w_a:
        assert torch.allclose(w_a[name], w_b[name], atol=1e-5), name
    assert not torch.equal(w_a["lm.norm.weight"], rollout_vlm(tok).state_dict()["lm.norm.weight"])  # it did move


# -----------------------------------------------------------------------------
# generation: one prefill per prompt, copied to its samples


def count_images(model):
    seen = []
    model.vision.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    return seen


def test_generate_samples_per_prompt_equals_repeated_prompts():
    model = tiny_vlm().eval()
    batch = rollout_round(model, 3, 12, 0)
    ids, mask, pixels = (batch[k][::G] for k in ("prompt_ids", "prompt_mask", "pixels"))  # (P, Tp), one per prompt
    seen = count_images(model)
    shared = model.generate(ids, pixels, mask, max_new_tokens=6, temperature=0, samples_per_prompt=G)
    assert seen == [3]  # the vision tower saw each image once
    rep = model.generate(ids.repeat_interleave(G, 0), pixels.repeat_interleave(G, 0), mask.repeat_interleave(G, 0),
                         max_new_tokens=6, temperature=0)
    assert shared.ids.shape == (9, 6) and torch.equal(shared.ids, rep.ids)
    assert torch.allclose(shared.logprobs, rep.logprobs, atol=1e-5)


def test_sampled_logprobs_of_shared_prefill_match_a_forward():
    """LM level; the VLM level, image placeholder barred from the draw, is train_rl's rollout test above."""
    lm = tiny_vlm().lm.eval()
    batch = rollout_round(tiny_vlm(), 2, 12, 1)
    ids, mask = batch["prompt_ids"][::G].clamp(max=V - 1), batch["prompt_mask"][::G]  # (P, Tp)
    out = lm.generate(ids, mask, max_new_tokens=6, temperature=0.8, samples_per_prompt=G,
                      generator=torch.Generator().manual_seed(0))
    assert not all(torch.equal(out.ids[p * G], out.ids[p * G + j]) for p in range(2) for j in range(1, G))  # samples differ
    logits = full_forward_logits(lm, ids, mask, out.ids, out.mask, torch.arange(2).repeat_interleave(G))  # (B, N, V)
    logp = (logits / 0.8).log_softmax(-1).gather(-1, out.ids[..., None])[..., 0]
    assert torch.allclose(out.logprobs[out.mask], logp[out.mask], atol=1e-5)


def test_continuations_encode_each_image_once():
    model = tiny_vlm()
    batch = dynamic_sampling_batch(model)
    seen = count_images(model)
    train_rl.completion_logits(model, batch, torch.arange(batch["ids"].shape[0]), G)
    assert seen == [batch["ids"].shape[0] // G]
