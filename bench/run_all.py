"""Run every benchmark against its peer in one process and print one table (issue 10).

    benchmark | nanopatho | peer | ratio | target | met?

Ratios come from the same run on the same machine, nanopatho and the peer timed in turn
(A B A B ... after warm-up, median of N). Results go to bench/results/latest.json; --markdown
prints that file as a markdown table for the README's Performance section.

    pip install --no-deps -r bench/requirements.txt   # the peers (bench-only; see bench/README.md for open_clip)
    python bench/run_all.py                     # ~5 min on 2 idle CPU cores, 1 thread
    python bench/run_all.py --threads 4 --only lm,generate
    python bench/run_all.py --clock cpu         # this thread's CPU time (a shared machine); MFU stays wall time
    python bench/run_all.py --markdown          # the saved table, as markdown
    python bench/run_all.py --with_loss         # also run bench/bench_loss.py (the RL loss) after the table
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from bench import bench_clip, bench_generate, bench_lm, bench_mfu, bench_rl_step  # noqa: E402

RESULTS = os.path.join(HERE, "results", "latest.json")
BENCHES = {"lm": bench_lm.run, "generate": bench_generate.run, "clip": bench_clip.run, "rl": bench_rl_step.run,
           "mfu": lambda clock: bench_mfu.run("cuda" if torch.cuda.is_available() else "cpu")}
COLUMNS = ("benchmark", "nanopatho", "peer", "ratio", "target", "met?")


def cells(r):
    """One result dict -> the six table cells (strings)."""
    if r["benchmark"].startswith("MFU"):
        return [r["benchmark"], f"{100 * r['nanopatho']:.1f}% MFU", "-", "-", "-", "-"]
    if r.get("error"):
        return [r["benchmark"], "error", "-", "-", "-", "-"]
    lower = r.get("lower_is_better", False)  # seconds (the RL step) rather than throughput
    number = "{:,.2f}" if lower else "{:,.0f}"
    ours, target = number.format(r["nanopatho"]), f"{'<=' if lower else '>='} {r['target']}x"
    if r["peer"] is None:
        return [r["benchmark"], ours, "n/a", "-", target, "-"]
    ratio = r["nanopatho"] / r["peer"]
    met = "yes" if (ratio <= r["target"] if lower else ratio >= r["target"]) else "NO"
    if r.get("identical") is False:
        met = "NO (tokens differ)"
    return [r["benchmark"], ours, number.format(r["peer"]), f"{ratio:.2f}x", target, met]


def table(results, markdown=False):
    rows = [cells(r) for r in results["rows"]]
    notes = [f"{r['benchmark']}: {r['note']}" for r in results["rows"]]
    head = (f"nanopatho benchmarks, {results['date']}: torch {results['torch']}, transformers "
            f"{results['transformers']}, {results['threads']} thread(s), {results['machine']}, "
            f"{results.get('clock', 'wall')} clock, {results['seconds']:.0f} s")
    if markdown:
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(c) + " |" for c in rows]
        return "\n".join([head, "", *lines, "", *(f"- {n}" for n in notes)])
    widths = [max(len(str(x)) for x in col) for col in zip(COLUMNS, *rows)]
    fmt = " | ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*COLUMNS), "-+-".join("-" * w for w in widths), *(fmt.format(*c) for c in rows)]
    return "\n".join([head, *lines, "notes:", *(f"  {n}" for n in notes)])


def version(module):
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def run(names, threads, clock="wall"):
    torch.set_num_threads(threads)
    print(f"torch.set_num_threads({threads}); torch.get_num_threads() = {torch.get_num_threads()}", flush=True)
    t0 = time.perf_counter()
    rows = []
    for name in names:
        t = time.perf_counter()
        try:
            out = BENCHES[name](clock=clock)
        except Exception as e:  # one broken peer must not hide the other rows
            out = [dict(benchmark=name, nanopatho=None, peer=None, target=None, error=True,
                        note=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}")]
        rows += out
        print(f"  {name}: {time.perf_counter() - t:.0f} s", flush=True)
    return dict(date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), torch=torch.__version__,
                transformers=version("transformers"), threads=threads, clock=clock,
                machine=f"{platform.machine()} {os.cpu_count()} cores" + (
                    f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
                seconds=time.perf_counter() - t0, rows=rows)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads for every benchmark (fixed for the run)")
    p.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated subset of {','.join(BENCHES)}")
    p.add_argument("--markdown", action="store_true", help="print bench/results/latest.json as markdown; run nothing")
    p.add_argument("--with_loss", action="store_true", help="also run bench/bench_loss.py after the table")
    p.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                   help="time the ratios by wall time, or by this thread's CPU time (a shared CPU machine)")
    p.add_argument("--readme", default=None, help="with --markdown: write the table into this README's Performance section")
    args = p.parse_args()
    if args.markdown:
        with open(RESULTS) as f:
            markdown = table(json.load(f), markdown=True)
        print(markdown)
        if args.readme:
            sys.path.insert(0, os.path.dirname(HERE))
            from nanopatho.report import rewrite_readme
            rewrite_readme(args.readme, f"From `{os.path.relpath(RESULTS)}`:\n\n{markdown}",
                           "<!-- bench:start -->", "<!-- bench:end -->")
        return
    names = args.only.split(",")
    unknown = set(names) - set(BENCHES)
    if unknown:
        p.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {list(BENCHES)}")
    results = run(names, args.threads, args.clock)
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(results, f, indent=1)
    print(table(results))
    print(f"saved {os.path.relpath(RESULTS)}")
    if args.with_loss:
        subprocess.run([sys.executable, os.path.join(HERE, "bench_loss.py")], check=False)


if __name__ == "__main__":
    main()
