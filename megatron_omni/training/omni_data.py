"""Omni data for the training loop: per-step microbatch plans, iterators, loss reports, state.

Every step, the modality plan (which modality each of this DP rank's pipeline microbatches
carries, and the per-modality loss weights) comes from the scheduler; the microbatches are drawn
from the per-modality streams of the data source, their loss scales computed from the DP-global
token counts (`omni_step.plan_loss_scales`), and every model chunk of this rank gets an iterator
over the same list (all pipeline stages read the microbatch: positions and the packing mask are
needed everywhere).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Dict, List, Optional, Tuple, Type

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_omni.balance import ModalityRoundScheduler, SchedulerConfig
from megatron_omni.balance.loss import all_reduce_modality_tokens, local_modality_tokens, microbatch_loss_scale
from megatron_omni.config.loader import ConfigError
from megatron_omni.config.schema import RunConfig
from megatron_omni.data.omni_batch import OmniMicrobatch
from megatron_omni.data.omni_source import OmniSource
from megatron_omni.data.preference_stream import PREFERENCE
from megatron_omni.parallel.layout import unwrap
from megatron_omni.training import flops
from megatron_omni.training.encoder_flops import encoder_training_flops
from megatron_omni.training.omni_step import (
    AUDIO_GEN_LOSS,
    MODALITY_LOSS_PREFIX,
    UNDERSTANDING_LOSS,
    PlannedMicrobatch,
    omni_forward_step,
)
from megatron_omni.training.step import LM_LOSS

log = logging.getLogger(__name__)


def sum_reports(losses_reduced: List[Dict[str, torch.Tensor]], names: List[str]) -> Dict[str, torch.Tensor]:
    """{report name: [sum, count]} of the step's microbatch reports (megatron's `losses_reduced`)
    summed over microbatches and DP x CP, identical on every rank (one all-reduce on the last
    pipeline stage + one broadcast over the pipeline)."""
    totals = torch.zeros(len(names), 2, dtype=torch.float64, device=torch.cuda.current_device())
    for item in losses_reduced:
        for i, name in enumerate(names):
            if name in item:
                totals[i] += item[name].to(totals.dtype)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    dist.broadcast(totals, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                   group=parallel_state.get_pipeline_model_parallel_group())
    return {name: totals[i].cpu() for i, name in enumerate(names)}


def report_mean(total: torch.Tensor) -> Optional[float]:
    """sum / count of a summed report ([sum, count]); None when nothing was counted."""
    return float(total[0] / total[1]) if float(total[1]) > 0 else None


class OmniData:
    """The omni stages' data plan.  Alignment tuning's variant (DPO pairs, their reference pass,
    Eq. 2's weights) is `training/tasks/alignment.py::AlignmentData`, which overrides the hooks
    `_loss_units`, `_planned`, `_before_step`, `_effective_weights`, `report_names` and `_metrics`."""

    forward_step_func = staticmethod(omni_forward_step)

    def __init__(self, cfg: RunConfig, source: OmniSource, scheduler: ModalityRoundScheduler, num_chunks: int,
                 num_microbatches: int):
        if not isinstance(source, OmniSource):
            missing = [n for n in vars(OmniSource) if not n.startswith("_") and not hasattr(source, n)]
            raise TypeError(f"omni data source {type(source).__name__} lacks {missing} of OmniSource "
                            "(data/omni_source.py)")
        self.cfg, self.source, self.scheduler = cfg, source, scheduler
        self.num_chunks, self.num_microbatches = num_chunks, num_microbatches
        self.modalities: List[str] = list(scheduler.modalities)
        # Dynamic adaptive balance (Sec. 3.2): validation losses every train.eval_interval steps.
        self.balancer = scheduler.make_adaptive_balancer() if scheduler.cfg.adaptive.enabled else None
        self._step_encoder_flops: Dict[str, float] = {}
        self._step_llm_flops = 0.0
        self._step_microbatches: Dict[str, int] = {}
        self._step_samples: List[Tuple[str, List[str]]] = []

    # ---------------------------------------------------------------- per step

    def step_iterators(self, step: int, model: Optional[list] = None) -> List[Optional[object]]:
        plan = self.scheduler.plan(step)
        if len(plan.microbatch_modalities) != self.num_microbatches:
            raise RuntimeError(f"scheduler planned {len(plan.microbatch_modalities)} microbatches, "
                               f"the step has {self.num_microbatches}")
        batches = [self.source.next_microbatch(m) for m in plan.microbatch_modalities]
        if model and unwrap(model[0]).pre_process:  # the placeholder counts, read here on the host tensors
            for b in batches:
                b.count_placeholders(unwrap(model[0]).vocab.placeholder_ids)
        # Eq. 5/7 scaling needs every modality's loss units over the whole global batch.  Over DP
        # only: the CP ranks of a replica read the same microbatches.
        units = [self._loss_units(b) for b in batches]
        tokens = all_reduce_modality_tokens(
            local_modality_tokens(plan.microbatch_modalities, units, self.modalities),
            parallel_state.get_data_parallel_group())
        weights = self._effective_weights(plan.modality_weights)
        planned = [self._planned(b, microbatch_loss_scale(b.modality, tokens, weights)) for b in batches]
        self._before_step(model, planned)
        omni = self.cfg.omni
        # per modality, so throughput reports can show each modality's encoder share of the FLOPs
        self._step_encoder_flops = {m: 0.0 for m in self.modalities}
        for b in batches:
            self._step_encoder_flops[b.modality] += encoder_training_flops(omni, b, lora=self.cfg.lora is not None)
        # The LLM's model FLOPs of the packed rows: attention stays inside each cu_seqlens segment
        # (sum L_i^2, what the THD kernels compute), not the S^2 of an unpacked row.
        self._step_llm_flops = sum(flops.llm_flops(self.cfg.model, b.cu_seqlens.diff().tolist(), tp=self.cfg.parallel.tp,
                                                   weight_grads="llm" not in omni.freeze) for b in batches)
        self._step_microbatches = plan.counts()
        # host metadata for the loss-spike log: (modality, packed sample ids) per microbatch
        self._step_samples = [(b.modality, [i for row in b.sample_ids or [] for i in row]) for b in batches]
        return [iter(planned) for _ in range(self.num_chunks)]

    def step_samples(self) -> List[Tuple[str, List[str]]]:
        """(modality, sample ids) of each of this DP rank's microbatches of the last step, in order."""
        return self._step_samples

    def _loss_units(self, batch: OmniMicrobatch) -> torch.Tensor:
        """What a modality's loss is a mean over (Eq. 5/7): its target tokens."""
        return batch.loss_mask

    def _planned(self, batch: OmniMicrobatch, loss_scale: float) -> PlannedMicrobatch:
        return PlannedMicrobatch(batch, loss_scale)

    def _before_step(self, model: Optional[list], planned: List[PlannedMicrobatch]) -> None:
        """Work the step's microbatches need before the schedule runs them (none here)."""

    def report_names(self) -> List[str]:
        return [LM_LOSS, UNDERSTANDING_LOSS, AUDIO_GEN_LOSS] + [MODALITY_LOSS_PREFIX + m for m in self.modalities]

    def reduce_reports(self, losses_reduced: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        return sum_reports(losses_reduced, self.report_names())

    def step_metrics(self, losses_reduced: List[Dict[str, torch.Tensor]]) -> Dict[str, object]:
        """The step's fields of the metrics row (collective: report sums over DP x CP and PP)."""
        return self._metrics(self.reduce_reports(losses_reduced))

    def _metrics(self, totals: Dict[str, torch.Tensor]) -> Dict[str, object]:
        losses = {name[len(MODALITY_LOSS_PREFIX):]: report_mean(t) for name, t in totals.items()
                  if name.startswith(MODALITY_LOSS_PREFIX) and float(t[1]) > 0}
        skipped, by_modality, bad, encoder_flops, llm_flops = self._dp_sums()
        return {"losses": losses, "understanding_loss": report_mean(totals[UNDERSTANDING_LOSS]),
                "audio_gen_loss": report_mean(totals[AUDIO_GEN_LOSS]),
                "skipped_samples": int(skipped), "skipped_samples_by_modality": by_modality,
                "bad_samples_by_modality": bad, "encoder_flops": sum(encoder_flops.values()),
                "encoder_flops_by_modality": encoder_flops, "llm_flops": llm_flops}

    def _dp_sums(self) -> Tuple[float, Dict[str, int], Dict[str, int], Dict[str, float], float]:
        """(skipped samples, {modality: skips}, {modality: distinct bad samples}, {modality: encoder
        FLOPs of the step}, the LLM's FLOPs of the step) summed over the data-parallel group in one
        all-reduce: every rank of a DP replica (its TP, PP and CP ranks) reads the same data, so each
        replica counts once."""
        ms = self.modalities
        skips = self.source.skipped_by_modality()  # occurrences
        bad = self.source.bad_samples()  # distinct samples
        n = torch.tensor([float(self.source.skipped_samples), *(float(skips.get(m, 0)) for m in ms),
                          *(float(bad.get(m, 0)) for m in ms), *(self._step_encoder_flops.get(m, 0.0) for m in ms),
                          self._step_llm_flops], dtype=torch.float64, device=torch.cuda.current_device())
        dist.all_reduce(n, group=parallel_state.get_data_parallel_group())
        values = n.tolist()
        k = len(ms)
        return (values[0], {m: int(v) for m, v in zip(ms, values[1:1 + k])},
                {m: int(v) for m, v in zip(ms, values[1 + k:1 + 2 * k])},
                dict(zip(ms, values[1 + 2 * k:1 + 3 * k])), values[-1])

    def tokens_per_modality(self) -> Dict[str, int]:
        """Tokens (rows x seq_length) each modality carried in the last step, over all DP ranks."""
        rows = self.cfg.train.micro_batch_size * parallel_state.get_data_parallel_world_size()
        return {m: n * rows * self.cfg.data.seq_length for m, n in self._step_microbatches.items()}

    # ---------------------------------------------------------------- validation / adaptive balance

    @torch.no_grad()
    def validation_losses(self, model: list, run_schedule) -> Dict[str, float]:
        """Each modality's mean token loss on its held-out validation microbatches (forward only)."""
        for chunk in model:
            chunk.eval()
        out = {}
        dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        for m in self.modalities:
            batches = self.source.validation_microbatches(m)
            # Every DP rank runs the same number of forwards: expert-parallel collectives span DP.
            n = torch.tensor([len(batches)], device=torch.cuda.current_device())
            dist.all_reduce(n, op=dist.ReduceOp.MIN, group=dp_group)
            batches = batches[:int(n.item())]
            if not batches:  # e.g. the DPO stream: not part of the adaptive balance
                continue
            iterators = [iter([self._planned(b, 1.0) for b in batches]) for _ in range(self.num_chunks)]
            losses = run_schedule(model, iterators, num_microbatches=len(batches), seq_length=self.cfg.data.seq_length,
                                  micro_batch_size=self.cfg.train.micro_batch_size, forward_only=True,
                                  forward_step_func=self.forward_step_func)
            t = self.reduce_reports(losses)[LM_LOSS]
            out[m] = float(t[0] / t[1])
        for chunk in model:
            chunk.train()
        return out

    def update_balance(self, val_losses: Dict[str, float]) -> Optional[Dict[str, float]]:
        """Feed one validation segment to the adaptive balancer (Eq. 8-11); returns the new weights."""
        if self.balancer is None:
            return None
        weights = self.balancer.update([val_losses[m] for m in self.modalities])
        self.scheduler.set_adaptive_weights(weights)
        return dict(zip(self.modalities, weights))

    def _effective_weights(self, planned: Dict[str, float]) -> Dict[str, float]:
        """The scheduler's w_i of each modality (Eq. 5/7)."""
        return {m: planned.get(m, 1.0) for m in self.modalities}

    def modality_weights(self, step: int) -> Dict[str, float]:
        return self._effective_weights(self.scheduler.plan(step).modality_weights)

    # ---------------------------------------------------------------- checkpoint

    def before_checkpoint(self) -> None:
        """Quiesce the loader's background threads (megatron's checkpoint writer forks)."""
        self.source.pause_prefetch()

    def state_dict(self) -> dict:
        return {"source": self.source.state_dict(), "scheduler": self.scheduler.state_dict(),
                "balancer": self.balancer.state_dict() if self.balancer is not None else None}

    def load_state_dict(self, state) -> None:
        """A dict from `state_dict()`, or a list of them, one per DP rank of a checkpoint written at
        another DP size: the position is re-split over this run's DP ranks (data/resplit.py); the
        scheduler and balancer are the same on every rank."""
        if isinstance(state, list):
            from megatron_omni.data.resplit import resplit_source_state

            source = resplit_source_state([s["source"] for s in state], parallel_state.get_data_parallel_rank(),
                                          parallel_state.get_data_parallel_world_size())
            state = {**state[0], "source": source}
        self.source.load_state_dict(state["source"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.balancer is not None and state.get("balancer") is not None:
            self.balancer.load_state_dict(state["balancer"])


def build_omni_data(cfg: RunConfig, vocab, num_chunks: int, num_microbatches: int,
                    data_type: Type[OmniData] = OmniData) -> OmniData:
    """The stage's source (the blend loader, or mock data with `data.mock`) and modality scheduler
    (`balance:`, by default every modality of the data) as `data_type`."""
    dp_rank = parallel_state.get_data_parallel_rank()
    if cfg.data.mock:
        from megatron_omni.data.mock_omni import MockOmniData

        source = MockOmniData(cfg.omni, vocab, seq_length=cfg.data.seq_length,
                              micro_batch_size=cfg.train.micro_batch_size, seed=cfg.train.seed, dp_rank=dp_rank,
                              preference=cfg.dpo is not None)
        log.info("omni data: mock microbatches (data.mock=true), modalities %s", ", ".join(source.modalities))
        text_share = None
    else:
        source, text_share = build_blend_loader(cfg, vocab, dp_rank)
    balance = cfg.balance
    if balance is None:  # every modality of the data in each update, equal weights, the blend's text share
        balance = SchedulerConfig(mode="accumulation", modalities=list(source.modalities), pure_text_share=text_share)
    missing = [m for m in balance.modalities if m not in source.modalities]
    if missing:
        raise ValueError(f"balance.modalities {missing} have no data (data modalities: {list(source.modalities)})")
    if PREFERENCE in balance.modalities and cfg.dpo is None:
        raise ConfigError(f"data.omni_blend={cfg.data.omni_blend} has DPO preference pairs: alignment tuning needs a "
                          "dpo: section (e.g. dpo: {beta: 0.1, it_weight: 0.3}, configs/tiny/stages/at.yaml)")
    scheduler = ModalityRoundScheduler(balance, num_microbatches, cfg.train.seed)
    log.info("modality plan: %s over %s (pure-text share %s)", balance.mode, ", ".join(balance.modalities),
             balance.pure_text_share)
    return data_type(cfg, source, scheduler, num_chunks, num_microbatches)


def build_blend_loader(cfg: RunConfig, vocab, dp_rank: int):
    """The stage's `OmniLoader` over `data.omni_blend` under `data.root`; returns (loader, the
    blend's pure-text share when it has a text stream, else None)."""
    from megatron_omni.config.loader import ConfigError
    from megatron_omni.data.blend import load_blend, read_blend_manifests
    from megatron_omni.data.chat_template import ChatTemplate
    from megatron_omni.data.preference_stream import PreferenceStream, WithPreferences
    from megatron_omni.data.sample_builder import build_preference_pair
    from megatron_omni.data.blend_loader import build_omni_loader
    from megatron_omni.data.modality_stream import LoaderConfig
    from megatron_omni.data.tokenizer import build_tokenizer

    d = cfg.data
    if not d.omni_blend or not d.root:
        raise ConfigError("an omni run needs data.omni_blend (a stage blend YAML, e.g. configs/data/pt3.yaml) and "
                          "data.root (the folder of its manifests; python tools/make_demo_data.py --out DIR "
                          "builds the demo one), or data.mock=true")
    blend = load_blend(d.omni_blend)
    tokenizer = build_tokenizer(d, vocab_size=cfg.model.vocab_size)
    # one bad_samples.jsonl line per distinct sample: written by the first TP rank / stage of each DP rank
    first_of_replica = parallel_state.get_tensor_model_parallel_rank() == 0 and \
        parallel_state.get_pipeline_model_parallel_rank() == 0
    config = LoaderConfig(seq_length=d.seq_length, micro_batch_size=cfg.train.micro_batch_size,
                          seed=cfg.train.seed, pad_token_id=vocab.id("<|eot_id|>"),
                          max_bad_fraction=d.max_bad_fraction, bad_window=d.bad_window, lookahead=d.lookahead,
                          lookahead_mib=d.lookahead_mib, prefetch=d.prefetch, decode_workers=d.decode_workers,
                          pin_memory=d.pin_memory,
                          bad_samples_log=os.path.join(cfg.train.output_dir, "bad_samples.jsonl")
                          if first_of_replica else None)
    dp_size = parallel_state.get_data_parallel_world_size()
    # Sources of DPO rows (alignment tuning, Eq. 2) form the "preference" stream, not a modality's.
    rows = read_blend_manifests(blend, d.root)
    preference = [s for s in blend.sources if rows[s.name] and all(r.task == "dpo" for r in rows[s.name])]
    if preference:
        blend = dataclasses.replace(blend, sources=[s for s in blend.sources if s not in preference])
    loader = build_omni_loader(
        blend, root=d.root, tokenizer=tokenizer, vocab=vocab, vision=cfg.omni.vision, audio=cfg.omni.audio,
        config=config, dp_rank=dp_rank, dp_size=dp_size)
    if preference:
        build_pair = functools.partial(
            build_preference_pair, root=d.root, tokenizer=tokenizer, vocab=vocab, vision=cfg.omni.vision,
            audio=cfg.omni.audio, max_image_tokens=blend.max_image_tokens, max_video_frames=blend.max_video_frames,
            template=ChatTemplate(tokenizer, vocab))
        pairs = PreferenceStream([r for s in preference for r in rows[s.name]], build_pair, config,
                                 dp_rank=dp_rank, dp_size=dp_size)
        loader = WithPreferences(loader, pairs)
    log.info("omni data: blend %s (stage %s) under %s, modalities %s", d.omni_blend, blend.stage, d.root,
             ", ".join(loader.modalities))
    return loader, (blend.pure_text_share if "text" in loader.modalities else None)
