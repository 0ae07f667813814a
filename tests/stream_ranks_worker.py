"""Run under torchrun by tests/test_e2e_stream.py: every rank streams the WebDataset shards in SHARDS
with 2 DataLoader workers and writes, for each micro-batch it consumed, the epoch of the role that made
it and the sources of its samples, to OUT/rank{r}.json.

    torchrun --standalone --nproc_per_node=2 tests/stream_ranks_worker.py SHARDS OUT N_BATCHES BATCH_SIZE
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nanopatho import dist, stream  # noqa: E402
from nanopatho.data import image_tensor  # noqa: E402

WORKERS = 2


class SourcePlan:
    """Decode each image (as a training plan does), keep only the sample's source."""

    def __init__(self, batch_size):
        self.batch_size = batch_size

    def rows(self, k):
        return self.batch_size

    def sample(self, item):
        image_tensor(item["image"], item["source"], 8)
        return item["source"]

    def collate(self, samples, k):
        return samples


def main(shards, out, n_batches, batch_size):
    dist.init("cpu")
    s = stream.Stream(stream.open_pairs(shards, shuffle_buffer_size=4), SourcePlan(batch_size), seed=0,
                      num_workers=WORKERS)
    rows = []
    for k in range(n_batches):
        sources = next(s)
        rows.append({"epoch": s.positions[k % WORKERS][0], "sources": sources})  # batch k came from role k % 2
    s.close()
    with open(os.path.join(out, f"rank{dist.rank()}.json"), "w") as f:
        json.dump(rows, f)
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
