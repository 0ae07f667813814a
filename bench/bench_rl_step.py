"""One GRPO step of train_rl.py, per phase, with and without the shared prompt prefix (issue 18).

    generation  the rollout's KV-cache sampling of G completions per prompt (model.generate, as train_rl.rollout)
    score       old and reference log-probs, no grad (GRPO has a reference model; "after" is
                train_rl.reference_logprobs: the old log-probs are the sampler's, recorded during generation)
    update      ppo_epochs x num_minibatches optimizer steps (train_rl.update)

"before" is the path before issue 18: `--share_prefix false` (every row of a group encodes its own
copy of the image and prompt) and old log-probs recomputed for every row; "after" is train_rl's
path, each group's image and prompt encoded once and the sampler's log-probs kept as the old ones. Toy VLM (random
init), toy RL preset (G = 8, temperature 0.7, 2 mini-batches, GRPO), 8 prompts of 78-109 tokens
(the lengths of SynthPath's RL prompts, 16 image tokens each), exactly 128 new tokens per
completion (no stop token), vocabulary 1513 (SynthPath's tokenizer). Both paths start every
repetition from the same weights and optimizer state and run in turn (A B A B ...); the
figure is the median. Equal results are checked in the same run: both paths' greedy
completions, and the old log-probs and updated weights of both paths on one rollout batch.

MFU (--mfu): FLOPs of one "after" step counted by torch.utils.flop_counter (every matmul and
convolution, forward and backward; attention too on CUDA), over its median time, over the fp32
matmul peak measured in the same run (train_rl runs in fp32: it has no autocast).

    python bench/bench_rl_step.py                  # ~2 min on 2 idle CPU cores, 1 thread
    python bench/bench_rl_step.py --reps 5 --new 64
    python bench/bench_rl_step.py --clock cpu      # this thread's CPU time: steadier on a shared machine
    python bench/bench_rl_step.py --device cuda --preset small --vocab 32000 --mfu
"""

import argparse
import copy
import os
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_rl  # noqa: E402
from bench.bench_mfu import matmul_peak  # noqa: E402
from bench.peers import CLOCKS, median  # noqa: E402
from nanopatho import training  # noqa: E402
from nanopatho.presets import vlm_config  # noqa: E402
from nanopatho.vlm import VLM  # noqa: E402

TARGET = 0.5  # issue 18: the step in <= 0.5x the time of the per-row path
VOCAB, IMAGE_ID, PAD = 1513, 3, 0
PHASES = ("generation", "score", "update")


def rl_config(share_prefix, new_tokens, device):
    """train_rl's own config: toy RL preset, GRPO defaults; the Triton loss on CUDA, the torch one elsewhere."""
    argv = ["--preset", "toy", "--algo", "grpo", "--loss_impl", "auto" if device.type == "cuda" else "torch",
            "--max_new_tokens", str(new_tokens), "--share_prefix", str(share_prefix)]
    return train_rl.apply_algo_defaults(train_rl.parse_config(train_rl.Config, train_rl.PRESETS, argv))


def synthetic_prompts(model, n_prompts, vocab, device, seed=0, min_text=62, max_text=93):
    """Left-padded prompts (P, Tp) holding one image each (its placeholders after a system-prompt-sized
    head; min_text..max_text other tokens: 78..109 in all with the toy's 16 image tokens), their masks
    and images (P, 3, S, S)."""
    g = torch.Generator().manual_seed(seed)
    n_img = model.n_image_tokens
    lengths = torch.randint(min_text, max_text + 1, (n_prompts,), generator=g) + n_img
    width = int(lengths.max())
    ids = torch.full((n_prompts, width), PAD, dtype=torch.long)
    mask = torch.zeros(n_prompts, width, dtype=torch.long)
    for p, n in enumerate(lengths.tolist()):
        row = torch.randint(IMAGE_ID + 1, vocab, (n,), generator=g)
        row[40:40 + n_img] = IMAGE_ID  # after the system prompt, like render_prompt
        ids[p, width - n:], mask[p, width - n:] = row, 1
    size = model.config.vision.image_size
    pixels = torch.rand(n_prompts, 3, size, size, generator=g) * 2 - 1
    return ids.to(device), mask.to(device), pixels.to(device)


@torch.no_grad()
def generate(model, cfg, prompts, temperature, seed=1):
    """train_rl.rollout's sampling call on either path -> the rollout batch dict (B = P * G rows)."""
    ids, mask, pixels = prompts
    G = cfg.group_size
    gen = torch.Generator().manual_seed(seed)  # a CPU generator, as train_rl's
    model.eval()
    if cfg.share_prefix:
        out = model.generate(ids, pixels, attention_mask=mask, max_new_tokens=cfg.max_new_tokens, temperature=temperature,
                             pad_id=PAD, generator=gen, samples_per_prompt=G)
    else:
        out = model.generate(*(t.repeat_interleave(G, 0) for t in (ids, pixels)), attention_mask=mask.repeat_interleave(G, 0),
                             max_new_tokens=cfg.max_new_tokens, temperature=temperature, pad_id=PAD, generator=gen)
    model.train()
    return dict(prompt_ids=ids.repeat_interleave(G, 0), prompt_mask=mask.repeat_interleave(G, 0),
                pixels=pixels.repeat_interleave(G, 0), ids=out.ids, mask=out.mask, logp_old=out.logprobs)


def score_and_update(model, ref, optimizer, cfg, batch, clock):
    """Phases 2 and 3 of a step on a rollout batch -> (seconds score, seconds update, logp_old)."""
    device = batch["ids"].device
    t0 = clock()
    if cfg.share_prefix:  # train_rl's path: the old log-probs are the sampler's
        logp_old, logp_ref = batch["logp_old"], train_rl.reference_logprobs(cfg, ref, batch)
    else:  # the path before issue 18: every row's old log-probs recomputed, every row encoding its prompt
        logp_old = train_rl.score(model, batch, cfg.temperature, cfg.loss_impl)
        logp_ref = train_rl.score(ref, batch, cfg.temperature, cfg.loss_impl)
    t1 = clock()
    adv = torch.randn(batch["ids"].shape[0], generator=torch.Generator().manual_seed(2)).to(device)  # (B,)
    train_rl.update(cfg, model, optimizer, batch, logp_old, logp_ref, adv, batch["mask"].float(), device)
    return t1 - t0, clock() - t1, logp_old


def synced(clock, device):
    """The clock, read after the device has finished its queued work."""
    def read():
        if device.type == "cuda":
            torch.cuda.synchronize()
        return clock()
    return read


class Step:
    """One full RL step on one path, always from the same starting weights and optimizer state."""

    def __init__(self, model, ref, cfg, prompts, clock):
        self.model, self.ref, self.cfg, self.prompts, self.clock = model, ref, cfg, prompts, clock
        self.start = copy.deepcopy(model.state_dict())
        self.times = {k: [] for k in PHASES}

    def __call__(self):
        self.model.load_state_dict(self.start)
        optimizer = training.make_optimizer(self.model, self.cfg.lr, self.cfg.weight_decay)
        t0 = self.clock()
        batch = generate(self.model, self.cfg, self.prompts, self.cfg.temperature)
        t_gen = self.clock() - t0
        t_score, t_update, _ = score_and_update(self.model, self.ref, optimizer, self.cfg, batch, self.clock)
        for k, v in zip(PHASES, (t_gen, t_score, t_update)):
            self.times[k].append(v)


def equal_results(model, ref, cfgs, prompts, clock):
    """Same rollout batch on both paths: greedy tokens equal?, max |diff| of old log-probs and updated weights."""
    start = copy.deepcopy(model.state_dict())
    greedy = [generate(model, cfg, prompts, 0.0)["ids"] for cfg in cfgs]
    batch = generate(model, cfgs[0], prompts, cfgs[0].temperature)
    logp, weights = [], []
    for cfg in cfgs:
        model.load_state_dict(start)
        optimizer = training.make_optimizer(model, cfg.lr, cfg.weight_decay)
        logp.append(score_and_update(model, ref, optimizer, cfg, batch, clock)[2])
        weights.append(copy.deepcopy(model.state_dict()))
    model.load_state_dict(start)
    mask = batch["mask"]
    return dict(greedy_tokens_equal=bool(torch.equal(*greedy)),
                logp_old_max_diff=(logp[0] - logp[1])[mask].abs().max().item(),
                weights_max_diff=max((weights[0][k] - weights[1][k]).abs().max().item() for k in start))


def step_flops(step):
    """FLOPs of one call of `step` (matmuls and convolutions; attention on CUDA), counted, not estimated."""
    times = {k: list(v) for k, v in step.times.items()}
    with FlopCounterMode(display=False) as counter:
        step()
    step.times = times  # the counted run is not a timing
    return counter.get_total_flops()


def summary(med, check, reps, clock_name):
    def phases(m):
        return f"{m['step']:.2f} s = " + " + ".join(f"{k} {m[k]:.2f}" for k in PHASES)
    return (f"before {phases(med['before'])}; after {phases(med['after'])}; greedy tokens "
            f"{'identical' if check['greedy_tokens_equal'] else 'DIFFER'}, old log-prob max |diff| "
            f"{check['logp_old_max_diff']:.1e}, updated weights max |diff| {check['weights_max_diff']:.1e}; "
            f"median of {reps}" + ("" if clock_name == "wall" else f", {clock_name} clock"))


def run(n_prompts=8, new=128, warmup=1, reps=3, clock="wall", device="cpu", preset="toy", vocab=VOCAB, mfu=False):
    device, clock_name = torch.device(device), clock
    clock = synced(CLOCKS[clock_name], device)
    torch.manual_seed(0)
    model = VLM(vlm_config(preset, vocab, IMAGE_ID)).to(device).train()
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    cfgs = [rl_config(False, new, device), rl_config(True, new, device)]
    prompts = synthetic_prompts(model, n_prompts, vocab, device)
    check = equal_results(model, ref, cfgs, prompts, clock)
    steps = {name: Step(model, ref, cfg, prompts, clock) for name, cfg in zip(("before", "after"), cfgs)}
    for _ in range(warmup):
        for step in steps.values():
            step()
    for step in steps.values():
        step.times = {k: [] for k in PHASES}
    for _ in range(reps):  # A B A B ...
        for step in steps.values():
            step()
    med = {name: {k: median(v) for k, v in s.times.items()} for name, s in steps.items()}
    for m in med.values():
        m["step"] = sum(m[k] for k in PHASES)
    G = cfgs[1].group_size
    row = dict(benchmark=f"RL step (GRPO), seconds: shared prefix / per row ({preset}, {n_prompts} prompts x G={G}, "
                         f"{new} new)", nanopatho=med["after"]["step"], peer=med["before"]["step"],
               peer_name="the per-row path (--share_prefix false)", target=TARGET, lower_is_better=True,
               ratio=med["after"]["step"] / med["before"]["step"], note=summary(med, check, reps, clock_name),
               phases=med, check=check, identical=check["greedy_tokens_equal"])
    if mfu:
        flops, peak = step_flops(steps["after"]), matmul_peak(device, torch.float32, 8192 if device.type == "cuda" else 2048)
        row.update(flops_per_step=flops, peak_flops_per_s=peak, mfu=flops / med["after"]["step"] / peak)
        row["note"] += f"; MFU {100 * row['mfu']:.1f}% ({flops / 1e9:.1f} GFLOP per step, fp32 peak {peak / 1e12:.2f} TFLOP/s)"
    return [row]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=8, help="prompts per step (P)")
    p.add_argument("--new", type=int, default=128, help="new tokens per completion")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per path, after one warm-up each")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--clock", default="wall", choices=sorted(CLOCKS), help="wall time, or this thread's CPU time")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--preset", default="toy", choices=("toy", "small"), help="model size (the RL settings stay the toy preset's)")
    p.add_argument("--vocab", type=int, default=VOCAB, help="vocabulary size")
    p.add_argument("--mfu", action="store_true", help="also count the step's FLOPs and report MFU")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for r in run(args.prompts, args.new, reps=args.reps, clock=args.clock, device=args.device, preset=args.preset,
                 vocab=args.vocab, mfu=args.mfu):
        print(f"{r['benchmark']}: {r['ratio']:.2f}x (target <= {r['target']}x)\n  {r['note']}")


if __name__ == "__main__":
    main()
