"""Training batches decoded by NVDEC: a DALI pipeline owned by the main process (``data.decode_backend: dali``,
and ``auto`` on a GPU machine with DALI installed).

DataLoader workers cannot initialise CUDA, so with workers every clip is decoded by PyAV on the CPU. This
loader replaces the DataLoader on a GPU: a background thread of the main process walks the same
``ResumableBatchSampler`` (same order, same resume position), asks the dataset for each sample's plan
(``dataset.plan``: clip, cameras, window, flip, from ``(seed, epoch, index)``: the code the PyAV path runs),
decodes the micro-batch's clips in one DALI run (``fn.decoders.video`` on NVDEC, ``engine.data.decode``), and
finishes every sample on the GPU (``dataset.from_frames``: resize + crop, flip, cameras). Its queue holds
``prefetch`` ready batches, as DALI's own PyTorch iterator does; DALI decodes on its own threads.

Bad files: ``data.on_error`` as in the PyAV path (``SkipBadClips``): a clip whose plan fails (camera file,
frame count) or whose decode fails is recorded as bad and the first good clip at or after its index is used,
counted in ``skipped_clips``; ``raise`` propagates the ``DataError`` (re-raised in the training loop).

Batches are the DataLoader's collation: ``frames`` (and ``depth``) on the GPU, the small per-sample tensors
(``index``, ``skipped_clips``, cameras, ...) on the CPU, ``clip`` a list of names.

``decode`` is injectable: the CPU tests run this loader with PyAV decoding and compare its batches with the
DataLoader's (tests/engine/data/test_dali_loader.py); the GPU lane runs it with NVDEC.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator

import torch

from geoforge.engine.data.decode import DataError, decode_clips
from geoforge.engine.data.sampler import select

Decode = Callable[[list[tuple[object, list[int]]]], list[torch.Tensor]]


def nvdec(items: list[tuple[object, list[int]]]) -> list[torch.Tensor]:
    """uint8 [T, H, W, 3] CUDA tensors of the clips, one DALI run (``DataError`` names a bad clip)."""
    return decode_clips(items, backend="dali", device="cuda")


def _collate(samples: list[dict]) -> dict:
    out = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        out[key] = torch.stack(values) if torch.is_tensor(values[0]) else values
    return out


class PlannedLoader:
    """An endless iterator of micro-batches: ``dataset`` (with ``plan`` / ``check_decodable`` / ``from_frames``
    and its ``SkipBadClips``), ``sampler`` (a ``ResumableBatchSampler``), ``decode`` (default NVDEC)."""

    def __init__(self, dataset, sampler, decode: Decode = nvdec, prefetch: int = 2, device: torch.device | None = None):
        for name in ("plan", "check_decodable", "from_frames", "_skip"):
            if not hasattr(dataset, name):
                raise TypeError(f"PlannedLoader: {type(dataset).__name__} has no {name}")
        self.dataset, self.sampler, self.decode, self.prefetch = dataset, sampler, decode, max(1, prefetch)
        self.device = device

    # ------------------------------------------------------------------ one micro-batch, synchronously
    def _plan(self, index: int) -> dict:
        """The plan of the first good clip at or after ``index`` (its ``skipped_clips`` set), as ``_sample``."""
        return self.dataset._skip.fetch(index, self._plan_strict)

    def _decode_one(self, plan: dict) -> torch.Tensor:
        if plan["decodable"]:
            return self.decode([(plan["video"], plan["frame_indices"])])[0]
        return self.dataset._frames(plan["clip"], plan["frame_indices"], plan["count"])  # an image folder

    def batch(self, keys: list[tuple[int, ...]]) -> dict:
        """The collated micro-batch of ``[(index, epoch), ...]`` or ``[(index, epoch, subepoch), ...]`` (the
        sampler's items)."""
        plans = [self._plan(select(self.dataset, key)) for key in keys]
        videos = [n for n, p in enumerate(plans) if p["decodable"]]
        frames: dict[int, torch.Tensor] = {}
        try:
            decoded = self.decode([(plans[n]["video"], plans[n]["frame_indices"]) for n in videos]) if videos else []
            frames.update(zip(videos, decoded))
        except DataError:
            pass  # one of them is bad: decode them one at a time below, where on_error applies per clip
        samples = []
        for n, (key, plan) in enumerate(zip(keys, plans)):
            if n in frames:
                sample = self.dataset.from_frames(plan, frames[n])
                sample["skipped_clips"] = plan["skipped_clips"]
            else:
                sample = self._resilient(key, plan)
            samples.append(sample)
        return _collate(samples)

    def _resilient(self, key: tuple[int, ...], first: dict) -> dict:
        """The sample of sampler item ``key`` decoded alone, with ``on_error`` applied to decode errors as
        ``SkipBadClips`` does."""
        cache = {first["index"]: first}

        def load(i: int) -> dict:
            select(self.dataset, key)   # the item's epoch and sub-epoch (the index is i)
            plan = cache.pop(i, None) or self._plan_strict(i)
            return self.dataset.from_frames(plan, self._decode_one(plan))

        return self.dataset._skip.fetch(key[0], load)

    def _plan_strict(self, i: int) -> dict:
        plan = self.dataset.plan(i)
        plan["decodable"] = self.dataset.check_decodable(plan)
        return plan

    # ------------------------------------------------------------------ the prefetching iterator
    def __iter__(self) -> Iterator[dict]:
        items: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce() -> None:
            if self.device is not None and self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            try:
                for keys in self.sampler:
                    batch = self.batch(keys)
                    while not stop.is_set():
                        try:
                            items.put(("batch", batch), timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
            except BaseException as err:  # re-raised in the consumer (DataError in raise mode, ...)
                items.put(("error", err))

        thread = threading.Thread(target=produce, name="geoforge-dali-loader", daemon=True)
        thread.start()
        try:
            while True:
                kind, value = items.get()
                if kind == "error":
                    raise value
                yield value
        finally:
            stop.set()
