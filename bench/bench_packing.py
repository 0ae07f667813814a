"""Stage 1/2 train step on packed micro-batches vs one padded row per example (`--pack` of train_pretrain.py,
train_sft.py and stage 0).

Both collate the same 16 examples (nanopatho.data.collate_lm): "padded" gives each its own row, padded to
the longest; "packed" puts examples end to end (first-fit decreasing into rows of the longest example's
length, block-diagonal attention, positions restarting per example). Each rep times forward + backward +
AdamW of the toy VLM (random init) on one micro-batch, the two collations in turn (A B A B ...) on the
same rows and weights; the figure is the median per micro-batch over the batches, and the loss and
gradient of both are compared in the same run.

Example lengths: the rendered conversations of SynthPath's SFT files (sft_train.jsonl + sft_tumour.jsonl of
--data, as the toy speedrun trains on) with random token ids, one image each; without those files,
lengths drawn uniformly from 40..320.

    python bench/bench_packing.py                    # ~2 min on 2 idle CPU cores
    python bench/bench_packing.py --batches 8 --reps 3 --clock cpu
    python bench/bench_packing.py --data /path/to/synthpath --device cuda
"""

import argparse
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.peers import interleaved, median  # noqa: E402
from nanopatho.data import load_conversations  # noqa: E402
from nanopatho.next_token import Examples, batch_loss_sum, make_batch  # noqa: E402
from nanopatho.presets import vlm_config  # noqa: E402
from nanopatho.tokenizer import Tokenizer  # noqa: E402
from nanopatho.vlm import VLM  # noqa: E402

VOCAB, IMAGE_ID, PAD = 1513, 3, 0
MAX_LEN = 320  # train_sft's toy --max_seq_len


def example_lengths(data, n_image_tokens):
    """Rendered token counts of the SFT conversations under `data` (cut at MAX_LEN), or None without them."""
    paths = [os.path.join(data, name) for name in ("sft_train.jsonl", "sft_tumour.jsonl")]
    if not all(os.path.exists(p) for p in paths):
        return None
    tokenizer = Tokenizer.from_file(os.path.join(data, "tokenizer.json"))
    convs = [c for p in paths for c in load_conversations(p)[0]]
    return [min(len(tokenizer.render_chat(c["messages"], n_image_tokens)[0]), MAX_LEN) for c in convs]


def examples(model, lengths, n, seed):
    """n rows: bos, the image placeholders, random text to the drawn length (loss on the text)."""
    rng = random.Random(seed)
    k = model.n_image_tokens
    seqs = []
    for _ in range(n):
        length = rng.choice(lengths) if lengths else rng.randint(40, MAX_LEN)
        text = [rng.randrange(10, VOCAB) for _ in range(max(2, length - 1 - k))]
        seqs.append(([1] + [IMAGE_ID] * k + text, [0] * (1 + k) + [1] * len(text)))
    images = torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return Examples(seqs, list(range(n)), images)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/synthpath", help="SynthPath directory whose SFT lengths are used")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=6, help="micro-batches timed per rep")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--clock", default="wall", choices=("wall", "cpu"))
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = VLM(vlm_config("toy", VOCAB, IMAGE_ID)).to(device)
    lengths = example_lengths(args.data, model.n_image_tokens)
    rows = examples(model, lengths, args.batch_size * args.batches, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batches = {pack: [make_batch(rows, list(range(b * args.batch_size, (b + 1) * args.batch_size)), PAD, None, False,
                                 device, pack) for b in range(args.batches)] for pack in (False, True)}

    def step(pack):
        def run():
            for batch in batches[pack]:
                loss_sum, n = batch_loss_sum(model, batch)
                (loss_sum / n).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
        return run

    # equal results, checked on the first micro-batch before any update
    grads, losses = {}, {}
    for pack in (False, True):
        loss_sum, n = batch_loss_sum(model, batches[pack][0])
        (loss_sum / n).backward()
        losses[pack] = loss_sum.item()
        grads[pack] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        model.zero_grad(set_to_none=True)
    times = interleaved({"padded": step(False), "packed": step(True)}, warmup=1, reps=args.reps, clock=args.clock)
    cells = {pack: sum(b["input_ids"].numel() for b in batches[pack]) for pack in (False, True)}
    real = sum(int((b["attention_mask"] > 0).sum()) for b in batches[True])
    t_pad, t_pack = (median(times[name]) / args.batches for name in ("padded", "packed"))
    print(f"toy VLM train step (fwd + bwd + AdamW), B={args.batch_size}, {args.batches} micro-batches x "
          f"{args.reps} reps, lengths from {'SynthPath SFT' if lengths else 'uniform 40..320'}, {args.clock} clock, "
          f"{torch.get_num_threads()} thread(s), {device}")
    print("| collation | token cells computed | real tokens / cells | s per micro-batch | real tokens/s |")
    print("|---|---|---|---|---|")
    for name, pack, t in (("padded", False, t_pad), ("packed", True, t_pack)):
        print(f"| {name} | {cells[pack]:,} | {real / cells[pack]:.3f} | {t:.3f} | {real / args.batches / t:,.0f} |")
    print(f"packed / padded time: {t_pack / t_pad:.2f}x; loss sum |diff| {abs(losses[True] - losses[False]):.1e} "
          f"(of {losses[False]:.1f}), gradient max |diff| {(grads[True] - grads[False]).abs().max().item():.1e}")


if __name__ == "__main__":
    main()
