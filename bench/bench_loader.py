"""--stream's loader throughput: images per second read from WebDataset shards, decoded, resized and
augmented (flips, 90-degree rotations, HED stain jitter) into training batches, at 64 px and 224 px,
with 0, 1 and 2 DataLoader workers (not run by CI).

The corpus is generated: --images JPEG tiles of 256 x 256 (smooth random colour fields plus noise, about
the size of a Quilt-1M tile after resizing), in shards of 100. Each configuration makes --batches
batches of --batch_size after one warm-up batch (worker start-up is not counted); the configurations
are timed in turn, --repeats rounds, and the median is reported. On a machine shared with other jobs
the absolute numbers move; the ratios between worker counts are what to read.

    python bench/bench_loader.py
    python bench/bench_loader.py --sizes 224 --workers 0,2 --repeats 5
"""

import argparse
import io
import os
import sys
import tarfile
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.peers import median  # noqa: E402
from nanopatho import stream  # noqa: E402
from nanopatho.data import augment, image_tensor  # noqa: E402
from nanopatho.training import generator_for  # noqa: E402


def tile(rng, size=256):
    """A smooth random colour field with pixel noise, as JPEG bytes."""
    coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
    pixels = np.clip(np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (size, size, 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_corpus(root, n_images, per_shard=100, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for s in range(0, n_images, per_shard):
        with tarfile.open(os.path.join(root, f"shard-{s // per_shard:05d}.tar"), "w") as tar:
            for i in range(s, min(s + per_shard, n_images)):
                for ext, payload in (("jpg", tile(rng)), ("txt", f"tile {i}".encode())):
                    info = tarfile.TarInfo(f"{i:07d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return root


class PixelPlan:
    """Decode + resize/crop in the worker; batches augmented there too, as training does."""

    def __init__(self, size, batch_size):
        self.size, self.batch_size = size, batch_size

    def rows(self, k):
        return self.batch_size

    def sample(self, item):
        return image_tensor(item["image"], item["source"], self.size)  # (3, S, S) uint8

    def collate(self, samples, k):
        return augment(torch.stack(samples), generator_for(0, k))  # (B, 3, S, S) float32


def images_per_second(corpus, size, workers, batches, batch_size):
    s = stream.Stream(stream.open_pairs(corpus), PixelPlan(size, batch_size), seed=0, num_workers=workers)
    next(s)  # warm-up: workers start, first batch
    t0 = time.perf_counter()
    for _ in range(batches):
        next(s)
    seconds = time.perf_counter() - t0
    s.close()
    return batches * batch_size / seconds


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="64,224", help="output sizes in pixels")
    p.add_argument("--workers", default="0,1,2", help="DataLoader worker counts")
    p.add_argument("--images", type=int, default=1000, help="tiles in the generated corpus")
    p.add_argument("--batches", type=int, default=12, help="timed batches per measurement")
    p.add_argument("--batch_size", type=int, default=32, help="images per batch")
    p.add_argument("--repeats", type=int, default=3, help="rounds over the configurations (median reported)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sizes, workers = [int(x) for x in args.sizes.split(",")], [int(x) for x in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_corpus(os.path.join(tmp, "shards"), args.images)
        configs = [(s, w) for s in sizes for w in workers]
        runs = {c: [] for c in configs}
        for _ in range(args.repeats):
            for size, w in configs:
                runs[(size, w)].append(images_per_second(corpus, size, w, args.batches, args.batch_size))
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, main-process threads {args.threads}, "
          f"{args.images} JPEG tiles 256 px, batch {args.batch_size}, median of {args.repeats}")
    print(f"| output size | workers | images/s | vs {workers[0]} workers |")
    print("|---|---|---|---|")
    for size, w in configs:
        rate, base = median(runs[(size, w)]), median(runs[(size, workers[0])])
        print(f"| {size} px | {w} | {rate:,.0f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
