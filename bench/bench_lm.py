"""LM training step (forward + backward + AdamW), tokens/s: nanopatho.lm.LM vs transformers Qwen2ForCausalLM.

Both models get the same config (toy preset dims, vocab 4096 like SynthPath's tokenizer), the same
weights (copied across and checked: identical logits), the same batch and the same AdamW settings;
the loss covers the same B*T targets (transformers gets them pre-shifted via shift_labels).
Repetitions alternate A B A B after warm-up; the figure is B*T / median step time.

    python bench/bench_lm.py                  # toy dims, batch 16 x 160 (the toy pretrain shape)
    python bench/bench_lm.py --batch 8 --seq 256 --threads 2
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.peers import interleaved, median, qwen2_peer  # noqa: E402
from nanopatho.lm import LM  # noqa: E402
from nanopatho.presets import lm_config  # noqa: E402

TARGET = 1.2  # issue 10: nanopatho >= 1.2x the tokens/s of transformers


def make_lm(preset="toy", vocab_size=4096, seed=0):
    torch.manual_seed(seed)
    return LM(lm_config(preset, vocab_size))


def logits_max_diff(lm, hf, ids):
    with torch.no_grad():
        return (lm(ids)[0] - hf(input_ids=ids).logits).abs().max().item()


def train_step_fn(model, opt, step):
    def run():
        opt.zero_grad(set_to_none=True)
        step().backward()
        opt.step()
    return run


def run(batch=16, seq=160, warmup=2, reps=15, preset="toy", vocab_size=4096, clock="wall"):
    lm = make_lm(preset, vocab_size)
    hf = qwen2_peer(lm)
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, vocab_size, (batch, seq + 1), generator=g)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()  # (B, T) inputs and next-token targets
    diff = logits_max_diff(lm, hf, x[:2])
    assert diff < 1e-4, f"nanopatho and transformers logits differ by {diff:.2e}: the weight mapping is wrong"
    lm.train(), hf.train()
    opt_a = torch.optim.AdamW(lm.parameters(), lr=1e-4, weight_decay=0.1)
    opt_b = torch.optim.AdamW(hf.parameters(), lr=1e-4, weight_decay=0.1)
    times = interleaved({
        "nanopatho": train_step_fn(lm, opt_a, lambda: lm(x, y)[1]),
        "peer": train_step_fn(hf, opt_b, lambda: hf(input_ids=x, labels=y, shift_labels=y).loss),
    }, warmup=warmup, reps=reps, clock=clock)
    ours, theirs = (batch * seq / median(times[k]) for k in ("nanopatho", "peer"))
    return [dict(benchmark=f"LM train step, tokens/s ({preset}, B={batch}, T={seq})", nanopatho=ours, peer=theirs,
                 peer_name="transformers Qwen2ForCausalLM", target=TARGET,
                 note=f"logits max |diff| {diff:.1e}; median of {reps}", times=times)]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=160)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", default="wall", choices=("wall", "cpu"), help="wall time or this thread's CPU time")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for r in run(args.batch, args.seq, reps=args.reps, clock=args.clock):
        print(f"{r['benchmark']}: nanopatho {r['nanopatho']:.0f}  transformers {r['peer']:.0f}  "
              f"ratio {r['nanopatho'] / r['peer']:.2f}x (target {r['target']}x)  [{r['note']}]")


if __name__ == "__main__":
    main()
