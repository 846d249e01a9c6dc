"""Streamed datasets (`StreamingImageDataset`): a `datasets.IterableDataset` read by one stream per process and
DataLoader worker, each through its own shuffle buffer, anew each epoch, resumable exactly from a small position
(which `vqhit.data.batches.TrainingBatches` keeps).
"""
from __future__ import annotations

import copy
from collections import deque

import datasets
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node
from torch.utils.data import get_worker_info

from .. import distributed
from ..errors import UsageError
from .config import DataConfig
from .images import _DRAIN, _SHARDS, _SLOTS, _UPSAMPLED, _ImageRows, _derive_seed


class StreamingImageDataset(_ImageRows, torch.utils.data.IterableDataset):
    """Iterable dataset over a `datasets.IterableDataset`; skipped images are left out of the stream.

    The rows are split into ``world_size * num_workers`` *streams*, one per process and DataLoader worker. Each epoch
    the shards are put in a new order (seeded by ``(seed, epoch)``) and dealt to the streams (shard i of that order to
    stream i mod streams) when the shard count is a multiple of the stream count; otherwise every stream reads every
    shard and keeps one row in `streams`. A stream reads ``cfg.open_shards`` of its shards at a time, one row from each
    in turn, into a shuffle buffer of ``cfg.shuffle_buffer`` rows: each draw takes the row of a random slot and puts
    the next row read in its place, as `datasets.IterableDataset.shuffle` does; at the epoch's end the buffer is
    emptied in random order. Every random choice is seeded by ``(seed, epoch, stream, ...)``: `shuffle` False reads
    the shards in their order, one at a time, without a buffer.

    A position in a stream is small and exact (``item["stream_position"]``, carried to the batch by
    `collate_images`): the epoch, the number of draws, and where the shard readers were at the oldest row still in
    the buffer. Which slot holds which row follows from the slot draws alone (not from the data), so resuming from a
    position (`training_view`) reads the rows again from that point -- about ``shuffle_buffer * ln(shuffle_buffer)``
    raw rows, plus the skipped start of each open shard -- and decodes only the rows it yields.

    ``index`` is ``row * streams + stream`` (``row`` counting the rows the stream read in the epoch), so augmentations
    repeat exactly for the same process and worker counts. Iterating gives one epoch (`set_epoch`); the view that
    `TrainingBatches` iterates goes on from epoch to epoch, each stream on its own, and lets DataLoader worker ``w``
    play stream ``w + rotation``: a DataLoader always asks worker 0 first, and a resumed run must continue with the
    stream whose turn it was.
    """

    def __init__(self, table: datasets.IterableDataset, cfg: DataConfig, seed: int = 0, num_shards: int | None = None):
        super().__init__(cfg, seed)
        self.table = table
        self.num_shards = num_shards if num_shards is not None else _num_shards(table)
        self.shuffle = False  # set by build_dataloader
        self.endless = False  # a training view: epoch after epoch
        self.positions: dict[int, dict] = {}  # stream -> position to continue from (a training view)
        self.first_epoch = 0  # a training view: the epoch of streams without a position
        self.rotation = 0
        self._seen: dict[str, int] = {}  # file name -> outcome code, in this process
        self._upsample_warned = False

    def training_view(self, positions: dict[int, dict], rotation: int, first_epoch: int) -> StreamingImageDataset:
        """This dataset, endless, with each stream starting from its position (else at the start of `first_epoch`)
        and worker 0 playing stream `rotation`."""
        view = copy.copy(self)
        view.endless, view.positions, view.rotation, view.first_epoch = True, dict(positions), rotation, first_epoch
        return view

    # A stream has no fixed positions to keep shared flags for. Every epoch reads every file of the run once (by one
    # stream), so warning only in a stream's epoch 0 warns about each bad file once per run.
    def _record(self, index: int, name: str, code: int, epoch: int) -> bool:
        first = epoch == 0 and name not in self._seen
        self._seen[name] = code
        return first

    def _first_upsample(self) -> bool:
        first, self._upsample_warned = not self._upsample_warned, True
        return first

    @property
    def num_upsampled(self) -> int:
        """Images this process met whose short side is below the resolution, upsampled by the transform."""
        return sum(code == _UPSAMPLED for code in self._seen.values())

    def _outcomes(self):
        return self._seen.items()

    def __iter__(self):
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        stream = _Stream(self, distributed.rank() * num_workers + (worker_id + self.rotation) % num_workers,
                         distributed.world_size() * num_workers)
        if not self.endless:
            yield from stream.epoch(self.epoch)
            return
        start = self.positions.get(stream.id)
        epoch = start["epoch"] if start is not None else self.first_epoch
        while True:
            yielded = False
            for item in stream.epoch(epoch, start):
                yielded = True
                yield item
            if not yielded and start is None:  # a whole epoch without an image: the next would be the same
                raise UsageError(stream.why_empty())
            epoch, start = epoch + 1, None


_SLOT_BLOCK = 4096  # slot draws are made this many at a time, each block from its own seed
_EMPTY = np.iinfo(np.int64).max  # a buffer slot that holds no row
_READ_ROWS = 16  # raw rows a shard reader asks `datasets` for at once


class _Stream:
    """One stream of a `StreamingImageDataset`: its share of the rows, one epoch at a time, through the shuffle
    buffer. The buffer's slot s holds a row identified by its *input index* (the rows the stream read this epoch
    are numbered in the order read), kept in ``held``."""

    def __init__(self, dataset: StreamingImageDataset, stream: int, streams: int):
        self.dataset, self.id, self.streams = dataset, stream, streams
        self.size = dataset.cfg.shuffle_buffer if dataset.shuffle else 1
        self.width = dataset.cfg.open_shards if dataset.shuffle else 1
        self.by_shard = dataset.num_shards % streams == 0
        self.rows_read = 0

    def _seed(self, *numbers: int) -> torch.Generator:
        return torch.Generator().manual_seed(_derive_seed(*numbers))

    def _shards(self, epoch: int) -> list[int]:
        count = self.dataset.num_shards
        order = list(range(count))
        if self.dataset.shuffle:  # the same order on every stream: dealing it out gives each shard to one stream
            order = torch.randperm(count, generator=self._seed(_SHARDS, self.dataset.seed, epoch)).tolist()
        return order[self.id::self.streams] if self.by_shard else order

    def _keep(self, shard: int, row: int) -> bool:
        """Whether the stream takes raw row `row` of `shard`: all of its own shards, or one row in `streams` of each
        (starting at a row that depends on the shard, so that small shards are spread over the streams too)."""
        return self.by_shard or row % self.streams == (self.id + shard) % self.streams

    def _open(self, shard: int, skip: int):
        """The raw rows of `shard` after its first `skip`, as dicts (read, not decoded)."""
        table = self.dataset.table
        if self.dataset.num_shards > 1:
            table = split_dataset_by_node(table, rank=shard, world_size=self.dataset.num_shards)
        if skip:
            table = table.skip(skip)
        # .iter(), not iter(table): inside a DataLoader worker iter() would shard by worker a second time.
        for rows in table.iter(batch_size=_READ_ROWS):
            for values in zip(*rows.values()):
                yield dict(zip(rows, values))

    def _slots(self, epoch: int, block: int) -> np.ndarray:
        generator = self._seed(_SLOTS, self.dataset.seed, epoch, self.streams, self.id, block)
        return torch.randint(self.size, (_SLOT_BLOCK,), generator=generator).numpy()

    def _drain_order(self, epoch: int) -> list[int]:
        return torch.randperm(self.size, generator=self._seed(_DRAIN, self.dataset.seed, epoch, self.streams,
                                                              self.id)).tolist()

    def _held_after(self, epoch: int, draws: int) -> np.ndarray:
        """The input index each slot holds after `draws` draws that all put a new row in: found from the slot draws
        alone, looking back from the last until every slot's latest draw is found (about size * ln(size) draws)."""
        held, found = np.arange(self.size, dtype=np.int64), np.zeros(self.size, dtype=bool)
        for block in range((draws - 1) // _SLOT_BLOCK, -1, -1):
            first = block * _SLOT_BLOCK
            latest_first = self._slots(epoch, block)[:draws - first][::-1]  # this block's draws, the last first
            slots, back = np.unique(latest_first, return_index=True)
            new = ~found[slots]
            held[slots[new]] = self.size + (min(draws, first + _SLOT_BLOCK) - 1 - back[new])
            found[slots[new]] = True
            if found.all():
                break
        return held

    def epoch(self, epoch: int, start: dict | None = None):
        """The items of `epoch` (from the position `start`, when given), each carrying its position."""
        size, dataset = self.size, self.dataset
        lanes = _Lanes(self._open, self._shards(epoch), self._keep, self.width, start["lanes"] if start else None)
        buffer, held = [None] * size, np.full(size, _EMPTY, dtype=np.int64)
        every = max(1, size // 4)  # a reader snapshot every `every` rows: a resume re-reads at most that many more
        if start is None:
            draws, rows, read = 0, None, 0
            targets = {slot: slot for slot in range(size)}  # the fill: input index -> slot
        else:
            draws, rows, read = start["draws"], start["rows"], start["anchor"]
            # the draws that put a new row in; after them (the epoch's rows all read) the buffer empties
            refilled = draws if rows is None else min(draws, max(0, rows - size))
            held = self._held_after(epoch, refilled) if refilled else np.arange(size, dtype=np.int64)
            if rows is not None:
                held[held >= rows] = _EMPTY  # slots the fill never reached (an epoch shorter than the buffer)
                emptied = [slot for slot in self._drain_order(epoch) if held[slot] != _EMPTY][:draws - refilled]
                held[emptied] = _EMPTY
            targets = {int(index): slot for slot, index in enumerate(held) if index != _EMPTY}
        end = size + draws if rows is None else rows  # rows read before the next draw
        snapshots = deque([(read, lanes.state())])  # (input index, the readers' state before reading it)
        while read < end:  # the fill, or a resume's re-read from the snapshot
            if read % every == 0 and read != snapshots[-1][0]:
                snapshots.append((read, lanes.state()))
            row = lanes.read()
            if row is None:
                rows = end = read
                break
            if read in targets:
                buffer[targets[read]], held[targets[read]] = row, read
            read += 1
        held[[slot for slot in range(size) if buffer[slot] is None]] = _EMPTY
        draining = iter(slot for slot in self._drain_order(epoch) if held[slot] != _EMPTY)
        slots = None
        while True:
            if rows is None:
                if read % every == 0 and read != snapshots[-1][0]:
                    snapshots.append((read, lanes.state()))
                row = lanes.read()
                if row is None:
                    rows = read
                    draining = iter(slot for slot in self._drain_order(epoch) if held[slot] != _EMPTY)
            if rows is None:  # a random slot gives its row and takes the new one
                if draws % _SLOT_BLOCK == 0 or slots is None:
                    slots = self._slots(epoch, draws // _SLOT_BLOCK)
                slot = int(slots[draws % _SLOT_BLOCK])
                out, index = buffer[slot], int(held[slot])
                buffer[slot], held[slot] = row, read
                read += 1
            else:  # the epoch's rows are all read: the buffer empties in a random order
                slot = next(draining, None)
                if slot is None:
                    self.rows_read = rows
                    return
                out, index = buffer[slot], int(held[slot])
                buffer[slot], held[slot] = None, _EMPTY
            draws += 1
            item = dataset._item(out, index * self.streams + self.id, epoch=epoch,
                                 fallback_name=f"{dataset.cfg.source}[stream {self.id}, row {index}]")
            if item is not None:
                oldest = held.min()  # the oldest row still buffered: a resume reads again from a snapshot before it
                while len(snapshots) > 1 and snapshots[1][0] <= oldest:
                    snapshots.popleft()
                anchor, state = snapshots[0]
                item["stream_position"] = {"stream": self.id, "epoch": epoch, "draws": draws, "rows": rows,
                                           "anchor": anchor, "lanes": state}
                yield item

    def why_empty(self) -> str:
        source = self.dataset.cfg.source
        if self.rows_read == 0:
            return (f"--data {source}: its {self.dataset.num_shards} shard(s) give no rows to stream {self.id} of "
                    f"{self.streams} (one per process and DataLoader worker); lower --num-workers or the process "
                    "count")
        return (f"--data {source}: all {self.rows_read} images of stream {self.id} of {self.streams} (one per process "
                "and DataLoader worker) were skipped as unreadable or below --min-size; check the files")


class _Lanes:
    """The rows of a stream's shards for one epoch, `width` shards at a time, one row from each open shard in turn;
    when a shard ends the next one in `shards` takes its place. The state (which shards are open, how many raw rows
    of each were read, whose turn it is) is what a position keeps."""

    def __init__(self, open_shard, shards: list[int], keep, width: int, state: dict | None = None):
        self.open_shard, self.shards, self.keep = open_shard, shards, keep
        if state is None:
            count = min(width, len(shards))
            state = {"next": count, "open": [[ordinal, 0] for ordinal in range(count)], "turn": 0}
        self.next, self.turn = state["next"], state["turn"]
        self.open = [list(lane) for lane in state["open"]]  # [ordinal in shards, raw rows read]
        self.readers = [None] * len(self.open)

    def state(self) -> dict:
        return {"next": self.next, "open": [list(lane) for lane in self.open], "turn": self.turn}

    def read(self) -> dict | None:
        """The next row, or None when every shard is read."""
        while self.open:
            lane = self.open[self.turn]
            shard = self.shards[lane[0]]
            if self.readers[self.turn] is None:
                self.readers[self.turn] = self.open_shard(shard, lane[1])
            for row in self.readers[self.turn]:
                lane[1] += 1
                if self.keep(shard, lane[1] - 1):
                    self.turn = (self.turn + 1) % len(self.open)
                    return row
            if self.next < len(self.shards):  # this shard is done: the next one takes its lane
                self.open[self.turn], self.readers[self.turn] = [self.next, 0], None
                self.next += 1
            else:
                del self.open[self.turn], self.readers[self.turn]
                self.turn = self.turn % len(self.open) if self.open else 0
        return None


def _num_shards(table: datasets.IterableDataset) -> int:
    return int(getattr(table, "num_shards", None) or table.n_shards)  # n_shards: datasets before 3.x
