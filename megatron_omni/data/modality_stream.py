"""One modality's endless stream of microbatches for one DP rank (synchronous; see prefetch.py).

The stream reads its shard of `SampleOrder`, builds each sample through a `SampleSource`, drops
what cannot be used (unreadable media, a sample too long for a row) with a count and one log line
per sample, and packs the rest (`PackingBuffer`) -- or, for the benchmark baseline, pads one
sample per row to the longest of the microbatch.

Its position is small and exact: (epoch, cursor) in the shard plus the *keys* of the samples
sitting in the packing buffer, which are re-read on `load_state_dict`.  Building samples is
deterministic, so a restored stream yields the same microbatches as the uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter, deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Any, Deque, Dict, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch

from megatron_omni.data.omni_batch import OmniMicrobatch, OmniSample
from megatron_omni.data.packing import PackingBuffer, collate_rows, fit_to_length
from megatron_omni.data.sample_order import Key, SampleOrder

__all__ = ["LoaderConfig", "ModalitySpec", "ModalityStream", "SampleSource", "TooManyBadSamples"]

log = logging.getLogger("megatron_omni.data")

STATE_VERSION = 1
_KNOWN = "/known"  # reason suffix of a sample skipped from memory (not decoded again)
_LOG_LOCK = threading.Lock()


@runtime_checkable
class SampleSource(Protocol):
    """What the loader needs from a dataset: its size and the sample at an index.

    ``__getitem__`` may raise (a corrupt or missing medium, a malformed row): the loader skips the
    sample.  An optional ``describe(index) -> str`` names it (file, line, media path) in the log.
    """

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> OmniSample: ...


@dataclass
class LoaderConfig:
    seq_length: int
    micro_batch_size: int
    seed: int = 1234
    # True: fixed [B, seq_length] packed rows (training).  False: one sample per row, rows padded
    # to the microbatch's longest sample -- the pad-to-longest baseline (shape varies).
    pack: bool = True
    # Samples held for best-fit packing; more = less padding, more memory (decoded media), so the
    # buffer also stops at `lookahead_mib` of media tensors per modality.
    lookahead: int = 256
    lookahead_mib: Optional[float] = 512.0
    pad_token_id: int = 0
    # Microbatches built ahead per modality by a background thread (0 = build on request).
    prefetch: int = 2
    # Threads decoding samples ahead of the packers (0 = decode in each stream's own thread); one pool
    # for all the modalities of an `OmniLoader`, each stream keeping 2 x decode_workers samples in flight.
    decode_workers: int = 0
    # Page-lock microbatches in the prefetch thread so `batch.to("cuda", non_blocking=True)` is a
    # true async copy (ignored without CUDA).
    pin_memory: bool = True
    # Raise when more than this share of the last `bad_window` samples of a modality was skipped.
    max_bad_fraction: float = 0.1
    bad_window: int = 200
    # Append one JSON line per distinct bad training sample here (None = log lines only).
    bad_samples_log: Optional[str] = None

    def __post_init__(self):
        if self.seq_length < 1 or self.micro_batch_size < 1 or self.lookahead < 1:
            raise ValueError("seq_length, micro_batch_size and lookahead must be >= 1")
        if not 0.0 <= self.max_bad_fraction <= 1.0 or self.bad_window < 1:
            raise ValueError(f"max_bad_fraction must be in [0, 1] and bad_window >= 1, got "
                             f"{self.max_bad_fraction}, {self.bad_window}")


@dataclass
class ModalitySpec:
    """The sources of one modality, their mixing weights and the held-out validation set: either
    `validation_size` samples split off `sources` by the loader, or `validation_sources` already
    split off by the caller (e.g. the blend's `split_heldout`), read whole."""

    sources: Sequence[SampleSource]
    weights: Optional[Sequence[float]] = None  # None = uniform
    validation_size: int = 0
    names: Sequence[str] = field(default_factory=tuple)  # for log lines; default "source i"
    validation_sources: Optional[Sequence[SampleSource]] = None

    def __post_init__(self):
        if self.validation_sources is not None and self.validation_size:
            raise ValueError("give either validation_size (split here) or validation_sources (split already), not both")


class TooManyBadSamples(RuntimeError):
    pass


def _pinned(batch: OmniMicrobatch) -> OmniMicrobatch:
    return batch.with_tensors(**{f.name: getattr(batch, f.name).pin_memory() for f in fields(batch)
                                 if isinstance(getattr(batch, f.name), torch.Tensor)})


class ModalityStream:
    def __init__(self, modality: str, spec: ModalitySpec, config: LoaderConfig, *, dp_rank: int = 0, dp_size: int = 1,
                 decode_pool: Optional[Executor] = None):
        """`decode_pool`: the executor that decodes samples ahead (the loader's, shared by its
        streams; not shut down here); None = a pool of `config.decode_workers` threads of its own."""
        self.modality = modality
        self.spec = spec
        self.config = config
        weights = list(spec.weights) if spec.weights is not None else [1.0] * len(spec.sources)
        self.order = SampleOrder(
            [len(s) for s in spec.sources], weights, seed=config.seed, modality=modality,
            validation_size=spec.validation_size, dp_rank=dp_rank, dp_size=dp_size,
        )
        self._owns_pool = decode_pool is None and config.decode_workers > 0
        self._pool = (decode_pool or ThreadPoolExecutor(config.decode_workers, thread_name_prefix=f"decode-{modality}")
                      if config.decode_workers > 0 else None)
        self._logged: set = set()
        # Training samples that failed once (key -> reason): skipped again without decoding, and
        # counted in the bad-sample window only the first time.  Saved with the position.
        self.bad: Dict[Key, str] = {}
        self._logged_lock = threading.Lock()
        self._shards: Dict[int, Any] = {}  # epoch -> this rank's keys; the read-ahead may be an epoch ahead
        self._reset(epoch=0, cursor=0)

    # ---------------------------------------------------------------- position
    def _reset(self, epoch: int, cursor: int) -> None:
        self.epoch, self.cursor = epoch, cursor
        mib = self.config.lookahead_mib
        self._buffer: PackingBuffer[Key] = PackingBuffer(
            self.config.seq_length, self.config.lookahead, None if mib is None else int(mib * 2 ** 20))
        self.skipped: Counter = Counter()
        self._window: Deque[bool] = deque(maxlen=self.config.bad_window)
        self.real_tokens = self.total_tokens = self.microbatches = 0
        self._ahead: Deque[Tuple[Key, Future]] = deque()
        self._ahead_pos = (epoch, cursor)

    def _shard(self, epoch: int):
        if epoch not in self._shards:
            for old in [e for e in self._shards if abs(e - epoch) > 1]:
                del self._shards[old]
            self._shards[epoch] = self.order.epoch_keys(epoch)
        return self._shards[epoch]

    def _key_after(self, pos: Tuple[int, int]) -> Tuple[Key, Tuple[int, int]]:
        epoch, cursor = pos
        shard = self._shard(epoch)
        if cursor >= shard.shape[0]:
            epoch, cursor = epoch + 1, 0
            shard = self._shard(epoch)
        source, index = shard[cursor].tolist()
        return (source, index), (epoch, cursor + 1)

    # ---------------------------------------------------------------- reading samples
    def describe(self, key: Key, sources: Optional[Sequence[SampleSource]] = None) -> str:
        source_id, index = key
        source = (self.spec.sources if sources is None else sources)[source_id]
        name = self.spec.names[source_id] if source_id < len(self.spec.names) else f"source {source_id}"
        describe = getattr(source, "describe", None)
        return f"{name} {describe(index) if describe else f'#{index}'}"

    def _build(self, key: Key, sources: Optional[Sequence[SampleSource]] = None
               ) -> Tuple[Optional[OmniSample], Optional[str], Optional[BaseException]]:
        """(sample, None, None) or (None, reason, exception); never raises for bad data.  A training
        sample known to be bad is not read again: (None, "<reason>" + _KNOWN, None)."""
        if sources is None and key in self.bad:
            return None, self.bad[key] + _KNOWN, None
        try:
            sample = (self.spec.sources if sources is None else sources)[key[0]][key[1]]
        except Exception as exc:  # any failure building one sample is that sample's problem
            return None, type(exc).__name__, exc
        sample, reason = fit_to_length(sample, self.config.seq_length)
        return sample, reason, None

    def _skip(self, key: Key, reason: str, exc: Optional[BaseException], *, count: bool = True,
              sources: Optional[Sequence[SampleSource]] = None) -> None:
        reason = reason[:-len(_KNOWN)] if reason.endswith(_KNOWN) else reason
        if count:
            self.skipped[reason] += 1  # occurrences; len(self.bad) counts distinct samples
        logged_key = (key, id(sources))
        with self._logged_lock:  # validation builds in the caller's thread, training in the prefetcher's
            first = logged_key not in self._logged
            self._logged.add(logged_key)
        if first:
            detail = f": {exc!r}" if exc is not None else f" (longer than seq_length={self.config.seq_length})" \
                if reason == "too_long" else ""
            log.warning("skipping %s sample %s [%s]%s", self.modality, self.describe(key, sources), reason, detail)

    def _next_sample(self) -> Tuple[Key, OmniSample]:
        while True:
            if self._pool is not None:
                while len(self._ahead) < 2 * self.config.decode_workers:
                    key, self._ahead_pos = self._key_after(self._ahead_pos)
                    self._ahead.append((key, self._pool.submit(self._build, key)))
                key, future = self._ahead.popleft()
                built = future.result()
                self.epoch, self.cursor = self._key_after((self.epoch, self.cursor))[1]
            else:
                key, (self.epoch, self.cursor) = self._key_after((self.epoch, self.cursor))
                built = self._build(key)
            sample, reason, exc = built
            if sample is not None:
                self._window.append(False)
                return key, sample
            self._skip(key, reason, exc)
            if reason.endswith(_KNOWN):
                continue
            self.bad[key] = reason
            self._window.append(True)
            self._log_bad(key, reason, exc)
            self._check_window(key, exc)

    def _log_bad(self, key: Key, reason: str, exc: Optional[BaseException]) -> None:
        """One JSON line per distinct bad sample in `config.bad_samples_log` (the run directory's
        bad_samples.jsonl): DP rank, source, manifest line / id / media as the source describes it, error."""
        path = self.config.bad_samples_log
        if path is None:
            return
        # per DP rank: each rank remembers (and so lists) the bad samples its own shard met
        row = {"dp_rank": self.order.dp_rank, "modality": self.modality, "source": key[0], "index": key[1],
               "sample": self.describe(key),
               "reason": reason, "error": repr(exc) if exc is not None else None}
        with _LOG_LOCK, open(path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def _check_window(self, key: Key, exc: Optional[BaseException]) -> None:
        window = self._window
        if len(window) < window.maxlen:
            return
        bad = sum(window)
        if bad > self.config.max_bad_fraction * len(window):
            reasons = ", ".join(f"{r}: {n}" for r, n in Counter(self.bad.values()).most_common())
            worst = ", ".join(f"{self.spec.names[s] if s < len(self.spec.names) else f'source {s}'}: {n}"
                              for s, n in Counter(k[0] for k in self.bad).most_common(3))
            raise TooManyBadSamples(
                f"{self.modality}: {bad} of the last {len(window)} distinct samples could not be used "
                f"({len(self.bad)} bad samples: {reasons}; by source {worst}); the last one was "
                f"{self.describe(key)}" + (f": {exc!r}" if exc is not None else "") +
                f". Check the manifest's media root and paths (or data.seq_length for 'too_long'), or raise "
                f"data.max_bad_fraction={self.config.max_bad_fraction} (over data.bad_window="
                f"{self.config.bad_window} samples) to tolerate more."
            )

    # ---------------------------------------------------------------- microbatches
    def next_microbatch(self) -> OmniMicrobatch:
        cfg = self.config
        if cfg.pack:
            rows: List[List[OmniSample]] = []
            for _ in range(cfg.micro_batch_size):
                while not self._buffer.full:
                    self._buffer.add(*self._next_sample())
                rows.append(self._buffer.next_row())
            length = cfg.seq_length
        else:
            rows = [[self._next_sample()[1]] for _ in range(cfg.micro_batch_size)]
            length = max(len(row[0]) for row in rows)
        self.microbatches += 1
        self.real_tokens += sum(len(s) for row in rows for s in row)
        self.total_tokens += len(rows) * length
        batch = collate_rows(rows, length, pad_token_id=cfg.pad_token_id, modality=self.modality)
        return _pinned(batch) if cfg.pin_memory and torch.cuda.is_available() else batch

    def validation_microbatches(self) -> Tuple[List[OmniMicrobatch], Counter]:
        """This rank's held-out samples, packed like training (the last microbatch padded out
        with empty rows); and the skip counts of the held-out set."""
        cfg = self.config
        skipped: Counter = Counter()
        samples = []
        sources = self.spec.validation_sources
        if sources is None:
            keys = self.order.validation_keys()
        else:  # split off by the caller: this DP rank's share of all of them
            keys = [(i, j) for i, src in enumerate(sources) for j in range(len(src))]
            keys = keys[self.order.dp_rank::self.order.dp_size]
        for key in keys:
            sample, reason, exc = self._build(key, sources)
            if sample is None:
                skipped[reason] += 1
                self._skip(key, reason, exc, count=False, sources=sources)
            else:
                samples.append((key, sample))
        batches = []
        if cfg.pack:
            buffer: PackingBuffer[Key] = PackingBuffer(cfg.seq_length, max(1, len(samples)))
            for key, sample in samples:
                buffer.add(key, sample)
            while len(buffer):
                rows = [buffer.next_row() for _ in range(cfg.micro_batch_size)]
                batches.append(collate_rows(rows, cfg.seq_length, pad_token_id=cfg.pad_token_id, modality=self.modality))
        else:
            for start in range(0, len(samples), cfg.micro_batch_size):
                rows = [[s] for _, s in samples[start:start + cfg.micro_batch_size]]
                rows += [[] for _ in range(cfg.micro_batch_size - len(rows))]
                length = max(len(r[0]) for r in rows if r)
                batches.append(collate_rows(rows, length, pad_token_id=cfg.pad_token_id, modality=self.modality))
        return batches, skipped

    # ---------------------------------------------------------------- checkpointing
    def _identity(self) -> Dict[str, Any]:
        o = self.order
        return {"modality": self.modality, "seed": o.seed, "dp_rank": o.dp_rank, "dp_size": o.dp_size,
                "epoch_size": o.epoch_size, "seq_length": self.config.seq_length,
                "micro_batch_size": self.config.micro_batch_size, "pack": self.config.pack}

    def state_dict(self) -> Dict[str, Any]:
        return {
            "version": STATE_VERSION,
            **self._identity(),
            "epoch": self.epoch,
            "cursor": self.cursor,
            "buffer": [list(k) for k in self._buffer.keys()],
            "skipped": dict(self.skipped),
            "bad": [[k[0], k[1], r] for k, r in self.bad.items()],
            "window": [int(b) for b in self._window],
            "real_tokens": self.real_tokens,
            "total_tokens": self.total_tokens,
            "microbatches": self.microbatches,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"{self.modality}: loader state version {state.get('version')} != {STATE_VERSION}")
        mismatched = {k: (state.get(k), v) for k, v in self._identity().items() if state.get(k) != v}
        if mismatched:
            detail = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in mismatched.items())
            raise ValueError(
                f"{self.modality}: the checkpoint's data position belongs to a different data setup ({detail}); "
                f"resume with the same data, seed, seq_length, micro batch and DP size, or start the data afresh "
                f"(train.finetune)"
            )
        self._reset(state["epoch"], state["cursor"])
        self.skipped.update(state["skipped"])
        self.bad = {(s, i): r for s, i, r in state.get("bad", [])}  # absent in checkpoints before it
        self._window.extend(bool(b) for b in state["window"])
        self.real_tokens, self.total_tokens = state["real_tokens"], state["total_tokens"]
        self.microbatches = state["microbatches"]
        for source_id, index in state["buffer"]:
            key = (source_id, index)
            sample, reason, exc = self._build(key)
            if sample is None:  # it was readable when saved: the data changed under the run
                self._skip(key, f"{reason}_on_resume", exc)
            else:
                self._buffer.add(key, sample)

    def settle(self) -> None:
        """Wait for the samples the decode threads are building (kept for the next requests), so
        that no thread of this stream runs during a fork."""
        for _, future in self._ahead:
            future.exception()  # waits; a failure stays in the future for `_next_sample`

    def close(self) -> None:
        if self._owns_pool:
            self._pool.shutdown(wait=False, cancel_futures=True)
