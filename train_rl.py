"""Stage 3 of Patho-R1: reinforcement learning with verifiable rewards, GRPO or DAPO,
written out by hand.

One step, in the order the code runs it:
  1. rollout   — sample G completions per prompt with the KV-cache generator at temperature T
  2. reward    — 0.1 * format (`<think>…</think><answer>…</answer>`) + 0.9 * accuracy, per completion
                 (DAPO adds the overlong-length shaping term)
  3. filter    — DAPO dynamic sampling: drop groups whose G rewards are all equal (zero advantage,
                 zero gradient), sample more prompts until the batch is full or --max_gen_rounds
  4. advantage — A_i = (r_i - mean(r_group)) / (std(r_group) + eps)
  5. old/ref log-probs — old: the sampler's own, recorded in step 1 (see `rollout`); reference (GRPO's
                 KL): the frozen model's, computed without grad
  6. update    — --ppo_epochs passes over --num_minibatches mini-batches, clipped surrogate loss
                 (GRPO: symmetric clip, k3 KL to the frozen SFT model, seq-mean-token-mean;
                  DAPO: clip-higher, no KL, token-mean over the global batch);
                 with --ptx_coef gamma, + gamma * the SFT next-token loss on a mini-batch of SFT's own
                 training conversations (PPO-ptx, Ouyang et al. 2022 eq. 2)
  7. log / eval / save
Steps 1, 5 (reference) and 6 encode each group's image and prompt once and run each completion on top of
their keys and values (--share_prefix, nanopatho/shared_prefix.py): the same numbers as giving
every row its own image + prompt + completion, as the code below reads; bench/bench_rl_step.py
measures the saving.

    python train_rl.py --preset toy --algo grpo --init out/sft --out_dir out/rl_grpo
    python train_rl.py --preset toy --algo dapo --init out/sft --out_dir out/rl_dapo
    torchrun --nproc_per_node=8 train_rl.py --preset small --algo dapo --init out/sft
    torchrun --nproc_per_node=8 train_rl.py --preset base --algo grpo --init out/sft --stream --fsdp
    python train_rl.py --preset toy --algo grpo --init out/sft --types glands,pleomorphism,tissue:160
    python train_rl.py --help

--stream reads the questions by seek, prompts_per_step at a time per rollout round, images decoded
in --num_workers processes (nanopatho/stream.py). --fsdp shards the policy; rollouts, old log-probs
and evaluation run inside fsdp.unsharded (ranks generate different lengths); the frozen KL reference
is a plain replicated copy (no gradients, no optimizer state).

Why the loss printed here hovers around 0: with on-policy data the ratio is 1 at the first
mini-batch, so the surrogate equals the mean advantage, which group normalisation makes ~0.
Its gradient, A * grad(log p), is not 0 — that is what moves the policy.
"""

import collections
import dataclasses
import os
import time

import torch
from tqdm import tqdm

from nanopatho import checkpoint, dist, fsdp, rl, stream, training
from nanopatho.config import RunConfig, field, parse_config, to_dict
from nanopatho.data import DataError, image_tensor, load_records, pad_sequences, preload_images, to_float
from nanopatho.evaluate import eval_vlm
from nanopatho.kernels import fused_policy_loss, token_logprobs
from nanopatho.next_token import batch_loss_sum, make_batch
from nanopatho.prompts import format_question
from nanopatho.rewards import accuracy_reward, format_reward
from train_sft import Config as SFTConfig, conversation_examples


@dataclasses.dataclass
class Config(RunConfig):
    algo: str = field("grpo", "grpo | dapo (sets the defaults marked 'algo default')")
    init: str = field("out/sft", "VLM checkpoint to start from (stage 2 output); also the KL reference")
    train_file: str = field("rl_train.jsonl", "questions with verifiable answers (relative to --data)")
    types: str = field("", "question types to train on, by the rows' \"type\": comma-separated names, name:N keeps "
                           "the first N rows of that type (file order), e.g. glands,tissue:160 ('' = every row; "
                           "not with --stream)")
    out_dir: str = field("out/rl", "output directory")
    seed: int = field(0, "random seed (prompt order, sampling)")
    max_steps: int = field(60, "RL steps (one rollout batch each)")
    prompts_per_step: int = field(8, "prompts per rank per step (groups kept after filtering)")
    group_size: int = field(8, "G: completions sampled per prompt")
    temperature: float = field(1.0, "sampling temperature (the loss uses log-probs of logits / T)")
    top_p: float = field(1.0, "nucleus sampling during rollouts (1 = off)")
    max_new_tokens: int = field(128, "L_max: completion length limit")
    lr: float = field(5e-5, "learning rate (constant after warmup)")
    warmup_steps: int = field(0, "linear warmup steps")
    weight_decay: float = field(0.0, "AdamW weight decay")
    ppo_epochs: int = field(1, "mu: passes over each rollout batch")
    num_minibatches: int = field(2, "optimizer steps per pass over the rollout batch")
    eps_low: float = field(0.2, "lower clip range epsilon_low")
    eps_high: float = field(-1.0, "upper clip range epsilon_high (algo default: 0.2 GRPO, 0.28 DAPO)")
    beta: float = field(-1.0, "k3 KL weight to the reference model (algo default: 0.04 GRPO, 0 DAPO)")
    agg: str = field("", "loss aggregation (algo default: seq-mean-token-mean GRPO, token-mean DAPO)")
    adv_scale: str = field("group", "advantage normalisation: group | batch | none (Dr. GRPO)")
    dynamic_sampling: int = field(-1, "drop zero-spread groups and resample (algo default: 0 GRPO, 1 DAPO)")
    max_gen_rounds: int = field(3, "dynamic sampling: at most this many rollout rounds per step")
    overlong_shaping: int = field(-1, "DAPO length penalty in the last cache_len tokens (algo default: 0 GRPO, 1 DAPO)")
    overlong_cache: int = field(32, "L_cache: soft-penalty window before max_new_tokens")
    overlong_filter: bool = field(False, "mask completions cut at max_new_tokens out of the loss")
    w_format: float = field(0.1, "reward weight of the format check")
    w_acc: float = field(0.9, "reward weight of the accuracy check")
    entropy_coef: float = field(0.0, "entropy bonus (0 = only logged)")
    ptx_coef: float = field(0.0, "gamma: weight of the SFT next-token loss on --ptx_file rows added to every "
                                 "update (PPO-ptx; 0 = off). Keeps what the reward does not check, e.g. the option walk")
    ptx_file: str = field("sft_train.jsonl", "--ptx_coef's conversations (relative to --data); SFT's held-out "
                                             "rows (every 20th) are left out, as train_sft.py leaves them out")
    ptx_batch: int = field(8, "--ptx_coef: conversations per update per rank")
    loss_impl: str = field("auto", "policy-loss implementation: auto (Triton on CUDA) | torch | triton")
    share_prefix: bool = field(True, "encode each group's image and prompt once in rollout, scoring and update "
                                     "(false: every row runs its own copy; same results, for benchmarks and tests)")
    eval_every: int = field(20, "held-out MCQ accuracy every N steps, logged only (0 = only at the end)")
    eval_limit: int = field(100, "MCQ items used by the periodic evaluation")
    eval_max_new_tokens: int = field(128, "generation budget of the periodic evaluation (greedy)")
    save_every: int = field(20, "resumable snapshot every N steps")
    debug_nan_step: int = field(-1, "testing: make the loss NaN in every update of this RL step (-1 = never)")


PRESETS = {
    # toy samples at T 0.7: at T 1 the 3M-parameter policy's rollouts are far from its greedy answers
    # (open questions of rl_train: 8% right in T 1 rollouts, 73% greedy), and RL then trains away the
    # answers SFT taught (measured on training-split questions; see the README)
    # toy, earlier: 120 steps (60 before): GRPO from the seed-0 SFT model, dev rows of rl_train, MCQ 0.7625 (SFT) ->
    # 0.770 (60 steps) -> 0.7825 (120); at lr 1e-4 0.645 -> 0.720 (see the issue-15 note).
    # max_new_tokens 256 (was 128): 22% of SFT's tumour MCQ chains are longer than 128 tokens, so RL scored
    # them as unanswered and DAPO's overlong window (96-128) fell on their ordinary length. ptx_coef 1: without
    # it RL wore down the option walk ("...which is adipose tissue. ... C) background: yes"); dev world
    # (SynthPath seed 11), GRPO seed 0, MCQ: SFT 0.607, 128 tokens 0.609, 256 tokens 0.584, 256 + ptx 0.636.
    # 90 steps and 4 ptx rows per update (was 120 and 8) to fit the speedrun's time budget: dev MCQ seed 0,
    # GRPO 0.618 -> 0.622 in 414 -> 268 s, DAPO 0.642 -> 0.631 in 481 -> 348 s (SFT 0.607)
    "toy": dict(max_steps=90, prompts_per_step=8, group_size=8, lr=5e-5, max_new_tokens=256, overlong_cache=32,
                temperature=0.7, eval_max_new_tokens=256, ptx_coef=1.0, ptx_batch=4),
    "small": dict(max_steps=500, prompts_per_step=32, group_size=8, lr=2e-6, max_new_tokens=512),
    "base": dict(max_steps=1000, prompts_per_step=64, group_size=8, lr=1e-6, max_new_tokens=1024),
}
KINDS = ("mcq", "yesno", "short")  # the answer kinds of rl_train.jsonl
ALGO_DEFAULTS = {
    "grpo": dict(eps_high=0.2, beta=0.04, agg="seq-mean-token-mean", dynamic_sampling=0, overlong_shaping=0),
    "dapo": dict(eps_high=0.28, beta=0.0, agg="token-mean", dynamic_sampling=1, overlong_shaping=1),
}


def apply_algo_defaults(cfg):
    """Fill every field left at its 'algo default' sentinel from ALGO_DEFAULTS[cfg.algo]."""
    if cfg.algo not in ALGO_DEFAULTS:
        training.fail(f"--algo must be one of {sorted(ALGO_DEFAULTS)}, got {cfg.algo!r}")
    for name, value in ALGO_DEFAULTS[cfg.algo].items():
        if getattr(cfg, name) in (-1, -1.0, ""):
            setattr(cfg, name, value)
    return cfg


# -----------------------------------------------------------------------------
# rollout

def prompt_batch(tokenizer, model, items, images, indices, device):
    """Left-padded chat prompts (P, Tp) and their images (P, 3, S, S), one per prompt."""
    prompts = [tokenizer.render_prompt(format_question(items[i]["question"], items[i].get("options")),
                                       model.n_image_tokens) for i in indices]
    ids, mask = pad_sequences(prompts, tokenizer.pad_id, side="left")  # (P, Tp)
    return ids.to(device), mask.to(device), to_float(images[indices]).to(device)


def completion_texts(tokenizer, ids, mask):
    """Decode each completion's real tokens, without the end-of-turn marker."""
    stops = {tokenizer.im_end_id, tokenizer.eos_id}
    return [tokenizer.decode([t for t, m in zip(row, keep) if m and t not in stops])
            for row, keep in zip(ids.tolist(), mask.tolist())]


@torch.no_grad()
def rollout(cfg, model, tokenizer, items, images, indices, gen, device):
    """Sample G completions for each prompt and score them. Returns a dict of tensors.

    logp_old holds the sampler's log-probs of its tokens, log_softmax(logits / T)[token], which are
    pi_theta_old: the sampler is this same fp32 model at these same weights (no autocast in this script),
    and its KV-cache logits equal a full forward's to ~1e-6 (tests/test_lm.py, tests/test_shared_prefix.py),
    so a recompute would only cost a forward pass to move the ratio by ~1e-6, far inside the clip range."""
    model.eval()
    p_ids, p_mask, pixels = prompt_batch(tokenizer, model, items, images, indices, device)  # (P, Tp), (P, 3, S, S)
    G = cfg.group_size
    if not cfg.share_prefix:  # every sample of a group encodes its own copy of the image and prompt
        p_ids, p_mask, pixels = (t.repeat_interleave(G, 0) for t in (p_ids, p_mask, pixels))  # (P*G, ...)
    out = model.generate(p_ids, pixels, attention_mask=p_mask, max_new_tokens=cfg.max_new_tokens,
                         temperature=cfg.temperature, top_p=cfg.top_p if cfg.top_p < 1 else None,
                         stop_ids=(tokenizer.im_end_id, tokenizer.eos_id), pad_id=tokenizer.pad_id, generator=gen,
                         samples_per_prompt=G if cfg.share_prefix else 1)
    model.train()
    if cfg.share_prefix:  # the batch keeps one prompt row per completion row, whichever path made it
        p_ids, p_mask, pixels = (t.repeat_interleave(G, 0) for t in (p_ids, p_mask, pixels))  # (P*G, ...)
    c_mask = out.mask  # (B, N) bool, B = P * G
    texts = completion_texts(tokenizer, out.ids, c_mask)
    answers = [(items[i]["answer"], items[i]["kind"]) for i in indices for _ in range(cfg.group_size)]
    fmt = torch.tensor([format_reward(t) for t in texts])
    acc = torch.tensor([accuracy_reward(t, a, k) for t, (a, k) in zip(texts, answers)])
    lengths = c_mask.sum(1).cpu()  # (B,)
    last_ids = out.ids.gather(1, (lengths - 1).clamp(min=0).to(out.ids.device)[:, None])[:, 0].cpu()
    truncated = ~torch.isin(last_ids, torch.tensor([tokenizer.im_end_id, tokenizer.eos_id]))
    reward = cfg.w_format * fmt + cfg.w_acc * acc  # (B,)
    if cfg.overlong_shaping:
        reward = reward + rl.overlong_penalty(lengths, cfg.max_new_tokens, cfg.overlong_cache)
    kind = torch.tensor([KINDS.index(k) for _, k in answers])  # (B,) for per-kind accuracy
    return dict(prompt_ids=p_ids, prompt_mask=p_mask, pixels=pixels, ids=out.ids, mask=c_mask, logp_old=out.logprobs,
                reward=reward.float(), acc=acc.float(), fmt=fmt.float(), length=lengths.float(),
                truncated=truncated, kind=kind)


def cat_rollouts(parts):
    """Concatenate rollout dicts along the batch (prompts padded to a common width)."""
    if len(parts) == 1:
        return parts[0]
    out = {}
    for key in parts[0]:
        tensors = [p[key] for p in parts]
        if key in ("prompt_ids", "prompt_mask"):  # left-padded: pad on the left to the widest
            width = max(t.shape[1] for t in tensors)
            tensors = [torch.nn.functional.pad(t, (width - t.shape[1], 0)) for t in tensors]
        elif key in ("ids", "mask", "logp_old"):  # right-padded completions
            width = max(t.shape[1] for t in tensors)
            tensors = [torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in tensors]
        out[key] = torch.cat(tensors, 0)
    return out


def select_groups(batch, keep, group_size):
    """Keep whole groups (keep: (num_groups,) bool)."""
    rows = keep.repeat_interleave(group_size).nonzero()[:, 0]
    return {k: v[rows.to(v.device)] for k, v in batch.items()}


def next_prompts(cfg, questions, step, rounds):
    """(items, uint8 images, indices) of this rank's prompts for one rollout round: the preloaded
    (items, images) indexed by batch_indices, or the next batch of the --stream."""
    if cfg.stream:
        items, images = next(questions)
        return items, images, list(range(len(items)))
    items, images = questions
    return items, images, training.batch_indices(len(items), cfg.prompts_per_step, step * cfg.max_gen_rounds + rounds,
                                                 cfg.seed, dist.rank(), dist.world_size())


def collect(cfg, model, tokenizer, questions, step, device):
    """Rollouts for one step. GRPO: one round. DAPO: keep informative groups, resample up to
    max_gen_rounds rounds until prompts_per_step groups are kept, then train on what there is.
    Logs `informative`, the share of sampled groups whose rewards differ: the others have zero
    advantage and give GRPO no policy gradient (DAPO drops them)."""
    kept, n_groups, n_informative, rounds = [], 0, 0, 0
    while rounds < max(1, cfg.max_gen_rounds if cfg.dynamic_sampling else 1):
        items, images, idx = next_prompts(cfg, questions, step, rounds)
        gen = training.generator_for(cfg.seed, step, rounds, dist.rank())
        batch = rollout(cfg, model, tokenizer, items, images, idx, gen, device)
        rounds += 1
        n_groups += len(idx)
        keep = rl.informative_groups(batch["reward"], cfg.group_size)  # (P,) bool: rewards not all equal
        n_informative += int(keep.sum())
        if cfg.dynamic_sampling:
            batch = select_groups(batch, keep, cfg.group_size)
        kept.append(batch)
        if cfg.dynamic_sampling and n_informative >= cfg.prompts_per_step:
            break
    n_kept = n_informative if cfg.dynamic_sampling else n_groups
    batch = cat_rollouts(kept)
    limit = min(n_kept, cfg.prompts_per_step) * cfg.group_size
    batch = {k: v[:limit] for k, v in batch.items()}
    return batch, dict(gen_rounds=rounds, groups_sampled=n_groups, groups_kept=min(n_kept, cfg.prompts_per_step),
                       informative=n_informative / max(n_groups, 1))


# -----------------------------------------------------------------------------
# scoring and update

def completion_logits(model, batch, rows, group_size=None):
    """Logits scoring each completion token of batch rows `rows`: (b, N, V). Position t of the
    completion is predicted from the prompt and the completion up to the token before it.

    group_size G: rows g*G .. g*G+G-1 are one group, G completions of one image and prompt, which
    the model then encodes once per group (nanopatho.shared_prefix; same logits, and in backward
    the prompt's gradient is the sum over its completions). None: each row runs prompt + completion."""
    if group_size is None:
        ids = torch.cat([batch["prompt_ids"][rows], batch["ids"][rows]], 1)  # (b, Tp + N)
        attn = torch.cat([batch["prompt_mask"][rows], batch["mask"][rows].long()], 1)
        logits, _ = model(ids, batch["pixels"][rows], attention_mask=attn)  # (b, Tp + N, V)
        tp, n = batch["prompt_ids"].shape[1], batch["ids"].shape[1]
        return logits[:, tp - 1:tp + n - 1]
    groups, prompt_of_row = torch.unique(rows // group_size, return_inverse=True)  # (u,), (b,)
    first = groups * group_size  # the row standing for each group's prompt and image
    logits, _ = model(batch["prompt_ids"][first], batch["pixels"][first], attention_mask=batch["prompt_mask"][first],
                      continuations=(batch["ids"][rows], batch["mask"][rows], prompt_of_row.to(batch["ids"].device)))
    return logits  # (b, N, V)


@torch.no_grad()
def score(model, batch, temperature, impl, group_size=None, chunk=16):
    """Per-token log-probs of the sampled completions under `model` (the frozen reference), without
    grad: (B, N), 0 past each completion's end as in the sampler's own. group_size: see completion_logits
    (chunks then hold whole groups). Each chunk runs only up to its own longest completion: attention is
    causal, so the cut changes no log-prob, and a chunk of short replies no longer pays for the batch's
    longest one.

    Old log-probs are not recomputed here but taken from the sampler (see `rollout`): it is the same
    model in the same precision, so the two differ only by rounding (~1e-6). A sampler in another
    precision than the update (bf16 rollouts, fp32 training, as verl + vLLM run) would need this
    recompute for them too, or the ratio would stray from 1 before any update and clip for no reason."""
    chunk = chunk if group_size is None else max(1, chunk // group_size) * group_size
    mask = batch["mask"].bool()  # (B, N)
    out = torch.zeros(mask.shape, device=mask.device)  # (B, N)
    for part in torch.arange(mask.shape[0]).split(chunk):
        filled = mask[part].any(0).nonzero()  # (k, 1) the positions some completion of the chunk reaches
        if not len(filled):
            continue
        width = int(filled.max()) + 1
        cut = dict(batch, ids=batch["ids"][:, :width], mask=batch["mask"][:, :width])
        logits = completion_logits(model, cut, part, group_size)  # (b, width, V)
        out[part, :width] = token_logprobs(logits, cut["ids"][part], temperature=temperature, impl=impl).to(out.dtype)
    return out.masked_fill_(~mask, 0.0)


def minibatches(cfg, n_rows, epoch):
    """The update's mini-batches for one pass over the rollout batch: a shuffle of its rows fixed by
    (seed, epoch, rank), cut into num_minibatches parts."""
    order = torch.randperm(n_rows, generator=training.generator_for(cfg.seed, 99, epoch, dist.rank()))
    return order.chunk(max(1, min(cfg.num_minibatches, n_rows)))


def reference_logprobs(cfg, ref, batch):
    """Phase 2 of a step, no grad: the frozen reference's log-probs (B, N) for the KL term, or None without one."""
    if ref is None:
        return None
    return score(ref, batch, cfg.temperature, cfg.loss_impl, cfg.group_size if cfg.share_prefix else None)


def load_ptx(cfg, tokenizer, model):
    """--ptx_coef's rows: the training conversations of --ptx_file, rendered and split as train_sft.py does."""
    sft = SFTConfig(data=cfg.data, train_file=cfg.ptx_file, max_seq_len=model.config.lm.max_seq_len,
                    skip_bad_samples=cfg.skip_bad_samples, allow_outside_root=cfg.allow_outside_root)
    rows, _, bad = conversation_examples(sft, tokenizer, model.n_image_tokens, model.config.vision.image_size)
    if not len(rows):
        raise DataError(f"{sft.train_file}: no training conversations for --ptx_coef")
    return rows, bad


def ptx_loss(cfg, model, rows, pad_id, k, device):
    """Mean next-token loss of ptx mini-batch k over its reply tokens: -E_{x ~ D_SFT}[log pi(x)], the term
    Ouyang et al. 2022 (eq. 2) add with weight gamma so that RL keeps what supervised training taught."""
    idx = training.batch_indices(len(rows), cfg.ptx_batch, k, cfg.seed, dist.rank(), dist.world_size())
    batch = make_batch(rows, idx, pad_id, training.generator_for(cfg.seed, k, 1, dist.rank()), True, device)
    loss_sum, n_tokens = batch_loss_sum(model, batch)
    return loss_sum / n_tokens.clamp(min=1)


def update(cfg, ddp_model, optimizer, batch, logp_old, logp_ref, adv, loss_mask, device, poison=False, ptx=None,
           step=0):
    """ppo_epochs x num_minibatches optimizer steps on one rollout batch. Returns mean stats.
    `poison` makes the loss NaN (testing the non-finite guard). `ptx(k)`: the SFT loss of ptx mini-batch k,
    added as cfg.ptx_coef * ptx(k) to optimizer step k (counted over the whole run from `step`)."""
    n_rows = batch["ids"].shape[0]
    stats_sum, n_updates = {}, 0
    for epoch in range(cfg.ppo_epochs):
        for rows in minibatches(cfg, n_rows, epoch):
            mask = loss_mask[rows]  # (b, N)
            n_global = training.global_count(int(mask.sum()), device)  # token-mean's denominator, all ranks
            seqs_global = training.global_count(len(rows), device)  # the seq-mean modes' denominator
            logits = completion_logits(ddp_model, batch, rows, cfg.group_size if cfg.share_prefix else None)  # (b, N, V)
            loss, stats = fused_policy_loss(
                logits, batch["ids"][rows], logp_old[rows], adv[rows], mask, temperature=cfg.temperature,
                eps_low=cfg.eps_low, eps_high=cfg.eps_high, logp_ref=None if logp_ref is None else logp_ref[rows],
                beta=cfg.beta, agg=cfg.agg, num_tokens=n_global, num_seqs=seqs_global, max_len=cfg.max_new_tokens,
                impl=cfg.loss_impl)
            entropy = rl.aggregate(rl.entropy_from_logits(logits.detach(), mask, cfg.temperature), mask, "token-mean")
            if cfg.entropy_coef:  # bonus: -c * mean token entropy of the sampling distribution
                bonus = rl.aggregate(rl.entropy_from_logits(logits, mask, cfg.temperature), mask, cfg.agg,
                                     num_tokens=n_global, num_seqs=seqs_global, max_len=cfg.max_new_tokens)
                loss = loss - cfg.entropy_coef * bonus
            loss = loss * float("nan") if poison else loss
            # the normalisers above are global (all ranks); DDP averages gradients over ranks, so scale
            # each rank's share by the world size to get the gradient of the one global loss
            (loss * dist.world_size()).backward()
            if ptx is not None:  # its own backward: a per-rank mean, which DDP's gradient averaging makes global
                sft_loss = ptx(step * cfg.ppo_epochs * cfg.num_minibatches + n_updates)
                (cfg.ptx_coef * sft_loss).backward()
                stats["ptx_loss"] = sft_loss.detach()
            grad_norm, stepped = training.optimizer_step(ddp_model, optimizer, cfg.grad_clip, cfg.on_nonfinite)
            stats = {k: float(v) for k, v in stats.items()}
            stats.update(loss=loss.item(), entropy=float(entropy), grad_norm=grad_norm, skipped=0.0 if stepped else 1.0)
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + v
            n_updates += 1
    return {k: v / max(n_updates, 1) for k, v in stats_sum.items()}


def every_rank_has_rows(batch, device):
    """Whether the update can run: its collectives (global token counts, DDP's gradient all-reduce)
    need every rank, so a step where dynamic sampling left some rank no group trains on none."""
    empty = torch.tensor(float(batch["ids"].shape[0] == 0), device=device)
    return dist.all_reduce_max(empty).item() == 0


def global_mean(values, device):
    """Mean of a per-rollout quantity over every rank's rows."""
    t = torch.tensor([float(values.sum()), float(values.numel())], device=device)
    dist.all_reduce_sum(t)
    return (t[0] / t[1].clamp(min=1)).item()


# -----------------------------------------------------------------------------

QUESTION_KEYS = ("image", "question", "answer", "kind")


def select_types(items, spec, path):
    """--types: the items whose "type" is listed in spec ("glands,tissue:160"), in file order; name:N keeps
    only the first N rows of that type. An empty spec keeps every item. Rows without a "type" are dropped.
    A malformed entry or a listed type with no row is a DataError naming `path` and the flag."""
    if not spec:
        return items
    limits = {}  # type -> at most this many rows (None: all of them)
    for entry in spec.split(","):
        name, colon, count = (part.strip() for part in entry.partition(":"))
        if not name or name in limits or (colon and not (count.isdecimal() and int(count) > 0)):
            raise DataError(f"{path}: --types {spec!r}: entry {entry.strip()!r} must be a type name or name:N "
                            f"with N >= 1, each type once")
        limits[name] = int(count) if colon else None
    kept, counts = [], dict.fromkeys(limits, 0)
    for item in items:
        name = item.get("type")
        if name in limits and (limits[name] is None or counts[name] < limits[name]):
            kept.append(item)
            counts[name] += 1
    missing = [name for name, n in counts.items() if n == 0]
    if missing:
        raise DataError(f"{path}: --types lists {', '.join(missing)}, which no row has as its \"type\"")
    return kept


def load_questions(cfg, image_size):
    """(items, uint8 images) decoded into memory, or with --stream a stream.Stream of such batches;
    and the bad samples skipped while loading. --types filters the rows before their images are decoded."""
    path = cfg.train_file if os.path.isabs(cfg.train_file) else os.path.join(cfg.data, cfg.train_file)
    if cfg.stream and cfg.types:
        training.fail(f"{path}: --types selects from the preloaded questions; it does not combine with --stream")
    if cfg.stream:
        source = stream.open_records(path, QUESTION_KEYS, allow_outside_root=cfg.allow_outside_root)
        return stream.Stream(source, QuestionPlan(image_size, cfg.prompts_per_step), seed=cfg.seed,
                             num_workers=cfg.num_workers, skip_bad=cfg.skip_bad_samples), 0
    items, skipped = load_records(path, QUESTION_KEYS, skip_bad=cfg.skip_bad_samples,
                                  allow_outside_root=cfg.allow_outside_root)
    if cfg.types:
        kept = select_types(items, cfg.types, path)
        counts = collections.Counter(item["type"] for item in kept)
        training.print0(f"[rl] --types: {len(kept)} rows of {len(items)} kept "
                        f"({', '.join(f'{name} {n}' for name, n in sorted(counts.items()))})")
        items = kept
    images, items, bad = preload_images(items, image_size, skip_bad=cfg.skip_bad_samples, desc="rl images")
    return (items, images), skipped + bad


class QuestionPlan:
    """--stream: a question -> (item, uint8 image) in a worker; a batch is prompts_per_step of them."""

    def __init__(self, image_size, prompts_per_step):
        self.image_size, self.prompts_per_step = image_size, prompts_per_step

    def rows(self, k):
        return self.prompts_per_step

    def sample(self, item):
        return item, image_tensor(item["image"], item["source"], self.image_size)  # (3, S, S) uint8

    def collate(self, samples, k):
        return [item for item, _ in samples], torch.stack([image for _, image in samples])  # (P, 3, S, S)


def main(argv=None):
    cfg = apply_algo_defaults(parse_config(Config, PRESETS, argv, description=__doc__))
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = training.setup(cfg.seed, cfg.device)
    model, _, tokenizer = checkpoint.load(cfg.init, expect="vlm")
    ref = checkpoint.load(cfg.init, expect="vlm")[0] if cfg.beta > 0 else None
    questions, bad = load_questions(cfg, model.config.vision.image_size)
    ptx_rows, ptx_bad = load_ptx(cfg, tokenizer, model) if cfg.ptx_coef else (None, 0)
    model.to(device)
    if ref is not None:
        ref.to(device).eval().requires_grad_(False)
    ddp_model = training.wrap(model, device, cfg.fsdp)
    ptx = None if ptx_rows is None else lambda k: ptx_loss(cfg, ddp_model, ptx_rows, tokenizer.pad_id, k, device)
    optimizer = training.make_optimizer(model, cfg.lr, cfg.weight_decay)
    start, skipped_steps, resumed = training.resume(cfg, model, optimizer, "rl", data=questions if cfg.stream else None)
    n_questions = f"{len(questions.source)} streamed" if cfg.stream else len(questions[0])
    training.print0(f"[rl] {cfg.algo}: {n_questions} questions, skipped bad samples {bad}; eps=({cfg.eps_low}, "
                    f"{cfg.eps_high}) beta={cfg.beta} agg={cfg.agg} dynamic_sampling={cfg.dynamic_sampling} "
                    f"overlong_shaping={cfg.overlong_shaping} loss_impl={cfg.loss_impl} ptx_coef={cfg.ptx_coef}"
                    + (f" ({len(ptx_rows)} conversations, skipped {ptx_bad})" if ptx_rows is not None else ""))
    log = training.MetricsLog(cfg.out_dir, resume_step=start if resumed else None)
    t0, row = time.time(), {}
    bar = tqdm(range(start, cfg.max_steps), desc=f"rl-{cfg.algo}", disable=not dist.is_main(), dynamic_ncols=True)
    for step in bar:
        training.set_lr(optimizer, training.lr_at(step, cfg.max_steps, cfg.lr, cfg.warmup_steps, min_ratio=1.0))
        t_gen = time.time()
        with fsdp.unsharded(model):  # ranks generate different lengths: no collective inside
            batch, sampling = collect(cfg, model, tokenizer, questions, step, device)
        t_gen = time.time() - t_gen
        t_upd = time.time()
        row = dict(step=step + 1, reward=global_mean(batch["reward"], device), accuracy=global_mean(batch["acc"], device),
                   format_rate=global_mean(batch["fmt"], device), response_length=global_mean(batch["length"], device),
                   truncated=global_mean(batch["truncated"].float(), device), **sampling)
        for k, name in enumerate(KINDS):
            row[f"accuracy_{name}"] = global_mean(batch["acc"][batch["kind"] == k], device)
        if every_rank_has_rows(batch, device):
            adv = rl.group_advantages(batch["reward"], cfg.group_size, scale=cfg.adv_scale).to(device)  # (B,)
            loss_mask = batch["mask"].float()
            if cfg.overlong_filter:
                loss_mask = loss_mask * (~batch["truncated"]).float().to(device)[:, None]
            t_score = time.time()
            logp_ref = reference_logprobs(cfg, ref, batch)  # (B, N) or None
            row["score_seconds"] = time.time() - t_score  # the reference's log-probs
            row.update(update(cfg, ddp_model, optimizer, batch, batch["logp_old"], logp_ref, adv, loss_mask, device,
                              poison=step == cfg.debug_nan_step, ptx=ptx, step=step))
            row["reward_std"] = batch["reward"].std().item() if batch["reward"].numel() > 1 else 0.0
            skipped_steps += int(row.get("skipped", 0) > 0)
        row.update(gen_seconds=t_gen, update_seconds=time.time() - t_upd - row.get("score_seconds", 0.0),
                   skipped_steps=skipped_steps,
                   elapsed=time.time() - t0)
        last = step == cfg.max_steps - 1
        if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last:
            with fsdp.unsharded(model):
                if dist.is_main():
                    row["mcq_acc"] = eval_vlm(model, tokenizer, cfg.data, ["mcq"], limit=cfg.eval_limit, device=device,
                                              max_new_tokens=cfg.eval_max_new_tokens)["mcq"]["accuracy"]
            model.train()
        log.write(**row)
        bar.set_postfix(reward=f"{row['reward']:.3f}", acc=f"{row['accuracy']:.3f}", len=f"{row['response_length']:.0f}")
        if training.snapshot_due(cfg, step):
            training.save_snapshot(cfg, step, model, tokenizer, to_dict(cfg), optimizer, skipped_steps,
                                   data=questions if cfg.stream else None)
        dist.barrier()
    bad += stream.total_bad(questions, device) if cfg.stream else 0
    training.save_final(cfg.out_dir, model, tokenizer, to_dict(cfg))
    if dist.is_main():
        training.print0(f"[rl] done in {time.time() - t0:.0f}s ({cfg.algo}): last-step reward {row.get('reward', float('nan')):.3f}, "
                        f"train accuracy {row.get('accuracy', float('nan')):.3f}, held-out MCQ ({cfg.eval_limit} items) "
                        f"{row.get('mcq_acc', float('nan')):.3f}, skipped steps {skipped_steps}, skipped samples {bad} "
                        f"-> {cfg.out_dir}")
    dist.shutdown()


if __name__ == "__main__":
    training.run(main)
