"""The order of a dataset's items and the batches a training process draws: `EpochSampler`, `build_dataloader`,
`collate_images`, and `TrainingBatches`, the run's position in its data (what a checkpoint keeps and a resume
continues from exactly).
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Sampler

from .. import distributed
from ..errors import UnavailableError, UsageError
from ..preemption import ignore_in_workers
from .datasets import ImageDataset
from .images import _ORDER, _derive_seed


class EpochSampler(Sampler):
    """Indices permuted by a generator seeded from ``(seed, dataset.epoch)``, then sharded ``rank::world_size``.

    drop_last=True cuts the permutation to a multiple of world_size so every process takes the same number
    of steps (DDP training); drop_last=False keeps every index once, shards uneven, no padding (evaluation).
    `indices(epoch, start)` is one process's share of an epoch whose first `start` images of the order were taken
    already (by a run with another process count, say): the rest of the order, sharded the same way.
    """

    def __init__(self, dataset, shuffle: bool = True, seed: int = 0, drop_last: bool = True,
                 rank: int | None = None, world_size: int | None = None):
        self.dataset, self.shuffle, self.seed, self.drop_last = dataset, shuffle, seed, drop_last
        self.rank = distributed.rank() if rank is None else rank
        self.world_size = distributed.world_size() if world_size is None else world_size

    def _shared(self, start: int, world_size: int) -> int:
        """How many images of the order after `start` the processes share out."""
        left = max(0, len(self.dataset) - start)
        return left - left % world_size if self.drop_last else left

    def __len__(self) -> int:
        return len(range(self.rank, self._shared(0, self.world_size), self.world_size))

    def batches(self, start: int, batch_size: int, drop_last: bool) -> int:
        """This process's batches of `batch_size` in an epoch from image `start`."""
        mine = len(range(self.rank, self._shared(start, self.world_size), self.world_size))
        return mine // batch_size if drop_last else -(-mine // batch_size)

    def indices(self, epoch: int, start: int = 0) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(_derive_seed(_ORDER, self.seed, epoch))
            order = torch.randperm(len(self.dataset), generator=generator)
        else:
            order = torch.arange(len(self.dataset))
        return order[start:start + self._shared(start, self.world_size)][self.rank::self.world_size].tolist()

    def __iter__(self):
        return iter(self.indices(getattr(self.dataset, "epoch", 0)))


def build_dataloader(dataset, batch_size: int, num_workers: int = 0, shuffle: bool = True, seed: int = 0,
                     drop_last: bool = True, ignore_signals=(), timeout: float = 0) -> DataLoader:
    """A DataLoader whose collate drops skipped items (a batch may come out smaller, or None if all failed).

    Map-style: the order is a permutation seeded by ``(seed, dataset.epoch)``, sharded ``rank::world_size``
    when torch.distributed is initialised. Call ``dataset.set_epoch(e)`` before each epoch; it changes both
    the order and the augmentations. Workers are not persistent so that they see the new epoch (`TrainingBatches`
    iterates one loader for the whole run instead, its epochs carried by the sampler).
    ``ignore_signals``: signals the worker processes ignore (the training loop's stop signals, which a signal to the
    whole process group would otherwise deliver to the workers too, killing them).
    ``timeout``: seconds to wait for a batch from the workers before failing (`TrainingBatches` names the cause);
    0 waits forever. Only with workers: without them the reads happen in this process.
    """
    # A private generator: iter(DataLoader) draws its workers' base seed from it, never from the global RNG
    # that the training loop's latents come from (a resumed run would otherwise draw different latents).
    common = dict(batch_size=batch_size, num_workers=num_workers, collate_fn=collate_images,
                  drop_last=drop_last, pin_memory=torch.cuda.is_available(),
                  timeout=timeout if num_workers > 0 else 0,
                  generator=torch.Generator().manual_seed(seed), worker_init_fn=ignore_in_workers(ignore_signals))
    if isinstance(dataset, torch.utils.data.IterableDataset):
        dataset.shuffle = shuffle  # shard order and shuffle buffer; a DataLoader cannot shuffle a stream
        return DataLoader(dataset, **common)
    sampler = EpochSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    return DataLoader(dataset, sampler=sampler, **common)


def _loader_like(loader: DataLoader, dataset, **how) -> DataLoader:
    """A DataLoader with `loader`'s workers, collate, pinning, timeout and worker setup, over `dataset`, drawing
    batches `how` says (batch_size, or batch_sampler)."""
    return DataLoader(dataset, num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      pin_memory=loader.pin_memory, timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                      generator=loader.generator, prefetch_factor=loader.prefetch_factor,
                      multiprocessing_context=loader.multiprocessing_context, **how)


def collate_images(items: list[dict | None]) -> dict | None:
    """Stack the items that were not skipped; None when every item of the batch was skipped.

    A stream's items carry their position; the batch keeps the last one (a batch comes from one stream).
    """
    items = [item for item in items if item is not None]
    if not items:
        return None
    positions = [item.pop("stream_position") for item in items if "stream_position" in item]
    batch = torch.utils.data.default_collate(items)
    if positions:
        batch["stream_position"] = positions[-1]
    return batch


class TrainingBatches:
    """The batches one training process draws, in order, from any position; the position is its state.

    One DataLoader serves the whole run: its workers live as long as the run (what `persistent_workers` would give)
    and its prefetching goes on across epochs. The position is counted here as batches arrive, without talking to
    the other processes and without reading any tensor:

    - map-style datasets: the epoch, and how many images of that epoch's order (a function of ``(seed, epoch)``)
      all processes have taken; a resume skips by index in that order and reads none of the skipped images;
    - streams: the position each stream (`StreamingImageDataset`) reported with its latest batch, and whose turn is
      next; a resume restores them, re-reading a bounded number of raw rows per stream.

    A batch whose images were all unreadable is dropped by the process that drew it, which draws the next one
    (`micro_batches` counts both). `state_dict()` is per process. `load_state_dict` continues exactly when the
    process count, batch size and (streams) DataLoader worker count are those of the run that saved it; otherwise a
    map-style dataset continues in the same epoch at the same image of its order, and a stream starts its epoch
    again; a warning says which.
    """

    def __init__(self, dataset, loader: DataLoader):
        self.dataset, self.loader = dataset, loader
        self.streaming = isinstance(dataset, torch.utils.data.IterableDataset)
        self.micro_batches = 0  # batches drawn, including those dropped as unusable
        # map-style: the epoch being drawn, the images of its order taken before this layout began (another process
        # count or batch size on resume), and the batches drawn since
        self._epoch, self.epoch_start, self.batches_in_epoch = 0, 0, 0
        # streams: stream -> the position its latest batch reported; the epoch of streams with none yet
        self.stream_positions: dict[int, dict] = {}
        self.first_epoch = 0
        self._iterator = None  # the generator of batches
        self._loader_iterator = None  # the DataLoader's iterator inside it, which owns the worker processes
        self._unusable = 0  # batches in a row whose images were all unreadable

    @property
    def epoch(self) -> int:
        """The epoch being drawn (streams: the earliest epoch among this process's streams)."""
        if not self.streaming:
            return self._epoch
        return min((p["epoch"] for p in self.stream_positions.values()), default=self.first_epoch)

    def _layout(self) -> dict:
        """What must match for a saved position to mean the same batches."""
        return {"num_processes": distributed.world_size(), "batch_size": self.loader.batch_size,
                "num_workers": max(1, self.loader.num_workers) if self.streaming else None}

    def _images_per_batch(self) -> int:
        return self.loader.batch_size * distributed.world_size()

    def state_dict(self) -> dict:
        state = {"micro_batches": self.micro_batches, **self._layout(), "epoch": self.epoch,
                 "data_revision": getattr(self.dataset, "revision", None)}
        if self.streaming:
            state.update(first_epoch=self.first_epoch, streams={str(k): v for k, v in self.stream_positions.items()})
        else:
            state.update(epoch_start=self.epoch_start, batches_in_epoch=self.batches_in_epoch,
                         images_in_epoch=self.epoch_start + self.batches_in_epoch * self._images_per_batch())
        return state

    def load_state_dict(self, state: dict) -> list[str]:
        """Continue from a saved position; returns warnings (empty when the continuation is exact)."""
        self.close()
        self.micro_batches = int(state["micro_batches"])
        warnings = []
        saved, ours = state.get("data_revision"), getattr(self.dataset, "revision", None)
        if saved is not None and ours is not None and saved != ours:
            warnings.append(f"--data {self.dataset.cfg.source} has changed since the checkpoint was written (then "
                            f"{saved}, now {ours}): the saved position is taken in the data as it is now, so the "
                            "rest of the epoch is not the images the run would have seen")
        changed = {k: (state.get(k), v) for k, v in self._layout().items() if state.get(k) != v}
        if self.streaming:
            return warnings + self._load_streams(state, changed)
        epoch, start, done = int(state["epoch"]), int(state["epoch_start"]), int(state["batches_in_epoch"])
        images = int(state["images_in_epoch"])
        if changed:
            self._epoch, self.epoch_start, self.batches_in_epoch = epoch, images, 0
            warnings.append(f"{_changes(changed)}: the data continues in epoch {epoch} after the {images} images of "
                            "its order already taken, in the same order, cut into other batches")
        else:
            self._epoch, self.epoch_start, self.batches_in_epoch = epoch, start, done
        self._next_epoch_if_done()
        return warnings

    def _load_streams(self, state: dict, changed: dict) -> list[str]:
        positions = {int(k): v for k, v in state.get("streams", {}).items()}
        readable = all("draws" in p for p in positions.values())
        if readable and not {"num_processes", "num_workers"} & set(changed):  # the same streams
            self.stream_positions, self.first_epoch = positions, int(state.get("first_epoch", 0))
            if changed:  # the batch size alone: each stream goes on from its own position
                return [f"{_changes(changed)}: every stream continues where it was, but the batches are cut "
                        "differently"]
            return []
        self.stream_positions, self.first_epoch = {}, int(state.get("epoch", 0))
        why = _changes(changed) if readable else "the checkpoint's stream positions are of an earlier vqhit"
        return [f"{why}: the streams' positions do not carry over, so epoch {self.first_epoch} starts again from its "
                "beginning (images of this epoch already trained on are seen again)"]

    # -- map-style position --------------------------------------------------------------------------------------
    def _epoch_batches(self, start: int) -> int:
        """This process's batches in an epoch whose first `start` images of the order were already taken."""
        return self.loader.sampler.batches(start, self.loader.batch_size, self.loader.drop_last)

    def _next_epoch_if_done(self) -> None:
        while self.batches_in_epoch >= self._epoch_batches(self.epoch_start):
            if self._epoch_batches(0) == 0:
                raise UsageError(f"--data {self.dataset.cfg.source} has fewer images ({len(self.dataset)}) than one "
                                 f"batch per process ({self._images_per_batch()}); lower --batch-size")
            self._epoch, self.epoch_start, self.batches_in_epoch = self._epoch + 1, 0, 0

    # -- drawing -------------------------------------------------------------------------------------------------
    def __iter__(self):
        return self

    def close(self) -> None:
        """Stop the DataLoader's worker processes now (the position is kept: `next` goes on from it). Workers that
        ignore the stop signals (`ignore_signals`) must be stopped this way: at interpreter exit, multiprocessing
        ends them with SIGTERM and waits for them."""
        if self._iterator is not None:
            self._iterator.close()
            self._iterator = self._loader_iterator = None  # the last reference: the DataLoader shuts its workers down

    def _stop_stalled_workers(self) -> None:
        """End the workers after a timeout. They ignore the stop signals, so the SIGTERM with which the DataLoader
        ends a worker that does not stop when asked leaves one stuck in a read alive, and the process would wait
        for it at exit."""
        workers = list(getattr(self._loader_iterator, "_workers", ()))
        self.close()
        for worker in workers:
            if worker.is_alive():
                worker.kill()
                worker.join()

    def __next__(self) -> dict:
        """The next usable batch of this process (a batch of only unreadable images is dropped here)."""
        if self._iterator is None:
            self._iterator = self._stream_batches() if self.streaming else self._indexed_batches()
        while True:
            try:
                batch = next(self._iterator)
            except RuntimeError as err:
                if not str(err).startswith("DataLoader timed out"):
                    raise
                self._stop_stalled_workers()
                raise UnavailableError(
                    f"no batch came from the DataLoader workers in {self.loader.timeout:g} s: reading --data "
                    f"{self.dataset.cfg.source} stalled (a network or file system that stopped answering?). Check "
                    "the source and resume; raise --data-timeout if reads are legitimately that slow") from None
            self.micro_batches += 1
            if not self.streaming:
                self.batches_in_epoch += 1
                self._next_epoch_if_done()
            if batch is not None:
                self._unusable = 0
                return batch
            self._unusable += 1
            if not self.streaming and self._unusable > self._epoch_batches(0):
                raise UsageError(f"a whole epoch of this process's share of --data {self.dataset.cfg.source} held no "
                                 "readable image (every batch unreadable); check the files")

    def _indexed_batches(self):
        start = self.epoch_start + self.batches_in_epoch * self._images_per_batch()
        sampler, size = self.loader.sampler, self.loader.batch_size
        order = _TrainingOrder(sampler, size, self.loader.drop_last, self._epoch, start)
        items = _TrainingItems(self.dataset, sampler, size)
        self._loader_iterator = iter(_loader_like(self.loader, items, batch_sampler=order))
        yield from self._loader_iterator

    def _stream_batches(self):
        turn = self.micro_batches % max(1, self.loader.num_workers)
        view = self.dataset.training_view(self.stream_positions, turn, self.first_epoch)
        self._loader_iterator = iter(_loader_like(self.loader, view, batch_size=self.loader.batch_size,
                                                  drop_last=False))
        for batch in self._loader_iterator:
            position = batch.pop("stream_position")
            self.stream_positions[position["stream"]] = position
            yield batch


_LAYOUT_NAMES = {"num_processes": "processes", "batch_size": "batch size", "num_workers": "DataLoader workers"}


def _changes(changed: dict) -> str:
    """What differs from the run that saved a position: 'processes 2 -> 1, batch size 2 -> 4'."""
    return ", ".join(f"{_LAYOUT_NAMES[key]} {saved} -> {now}" for key, (saved, now) in changed.items())


class _TrainingOrder(Sampler):
    """Batches of a map-style dataset, epoch after epoch without end, from image `start` of `epoch`'s order: what one
    DataLoader iterates for a whole run. Each epoch is cut as `EpochSampler` cuts it (this process's share, whole
    batches when `drop_last`), so a batch never spans two epochs. A batch is named by ``(epoch, start, number)``
    and `_TrainingItems` finds its images in the worker: the training process computes no order, only counts."""

    def __init__(self, sampler: EpochSampler, batch_size: int, drop_last: bool, epoch: int, start: int):
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last
        self.epoch, self.start = epoch, start

    def __iter__(self):
        epoch, start = self.epoch, self.start
        while True:
            for number in range(self.sampler.batches(start, self.batch_size, self.drop_last)):
                yield epoch, start, number
            epoch, start = epoch + 1, 0


class _TrainingItems(torch.utils.data.Dataset):
    """The items of the batches `_TrainingOrder` names, each augmented as its epoch says (the DataLoader passes a
    batch's name to `__getitems__`). The epoch's order is computed once per epoch in each worker."""

    def __init__(self, dataset: ImageDataset, sampler: EpochSampler, batch_size: int):
        self.dataset, self.sampler, self.batch_size = dataset, sampler, batch_size
        self._order = (None, [])  # ((epoch, start), this process's indices of that epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, batch: tuple[int, int, int]) -> list[dict | None]:
        epoch, start, number = batch
        if self._order[0] != (epoch, start):
            self._order = ((epoch, start), self.sampler.indices(epoch, start))
        first = number * self.batch_size
        return [self.dataset[(epoch, index)] for index in self._order[1][first:first + self.batch_size]]
