"""Streaming data (--stream): corpora larger than memory, read sample by sample, images decoded
lazily in DataLoader worker processes, split by rank and worker, resumable.

    source = open_pairs("data/quilt/shards/")          # WebDataset .tar shards, a .jsonl or a .csv
    stream = Stream(source, plan, seed=0, num_workers=2, skip_bad=True)
    stream.resume_at(saved_state, step)                  # optional: where a snapshot left off
    batch = next(stream)                                 # this rank's next micro-batch
    stream.state()                                       # JSON-able position, saved in each snapshot

A `plan` says what a stage makes of the data (each training script has one): plan.sample(item)
turns a manifest item into a sample (decoded image, token ids); plan.rows(k) is how many samples
micro-batch k takes; plan.collate(samples, k) builds it with the collators the preloaded path uses.

Who reads what. There are S = world size x W workers "slots"; rank r's worker role j is slot r*W + j.
- WebDataset shards: each epoch the shard list is permuted by (seed, epoch) and slot s reads shards
  s, s + S, s + 2S, ... of that order front to back, through a shuffle buffer (`shuffle_buffer`). The
  buffer holds sample *locations* (a tar's headers are read as the shard is scanned, a sample's bytes
  when it leaves the buffer), so a large buffer costs no memory and fast-forwarding on resume reads
  headers only. With fewer shards than slots every slot scans every shard and keeps every S-th sample.
- JSONL / CSV: one pass at start-up records where each row starts (16 bytes a row); each epoch the
  rows are permuted by (seed, epoch) and slot s takes rows s, s + S, ... of it, each read by seek.
Each slot's order is a pure function of (seed, epoch, slot): within an epoch no sample is read by two
slots or twice by one, and every sample is read once. (Slots finish their epochs at different times.)

Which worker makes which batch: a DataLoader asks its workers in turn, so the rank's k-th micro-batch
comes from role k mod W. A batch carries its role's position (epoch, samples pulled in that epoch) and
the number of bad samples skipped to make it; the main process keeps, per role, the position of the
last batch it consumed (the workers' read-ahead is never counted). That is the snapshot's data state.
On --resume each role restarts there and the first batch goes to the role it would have come from, so
the resumed run sees the uninterrupted run's batches, bitwise, when --num_workers and the world size are
unchanged. With another worker count or world size the saved positions do not map onto the new slots:
the stream restarts at the start of the earliest saved epoch in the new layout (samples of that epoch
read before the interruption are read again) and a warning says so.

Bad samples. A worker never raises (a DataLoader would wrap the message in a traceback): it sends the
one-line DataError ("file:line: ..." / "shard.tar:key: ...") to the main process, which raises it; with
skip_bad the sample is skipped and counted instead. A shard that cannot be read to its end counts once
(its readable samples are kept); a sample cut short by it counts as well. Counts travel with the batches:
Stream.n_bad is this rank's count over the batches it consumed; `total_bad` sums it over ranks.
"""

import array
import csv
import itertools
import os
import posixpath
import random
import sys
import tarfile

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from nanopatho import data, dist
from nanopatho.data import BOM, DataError
from nanopatho.training import generator_for, hash_ints, print0

MAX_OPEN_SHARDS = 4  # tar files a worker keeps open (its shuffle buffer spans the last few shards)
MAX_EMPTY_EPOCHS = 3  # a slot that reads no good sample in this many epochs in a row stops the run


class Bad:
    """A sample or shard that could not be read: its one-line message. `fatal` ones end the run even
    with skip_bad (a slot with nothing to read would otherwise loop for ever)."""

    def __init__(self, message, fatal=False):
        self.message, self.fatal = message, fatal


class _Files:
    """Per-process open files: after a fork a child must not share its parent's file offsets."""

    def __init__(self):
        self.pid, self.open = None, {}

    def get(self, path):
        if self.pid != os.getpid():
            self.pid, self.open = os.getpid(), {}
        if path not in self.open:
            if len(self.open) >= MAX_OPEN_SHARDS:
                self.open.pop(next(iter(self.open))).close()
            self.open[path] = open(path, "rb")
        return self.open[path]

    def __getstate__(self):  # a spawned worker opens its own files
        return {"pid": None, "open": {}}


# ---------------------------------------------------------------------------------------------
# sources: where the samples are, in which order each slot reads them


def _jsonl_index(path):
    """Byte offset and line number of every non-empty line (the first line's byte-order mark skipped)."""
    offsets, lines = array.array("q"), array.array("q")
    pos = 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            start = len(BOM) if lineno == 1 and line.startswith(BOM) else 0
            if line[start:].strip():
                offsets.append(pos + start)
                lines.append(lineno)
            pos += len(line)
    return np.frombuffer(offsets, np.int64), np.frombuffer(lines, np.int64)


def _csv_index(path, keys, sep):
    """Byte offset and (last) line number of every CSV record, and the column index of each key."""
    starts, offsets, lines = array.array("q"), array.array("q"), array.array("q")
    with open(path, "rb") as f:
        def physical_lines():  # records may span lines (a quoted newline): note where each line starts
            pos = 0
            for raw in f:
                starts.append(pos)
                pos += len(raw)
                yield raw.decode("utf-8")

        reader = csv.reader(physical_lines(), delimiter=sep)
        try:
            header = next(reader, [])
            header = [header[0].removeprefix("\ufeff"), *header[1:]] if header else header
            for key in keys:
                if key not in header:
                    raise DataError(f"{path}:1: missing column '{key}' (columns: {header}; separator {sep!r})")
            while True:
                first = reader.line_num  # lines read so far: this record starts on the next one
                row = next(reader, None)
                if row is None:
                    break
                if row:  # a blank line gives []
                    offsets.append(starts[first])
                    lines.append(reader.line_num)
        except (UnicodeDecodeError, csv.Error) as e:
            raise DataError(f"{path}:{reader.line_num + 1}: unreadable CSV ({str(e).splitlines()[0]})") from None
    return np.frombuffer(offsets, np.int64), np.frombuffer(lines, np.int64), [header.index(k) for k in keys]


class IndexedFile:
    """A JSONL or CSV manifest read row by row by seek; parse(source, raw) -> item, raw being the
    line's bytes (JSONL) or {"image", "caption"} (CSV, columns csv_keys)."""

    def __init__(self, path, parse, *, csv_keys=None, csv_sep=","):
        self.path, self.parse, self.csv_sep = os.fspath(path), parse, csv_sep
        self.name = self.path
        data.check_file(self.path)
        if self.path.endswith(".json"):
            raise DataError(f"{self.path}: --stream reads .jsonl, .csv, .tsv or WebDataset .tar; "
                            f"write this JSON array as JSONL (one object per line)")
        if csv_keys is None:
            self.offsets, self.lines = _jsonl_index(self.path)
            self.columns = None
        else:
            self.offsets, self.lines, self.columns = _csv_index(self.path, csv_keys, csv_sep)
        self.rows = np.arange(len(self.offsets))  # the rows this source serves (select() narrows them)
        self.files = _Files()

    def __len__(self):
        return len(self.rows)

    def select(self, keep):
        """The same file serving only rows where keep (bool array over all rows) is true."""
        out = object.__new__(IndexedFile)
        out.__dict__.update(self.__dict__, rows=self.rows[keep], files=_Files())
        return out

    def epoch_refs(self, epoch, seed, slot, n_slots):
        """Slot `slot`'s rows of epoch `epoch`: every n_slots-th row of a (seed, epoch) permutation."""
        perm = torch.randperm(len(self.rows), generator=generator_for(seed, 7, epoch)).numpy()
        return (int(r) for r in self.rows[perm[slot::n_slots]])

    def in_order(self):
        return (int(r) for r in self.rows)

    def read(self, row):
        """Row `row` -> parse(source "file:line", raw)."""
        f = self.files.get(self.path)
        source = f"{self.path}:{self.lines[row]}"
        f.seek(int(self.offsets[row]))
        if self.columns is None:
            return self.parse(source, f.readline())
        try:
            fields = next(csv.reader((line.decode("utf-8") for line in f), delimiter=self.csv_sep))
        except (UnicodeDecodeError, csv.Error) as e:
            raise DataError(f"{source}: unreadable CSV ({str(e).splitlines()[0]})") from None
        image, caption = (fields[c] if c < len(fields) else None for c in self.columns)
        return self.parse(source, {"image": image, "caption": caption})


def shuffle_buffer(items, size, rng):
    """WebDataset's shuffle: fill a buffer of `size`, then each new item takes the place of a uniformly
    chosen one (rng.randrange), which leaves; at the end the rest leaves in rng.shuffle order. Bad
    markers pass straight through. size <= 1 keeps the order."""
    if size <= 1:
        yield from items
        return
    buffer = []
    for item in items:
        if isinstance(item, Bad):
            yield item
        elif len(buffer) < size:
            buffer.append(item)
        else:
            j = rng.randrange(size)
            yield buffer[j]
            buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer


class TarShards:
    """WebDataset shards: samples are runs of consecutive tar members sharing a key (the name up to
    its first dot), {key}.jpg|png + {key}.txt|json. Refs are (shard index, key, {ext: (offset, size)})."""

    def __init__(self, shards, buffer=1000):
        self.shards, self.buffer = [os.fspath(s) for s in shards], buffer
        many = f"{os.path.dirname(self.shards[0])} ({len(self.shards)} shards)"
        self.name = self.shards[0] if len(self.shards) == 1 else many
        for shard in self.shards:
            data.check_file(shard)
        self.files = _Files()

    def scan(self, i):
        """The refs of shard i from its headers (no image bytes read); a Bad last if it cannot be read to its end."""
        path, pending, error = self.shards[i], None, None
        try:
            with tarfile.open(path, "r:") as tar:  # "r:": uncompressed, so members can be read by offset later
                for member in tar:
                    directory, base = posixpath.split(member.name)
                    if not member.isfile() or "." not in base or base.startswith("."):
                        continue
                    stem, ext = base.split(".", 1)
                    key = posixpath.join(directory, stem)
                    if pending is not None and pending[1] == key:
                        pending[2][ext.lower()] = (member.offset_data, member.size)
                        continue
                    if pending is not None:
                        yield pending
                    pending = (i, key, {ext.lower(): (member.offset_data, member.size)})
        except (tarfile.TarError, EOFError, OSError) as e:
            error = Bad(f"{path}: unreadable tar shard ({str(e).splitlines()[0]})")
        if pending is not None:
            yield pending
        if error is not None:
            yield error

    def epoch_refs(self, epoch, seed, slot, n_slots):
        order = torch.randperm(len(self.shards), generator=generator_for(seed, 5, epoch)).tolist()
        if len(order) >= n_slots:
            refs = itertools.chain.from_iterable(self.scan(i) for i in order[slot::n_slots])
        else:  # fewer shards than slots: every slot scans them all and keeps every n_slots-th sample
            everything = itertools.chain.from_iterable(self.scan(i) for i in order)
            refs = (ref for n, ref in enumerate(everything) if n % n_slots == slot)
        return shuffle_buffer(refs, self.buffer, random.Random(hash_ints(seed, 13, epoch, slot)))

    def in_order(self):
        return itertools.chain.from_iterable(self.scan(i) for i in range(len(self.shards)))

    def read(self, ref):
        """A ref -> {"image": bytes, "caption", "source": "shard.tar:key"} (data.tar_pair)."""
        i, key, parts = ref
        source, f = f"{self.shards[i]}:{key}", self.files.get(self.shards[i])
        payloads = {}
        for ext, (offset, size) in parts.items():
            f.seek(offset)
            payloads[ext] = f.read(size)
            if len(payloads[ext]) != size:
                raise DataError(f"{source}: .{ext} is cut short ({len(payloads[ext])} of {size} bytes: "
                                f"truncated shard)")
        return data.tar_pair(source, payloads)


def open_pairs(path, *, root=None, allow_outside_root=False, csv_img_key="filepath", csv_caption_key="title",
               csv_sep=",", shuffle_buffer_size=1000):
    """Image-text pairs as a streaming source: .tar / a directory or list of .tar, .jsonl, .csv, .tsv."""
    if data.is_tar(path):
        return TarShards(data.shards(path), shuffle_buffer_size)
    path = os.fspath(path)
    root = data.data_root(path, root)
    parse = _Parse(data.json_pair, root=root, allow_outside_root=allow_outside_root)
    if path.endswith((".csv", ".tsv")):
        sep = "\t" if path.endswith(".tsv") else csv_sep
        return IndexedFile(path, parse, csv_keys=(csv_img_key, csv_caption_key), csv_sep=sep)
    if path.endswith((".jsonl", ".json")):
        return IndexedFile(path, parse)
    raise DataError(f"{path}: unsupported pairs format (use .jsonl, .csv, .tsv, .tar or a directory of .tar)")


def open_conversations(path, *, root=None, allow_outside_root=False):
    path = os.fspath(path)
    return IndexedFile(path, _Parse(data.conversation, root=data.data_root(path, root),
                                    allow_outside_root=allow_outside_root))


def open_records(path, required, *, root=None, allow_outside_root=False, image_key="image"):
    path = os.fspath(path)
    return IndexedFile(path, _Parse(data.record, required=required, root=data.data_root(path, root),
                                    allow_outside_root=allow_outside_root, image_key=image_key))


class _Parse:
    """parse(source, raw) = fn(source, raw, **kwargs): a class, not a lambda, so a spawned worker can unpickle it."""

    def __init__(self, fn, **kwargs):
        self.fn, self.kwargs = fn, kwargs

    def __call__(self, source, raw):
        return self.fn(source, raw, **self.kwargs)


def head(source, n, skip_bad=False):
    """The first n good items in file order (a validation set: bounded memory) and the bad ones counted."""
    items, n_bad = [], 0
    for ref in source.in_order():
        if len(items) >= n:
            break
        try:
            if isinstance(ref, Bad):
                raise DataError(ref.message)
            items.append(source.read(ref))
        except DataError as e:
            if not skip_bad:
                raise
            n_bad += 1
            print(f"skipping bad sample: {e}", file=sys.stderr)
    return items, n_bad


# ---------------------------------------------------------------------------------------------
# batches: made in the workers, consumed and counted in the main process


class _RoleBatches(IterableDataset):
    """What one DataLoader worker (or the main process, num_workers 0) runs: its role's batches."""

    def __init__(self, source, plan, seed, skip_bad, rank, world, n_roles, first_batch, positions):
        self.source, self.plan, self.seed, self.skip_bad = source, plan, seed, skip_bad
        self.rank, self.world, self.n_roles = rank, world, n_roles
        self.first_batch, self.positions = first_batch, positions

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        role = (worker + self.first_batch) % self.n_roles  # batch first_batch + worker is this role's
        samples = self._samples(*self.positions[role], slot=self.rank * self.n_roles + role)
        n_printed = 0
        for k in itertools.count(self.first_batch + worker, self.n_roles):
            rows, n_bad, want = [], 0, self.plan.rows(k)
            while len(rows) < want:
                epoch, cursor, sample = next(samples)
                if isinstance(sample, Bad):
                    if sample.fatal or not self.skip_bad:
                        yield {"error": sample.message}
                        return
                    n_bad += 1
                    n_printed += 1
                    if n_printed <= data.N_SKIP_MESSAGES:
                        print(f"skipping bad sample: {sample.message}", file=sys.stderr, flush=True)
                    continue
                rows.append(sample)
            yield {"batch": self.plan.collate(rows, k), "role": role, "position": [epoch, cursor], "bad": n_bad}

    def _samples(self, epoch, cursor, slot):
        """(epoch, refs pulled in it, sample or Bad) for one slot, epoch after epoch, from (epoch, cursor)."""
        n_slots, empty_epochs = self.world * self.n_roles, 0
        where = f"rank {self.rank}'s worker {slot % self.n_roles} (one of {n_slots} rank x worker slots)"
        while True:
            n_good = 0
            for ref in itertools.islice(self.source.epoch_refs(epoch, self.seed, slot, n_slots), cursor, None):
                cursor += 1
                sample = ref if isinstance(ref, Bad) else self._load(ref)
                n_good += not isinstance(sample, Bad)
                yield epoch, cursor, sample
            if cursor == 0:  # a slot's share of an epoch is empty only if there are fewer samples than slots
                yield epoch, 0, Bad(f"{self.source.name}: nothing for {where} to read; use fewer --num_workers",
                                    fatal=True)
                return
            empty_epochs = empty_epochs + 1 if n_good == 0 else 0
            if empty_epochs == MAX_EMPTY_EPOCHS:  # every epoch reshuffles the shares: a few empty ones can happen
                yield epoch, cursor, Bad(f"{self.source.name}: no readable sample for {where} in {MAX_EMPTY_EPOCHS} "
                                         f"epochs", fatal=True)
                return
            epoch, cursor = epoch + 1, 0

    def _load(self, ref):
        try:
            return self.plan.sample(self.source.read(ref))
        except DataError as e:
            return Bad(str(e))


class Stream:
    """The training loop's side of a stream: next() -> the rank's next micro-batch (on the CPU)."""

    def __init__(self, source, plan, *, seed, num_workers=0, skip_bad=False):
        self.source, self.plan, self.seed, self.skip_bad = source, plan, seed, skip_bad
        self.num_workers, self.n_roles = num_workers, max(1, num_workers)  # 0 workers: one role, in process
        self.batches, self.n_bad = 0, 0
        self.positions = [[0, 0] for _ in range(self.n_roles)]  # per role: (epoch, refs pulled in it)
        self._iter = None

    def state(self):
        return {"batches": self.batches, "positions": self.positions, "bad": self.n_bad,
                "workers": self.n_roles, "world": dist.world_size()}

    def resume_at(self, saved, step=None):
        """Continue from this rank's saved state (None: from the start); see the module docstring."""
        if saved is None:
            return
        self.batches, self.n_bad = saved["batches"], saved["bad"]
        if saved["workers"] == self.n_roles and saved["world"] == dist.world_size():
            self.positions = [list(p) for p in saved["positions"]]
            return
        epoch = min(p[0] for p in saved["positions"])
        self.positions = [[epoch, 0] for _ in range(self.n_roles)]
        print0(f"warning: the data position was saved with {saved['workers']} worker(s) x {saved['world']} rank(s), "
               f"this run has {self.n_roles} x {dist.world_size()}: the stream restarts at the start of epoch {epoch} "
               f"in the new layout (samples of that epoch read before the interruption are read again)")

    def __iter__(self):
        return self

    def __next__(self):
        if self._iter is None:
            batches = _RoleBatches(self.source, self.plan, self.seed, self.skip_bad, dist.rank(), dist.world_size(),
                                   self.n_roles, self.batches, [list(p) for p in self.positions])
            # own generator: a DataLoader otherwise draws its base seed from the global RNG the snapshot restores
            loader = DataLoader(batches, batch_size=None, num_workers=self.num_workers,
                                generator=torch.Generator().manual_seed(self.seed),
                                prefetch_factor=2 if self.num_workers else None)
            self._iter = iter(loader)
        out = next(self._iter)
        if "error" in out:
            self.close()
            raise DataError(out["error"])
        self.positions[out["role"]] = out["position"]
        self.batches += 1
        self.n_bad += out["bad"]
        return out["batch"]

    def close(self):
        """Stop the worker processes (they also stop when the main process ends)."""
        self._iter = None


class InMemory:
    """The preloaded path behind the Stream interface: micro-batch k = make(k); nothing to save."""

    def __init__(self, make, batches_per_step=1):
        self.make, self.batches_per_step, self.batches, self.n_bad = make, batches_per_step, 0, 0

    def state(self):
        return None

    def resume_at(self, saved, step):
        self.batches = step * self.batches_per_step

    def __iter__(self):
        return self

    def __next__(self):
        self.batches += 1
        return self.make(self.batches - 1)

    def close(self):
        pass


def total_bad(stream, device="cpu"):
    """Bad samples skipped over every rank's consumed batches."""
    return int(dist.all_reduce_sum(torch.tensor(float(stream.n_bad), device=device)).item())
