"""Greedy generation with the KV cache, tokens/s: nanopatho LM.generate vs transformers generate.

Same weights (toy-preset LM, vocab 4096), same left-padded prompts (lengths 16..48), greedy,
exactly `new` tokens per row on both sides (no stop id; min_new_tokens = max_new_tokens), batch
32 and 64. The generated tokens must be identical; a mismatch is reported in the note with the
first differing position. Repetitions alternate A B A B after warm-up; the figure is
B * new / median wall time.

    python bench/bench_generate.py
    python bench/bench_generate.py --batches 64 --new 128
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.bench_lm import make_lm  # noqa: E402
from bench.peers import interleaved, median, qwen2_peer  # noqa: E402

TARGET = 2.0  # issue 10: nanopatho >= 2x the tokens/s of transformers generate
PAD = 0


def left_padded_prompts(batch, vocab_size, min_len=16, max_len=48, seed=0):
    """Random prompts of random lengths, left-padded with PAD -> (ids (B, T), mask (B, T))."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (batch,), generator=g)
    ids = torch.randint(1, vocab_size, (batch, max_len), generator=g)  # (B, T), never PAD
    mask = (torch.arange(max_len)[None, :] >= (max_len - lengths)[:, None]).long()  # (B, T) 1 = real
    return ids * mask, mask


def compare_tokens(ours, theirs):
    """'identical' or where the first difference is (row, step)."""
    if torch.equal(ours, theirs):
        return "identical tokens"
    diff = (ours != theirs).nonzero()
    first = diff[diff[:, 1].argmin()].tolist()
    return f"TOKENS DIFFER: {len(diff)} of {ours.numel()}, first at row {first[0]} step {first[1]}"


def run(batches=(32, 64), new=64, warmup=1, reps=7, vocab_size=4096, clock="wall"):
    lm = make_lm("toy", vocab_size).eval()
    hf = qwen2_peer(lm).eval()
    rows = []
    for batch in batches:
        ids, mask = left_padded_prompts(batch, vocab_size)
        T = ids.shape[1]

        def ours():
            return lm.generate(ids, mask, max_new_tokens=new, temperature=0.0, pad_id=PAD).ids  # (B, new)

        @torch.no_grad()
        def theirs():
            out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new, min_new_tokens=new,
                              eos_token_id=None, pad_token_id=PAD)
            return out[:, T:]  # (B, new)

        match = compare_tokens(ours(), theirs())
        times = interleaved({"nanopatho": ours, "peer": theirs}, warmup=warmup, reps=reps, clock=clock)
        a, b = (batch * new / median(times[k]) for k in ("nanopatho", "peer"))
        rows.append(dict(benchmark=f"greedy generate, tokens/s (toy, B={batch}, {new} new)", nanopatho=a, peer=b,
                         peer_name="transformers generate (DynamicCache)", target=TARGET,
                         note=f"{match}; median of {reps}", times=times, identical=match == "identical tokens"))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[32, 64])
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", default="wall", choices=("wall", "cpu"), help="wall time or this thread's CPU time")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for r in run(args.batches, args.new, reps=args.reps, clock=args.clock):
        print(f"{r['benchmark']}: nanopatho {r['nanopatho']:.0f}  transformers {r['peer']:.0f}  "
              f"ratio {r['nanopatho'] / r['peer']:.2f}x (target {r['target']}x)  [{r['note']}]")


if __name__ == "__main__":
    main()
