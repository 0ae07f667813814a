"""Peak memory of a 200-step toy pretrain run, --stream vs preloaded, on generated WebDataset corpora of
2,000 and 50,000 image-caption pairs (issue 17's measurement; not run by CI).

Each corpus: 64 px JPEG tiles (smooth random colour fields) in shards of 1,000, captions cycled from
<data>/captions_train.jsonl, and <data>'s tokenizer, textbook and validation captions. Each run is
`train_pretrain.py --preset toy --max_steps 200` started here; while it runs, every 0.2 s, the
proportional set size (PSS: shared pages split between the processes sharing them) of the script and
its DataLoader workers is summed from /proc/<pid>/smaps_rollup. Reported: the peak of that sum, and
the peak RSS of the main process alone (getrusage of the child: what `/usr/bin/time -v` calls
"Maximum resident set size"), and the wall time.

    python data/synthpath/prepare.py --out data/synthpath --seed 0     # tokenizer, captions, textbook
    python bench/bench_stream_memory.py --data data/synthpath --out /tmp/rss
    python bench/bench_stream_memory.py --pairs 2000 --modes stream --steps 20    # a quick look
"""

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tile(rng, size=64):
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_corpus(root, n_pairs, captions, per_shard=1000, seed=0):
    """n_pairs generated tiles with cycled captions, as WebDataset shards under root (skipped if there)."""
    if os.path.isdir(root) and len(os.listdir(root)) == -(-n_pairs // per_shard):
        return root
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    for s in range(0, n_pairs, per_shard):
        with tarfile.open(os.path.join(root, f"shard-{s // per_shard:05d}.tar"), "w") as tar:
            for i in range(s, min(s + per_shard, n_pairs)):
                for ext, payload in (("jpg", tile(rng)), ("txt", captions[i % len(captions)].encode())):
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return root


def tree_pss_kib(pid):
    """Summed PSS (KiB) of pid and its descendants."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
    return total


def measure(cmd, log_path):
    """Run cmd; (peak summed PSS MiB of its process tree, peak RSS MiB of the main process, seconds)."""
    t0, peak = time.time(), 0
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT))
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # usage: this child's own rusage
            if pid:
                break
            peak = max(peak, tree_pss_kib(proc.pid))
            time.sleep(0.2)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed; see {log_path}")
    return peak / 1024, usage.ru_maxrss / 1024, time.time() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/synthpath", help="SynthPath directory (tokenizer, captions, textbook)")
    p.add_argument("--out", default="/tmp/nanopatho_rss", help="where corpora and run directories go")
    p.add_argument("--pairs", default="2000,50000", help="corpus sizes")
    p.add_argument("--modes", default="stream,preload", help="stream (--stream --num_workers 2) and/or preload")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    p.add_argument("--num_workers", type=int, default=2, help="--stream's DataLoader workers")
    args = p.parse_args()
    with open(os.path.join(args.data, "captions_train.jsonl")) as f:
        captions = [json.loads(line)["caption"] for line in f if line.strip()]
    rows = []
    for n in (int(x) for x in args.pairs.split(",")):
        corpus = write_corpus(os.path.join(args.out, f"pairs_{n}"), n, captions)
        for mode in args.modes.split(","):
            run_dir = os.path.join(args.out, f"run_{mode}_{n}")
            cmd = [sys.executable, os.path.join(ROOT, "train_pretrain.py"), "--preset", "toy", "--data", args.data,
                   "--train_file", corpus, "--max_steps", str(args.steps), "--eval_every", "0", "--save_every", "0",
                   "--num_threads", "1", "--device", "cpu", "--out_dir", run_dir]
            cmd += ["--stream", "--num_workers", str(args.num_workers)] if mode == "stream" else []
            rows.append((mode, n, *measure(cmd, run_dir + ".log")))
            print(f"{mode:8s} {n:6d} pairs: peak PSS {rows[-1][2]:7.0f} MiB (all processes), main RSS "
                  f"{rows[-1][3]:7.0f} MiB, {rows[-1][4]:5.0f} s", flush=True)
    print("| path | pairs | peak PSS, all processes (MiB) | peak RSS, main process (MiB) | wall (s) |")
    print("|---|---|---|---|---|")
    for mode, n, pss, rss, seconds in rows:
        print(f"| {mode} | {n:,} | {pss:,.0f} | {rss:,.0f} | {seconds:,.0f} |")


if __name__ == "__main__":
    main()
