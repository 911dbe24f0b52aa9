"""The omni data loader: one prefetched, packed microbatch stream per modality for this DP rank.

The training step's modality-round scheduler (paper Sec. 3.1: one mini-batch holds one modality)
asks for each pipeline microbatch by modality:

    loader = OmniLoader({"text": ModalitySpec([...]), "image": ModalitySpec([...], validation_size=64)},
                        LoaderConfig(seq_length=4096, micro_batch_size=1, seed=cfg.train.seed),
                        dp_rank=parallel_state.get_data_parallel_rank(),
                        dp_size=parallel_state.get_data_parallel_world_size())
    batch = loader.next_microbatch("image")          # OmniMicrobatch [micro_batch_size, seq_length]
    ...
    checkpoint["data"] = loader.state_dict()          # per DP rank
    loader.load_state_dict(checkpoint["data"])        # identical future microbatches

Every TP rank and pipeline stage of a DP rank builds its own loader with the same (dp_rank,
dp_size) and gets the identical microbatch sequence (the order is a function of the seed).
`skipped_samples` / `metrics()` report this rank's cumulative skips (the loop all-reduces them).
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Mapping

from megatron_omni.data.modality_stream import LoaderConfig, ModalitySpec, ModalityStream
from megatron_omni.data.omni_batch import OmniMicrobatch
from megatron_omni.data.prefetch import PrefetchingStream

__all__ = ["OmniLoader"]


class OmniLoader:
    def __init__(self, modalities: Mapping[str, ModalitySpec], config: LoaderConfig, *,
                 dp_rank: int = 0, dp_size: int = 1):
        if not modalities:
            raise ValueError("OmniLoader needs at least one modality")
        self.config = config
        self.dp_rank, self.dp_size = dp_rank, dp_size
        # `decode_workers` threads decode for every modality: the modality being asked for gets them all
        self.decode_pool = (ThreadPoolExecutor(config.decode_workers, thread_name_prefix="decode")
                            if config.decode_workers > 0 else None)
        self._streams: Dict[str, ModalityStream] = {
            name: ModalityStream(name, spec, config, dp_rank=dp_rank, dp_size=dp_size, decode_pool=self.decode_pool)
            for name, spec in modalities.items()
        }
        self._prefetch: Dict[str, PrefetchingStream] = {
            name: PrefetchingStream(stream, config.prefetch, name) for name, stream in self._streams.items()
        }
        self._validation: Dict[str, List[OmniMicrobatch]] = {}
        self._validation_skipped: Dict[str, Counter] = {}

    @property
    def modalities(self) -> List[str]:
        return list(self._streams)

    def _get(self, modality: str) -> PrefetchingStream:
        try:
            return self._prefetch[modality]
        except KeyError:
            raise KeyError(f"no data for modality {modality!r}; the blend has {', '.join(self._streams)}") from None

    def next_microbatch(self, modality: str) -> OmniMicrobatch:
        return self._get(modality).next_microbatch()

    def validation_microbatches(self, modality: str) -> List[OmniMicrobatch]:
        """This rank's shard of the modality's held-out set (built once, then cached), packed like
        training.  DP ranks may hold different numbers of microbatches: sum (loss, tokens) over
        them and all-reduce across DP, as the training loss does."""
        self._get(modality)
        if modality not in self._validation:
            batches, skipped = self._streams[modality].validation_microbatches()
            self._validation[modality], self._validation_skipped[modality] = batches, skipped
        return self._validation[modality]

    # ---------------------------------------------------------------- checkpointing
    def state_dict(self) -> Dict[str, Any]:
        """Position before the first unconsumed microbatch of every modality (this DP rank)."""
        return {name: p.state_dict() for name, p in self._prefetch.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = set(self._prefetch) - set(state)
        if missing:
            raise ValueError(f"loader state has no position for modalities {sorted(missing)} "
                             f"(it holds {sorted(state)}); the blend changed since the checkpoint")
        for name, p in self._prefetch.items():
            p.load_state_dict(state[name])

    def pause_prefetch(self) -> None:
        """Stop the background threads before the process forks: megatron's checkpoint writer
        forks writer processes, and a fork taken while a decoding thread holds a lock (DALI,
        torch, malloc) deadlocks the child.  What they built ahead is kept for the next requests."""
        for p in self._prefetch.values():
            p.pause()

    # ---------------------------------------------------------------- metrics
    def skipped_by_reason(self) -> Dict[str, int]:
        """Cumulative training-sample skips of this rank, ``"modality/reason" -> count``."""
        out: Dict[str, int] = {}
        for name, p in self._prefetch.items():
            for reason, n in p.state_dict()["skipped"].items():
                out[f"{name}/{reason}"] = n
        return out

    def bad_samples(self) -> Dict[str, int]:
        """Distinct training samples of this rank found unusable, per modality (each counted once,
        however often the order brings it round; `skipped_samples` counts every skip)."""
        return {name: len(p.state_dict().get("bad", [])) for name, p in self._prefetch.items()}

    @property
    def skipped_samples(self) -> int:
        return sum(self.skipped_by_reason().values())

    def skipped_by_modality(self) -> Dict[str, int]:
        """Cumulative training-sample skips (occurrences) of this rank per modality."""
        return {name: sum(p.state_dict()["skipped"].values()) for name, p in self._prefetch.items()}

    def padding_fraction(self, modality: str = None) -> float:
        """Share of padding in the microbatches consumed so far (one modality or all)."""
        names = [modality] if modality is not None else list(self._prefetch)
        real = total = 0
        for name in names:
            s = self._get(name).state_dict()
            real, total = real + s["real_tokens"], total + s["total_tokens"]
        return 1.0 - real / total if total else 0.0

    def metrics(self) -> Dict[str, float]:
        """Fields for metrics.jsonl (this rank; all-reduce the counts across DP)."""
        return {"skipped_samples": self.skipped_samples, "bad_samples": sum(self.bad_samples().values()),
                "padding_fraction": self.padding_fraction()}

    def close(self) -> None:
        for name, p in self._prefetch.items():
            p.stop()
            self._streams[name].close()
        if self.decode_pool is not None:
            self.decode_pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "OmniLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
