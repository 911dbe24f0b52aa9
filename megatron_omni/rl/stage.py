"""The GSPO stage in the training loop: rollouts, rewards, advantages, then mini-batch updates.

`GSPOData` stands where `OmniData` stands for the supervised stages (the GSPO task,
`training/tasks/gspo.py`, asks it for each optimizer step's microbatch iterators and metrics).
One *rollout batch* feeds `gspo.minibatches` consecutive optimizer steps; at its first step:

1. this DP rank draws its prompts (`rollout.PromptSource`) and every model-parallel rank of the
   replica generates G responses per prompt with the *current* policy, on the training layout
   (`megatron_omni.inference.generate`: same TP/PP/VPP chunks, no resharded copy), keeping the
   sampled tokens' log-probs (pi_old);
2. the responses are decoded and scored by their source's rule rewards (`rl/rewards.py`), and the
   advantages normalised within each prompt's group (`rl/advantages.py`);
3. prompt + response become training rows (one rollout per row, padded to data.seq_length), the
   old log-probs laid on the label positions; optionally a forward-only pass recomputes pi_old
   with the training forward (`gspo.old_logprobs=recompute`) and one with the LoRA adapters off
   gives pi_ref (`gspo.kl_coef > 0`).

Each optimizer step then runs the omni forward step over its mini-batch's microbatches with the
GSPO loss (`rl/loss.py`).  Mini-batch k of a rollout batch is its k-th contiguous slice (a
prompt's G rollouts stay together when G divides the mini-batch).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_omni.config.loader import ConfigError
from megatron_omni.config.schema import RunConfig
from megatron_omni.data.packing import collate_rows
from megatron_omni.rl.advantages import group_advantages
from megatron_omni.rl.forward_step import gspo_forward_step
from megatron_omni.rl.loss import GSPO_REPORTS, LOGPROBS, RolloutTargets
from megatron_omni.rl.rewards import combined_reward
from megatron_omni.rl.rollout import PromptSource, RolloutEncoder
from megatron_omni.training.omni_data import sum_reports
from megatron_omni.training.omni_step import PlannedMicrobatch
from megatron_omni.training.step import LM_LOSS, run_schedule

log = logging.getLogger(__name__)

__all__ = ["GSPOData", "build_gspo_data"]


def _mean_std(total: float, sq: float, n: float):
    if n <= 0:
        return None, None
    mean = total / n
    return mean, max(sq / n - mean * mean, 0.0) ** 0.5


class GSPOData:
    forward_step_func = staticmethod(gspo_forward_step)

    def __init__(self, cfg: RunConfig, prompts: PromptSource, encoder: RolloutEncoder, num_chunks: int,
                 num_microbatches: int):
        self.cfg, self.g = cfg, cfg.gspo
        self.prompts, self.encoder = prompts, encoder
        self.num_chunks, self.num_microbatches = num_chunks, num_microbatches
        self.modalities = prompts.modalities
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        mbs = cfg.train.micro_batch_size
        self.rollouts_per_rank = num_microbatches * mbs * self.g.minibatches
        if self.rollouts_per_rank % self.g.group_size:
            raise ConfigError(
                f"a GSPO rollout batch holds train.global_batch_size x gspo.minibatches = "
                f"{cfg.train.global_batch_size} x {self.g.minibatches} rollouts ({self.rollouts_per_rank} per DP rank), "
                f"not a multiple of gspo.group_size={self.g.group_size}; change one of them")
        self.prompts_per_rank = self.rollouts_per_rank // self.g.group_size
        if self.g.kl_coef > 0 and cfg.lora is None:
            raise ConfigError("gspo.kl_coef > 0 needs the reference policy: gspo.reference=lora_off is the model "
                              "with its LoRA adapters off, so add a lora: section (or set gspo.kl_coef=0)")
        self._batch_index: Optional[int] = None
        self._planned: List[PlannedMicrobatch] = []
        self._rollout_metrics: Dict[str, object] = {}
        self._step_microbatches: Dict[str, int] = {}
        self._rollout_time = self._train_start = 0.0
        self.last_texts: List[str] = []  # the last rollout batch's decoded responses and rewards (this rank)
        self.last_rewards: List[float] = []

    # ---------------------------------------------------------------- per optimizer step

    def step_iterators(self, step: int, model: list) -> List[object]:
        index, k = divmod(step, self.g.minibatches)
        self._rollout_time = 0.0
        if self._batch_index != index:
            if k:
                log.info("gspo: resumed inside rollout batch %d: generating it again for its mini-batches %d..",
                         index, k)
            start = time.perf_counter()
            self._rollout(index, model)
            self._rollout_time = time.perf_counter() - start
        per = self.num_microbatches
        planned = self._planned[k * per:(k + 1) * per]
        self._step_microbatches = {}
        for p in planned:
            self._step_microbatches[p.batch.modality] = self._step_microbatches.get(p.batch.modality, 0) + 1
        self._train_start = time.perf_counter()
        return [iter(planned) for _ in range(self.num_chunks)]

    def _rollout(self, index: int, model: list) -> None:
        from megatron_omni.inference.generate import PromptMedia, SamplingParams, generate

        g, cfg = self.g, self.cfg
        rows = self.prompts.draw(index, self.prompts_per_rank, self.dp_rank, self.dp_size)
        encoded = [self.encoder.prompt(r.row) for r in rows]
        limit = cfg.data.seq_length - g.max_new_tokens
        for r, e in zip(rows, encoded):
            if len(e.tokens) > limit:
                raise ConfigError(f"{r.row.where} ({r.row.id}): prompt of {len(e.tokens)} tokens + gspo.max_new_tokens="
                                  f"{g.max_new_tokens} exceeds data.seq_length={cfg.data.seq_length}; raise "
                                  f"data.seq_length or lower max_new_tokens")
        G = g.group_size
        prompt_ids = [e.tokens for e in encoded for _ in range(G)]
        fields = [e.media.sample_fields() for e in encoded]
        media = [PromptMedia(**f) if f else None for f in fields for _ in range(G)]
        params = SamplingParams(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_k=g.top_k,
                                top_p=g.top_p, seed=(cfg.train.seed * 7919 + index * 104729 + self.dp_rank) % 2**62,
                                stop_ids=self.encoder.stop_ids, pad_id=self.encoder.stop_ids[-1])
        out = generate(model, prompt_ids, params, media=media)
        responses = [out.tokens[i, :int(out.lengths[i])].tolist() for i in range(len(prompt_ids))]
        texts = [self.encoder.decode(t) for t in responses]
        rewards = torch.tensor([combined_reward(text, rows[i // G].target, rows[i // G].source.rewards)
                                for i, text in enumerate(texts)], dtype=torch.float64)
        advantages = group_advantages(rewards, G, eps=g.advantage_eps, std=g.advantage_std).float()
        self.last_texts, self.last_rewards = texts, rewards.tolist()
        if index == 0 or index % 10 == 0:
            log.info("gspo rollout batch %d, first group: %s", index, [
                (texts[i], float(rewards[i])) for i in range(min(G, len(texts)))])

        S, mbs = cfg.data.seq_length, cfg.train.micro_batch_size
        pad = self.encoder.stop_ids[-1]
        self._planned = []
        for start in range(0, len(responses), mbs):
            idx = list(range(start, start + mbs))
            samples = [self.encoder.sample(encoded[i // G], rows[i // G].row, responses[i]) for i in idx]
            kinds = {rows[i // G].modality for i in idx}
            batch = collate_rows([[s] for s in samples], S, pad_token_id=pad,
                                 modality=kinds.pop() if len(kinds) == 1 else "mixed")
            old = torch.zeros(mbs, S, dtype=torch.float32)
            for b, i in enumerate(idx):
                n = len(encoded[i // G].tokens)
                L = len(responses[i])
                old[b, n - 1:n - 1 + L] = out.logprobs[i, :L]  # label of position n-1+j is response token j
            targets = RolloutTargets(old_logp=old, advantages=advantages[idx], config=g)
            self._planned.append(PlannedMicrobatch(batch, 1.0, rollout=targets))
        gap = torch.zeros(2, dtype=torch.float64)  # sum |log pi_rollout - log pi_train| over response tokens, count
        if g.old_logprobs == "recompute":
            for p, logp in zip(self._planned, self._logprob_pass(model, reference=False)):
                if logp is not None:
                    m = p.batch.loss_mask.bool()
                    gap += torch.tensor([float((logp.cpu() - p.rollout.old_logp).abs()[m].sum()), float(m.sum())],
                                        dtype=torch.float64)
                    p.rollout.old_logp = logp
        if g.kl_coef > 0:
            for p, logp in zip(self._planned, self._logprob_pass(model, reference=True)):
                if logp is not None:
                    p.rollout.ref_logp = logp
        self._batch_index = index
        self._rollout_metrics = self._reduce_rollout_stats(rows, rewards, out.lengths)
        if g.old_logprobs == "recompute":  # how far the sampler's log-probs are from the training forward's
            gap = gap.to(torch.cuda.current_device())
            dist.all_reduce(gap, group=parallel_state.get_pipeline_model_parallel_group())
            dist.all_reduce(gap, group=parallel_state.get_data_parallel_group())
            self._rollout_metrics["rollout_logp_gap"] = float(gap[0] / gap[1].clamp(min=1))

    @torch.no_grad()
    def _logprob_pass(self, model: list, reference: bool) -> List[Optional[torch.Tensor]]:
        """log pi of every label position of every rollout microbatch, forward only (last pipeline
        stage; None elsewhere); `reference`: with the LoRA adapters off (pi_ref)."""
        from megatron_omni.models.lora import adapters_disabled

        items = [PlannedMicrobatch(p.batch, 0.0, rollout=RolloutTargets(p.rollout.old_logp, p.rollout.advantages,
                                                                           self.g, logprobs_only=True))
                 for p in self._planned]
        with adapters_disabled(model) if reference else contextlib.nullcontext():
            reports = run_schedule(model, [iter(items) for _ in range(self.num_chunks)], num_microbatches=len(items),
                                   seq_length=self.cfg.data.seq_length, micro_batch_size=self.cfg.train.micro_batch_size,
                                   forward_only=True, forward_step_func=self.forward_step_func)
        if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            return [None] * len(items)
        return [r[LOGPROBS] for r in reports]

    def _reduce_rollout_stats(self, rows, rewards: torch.Tensor, lengths: torch.Tensor) -> Dict[str, object]:
        """Reward mean / std per modality and the mean response length over all DP ranks."""
        G = self.g.group_size
        stats = torch.zeros(len(self.modalities) + 1, 3, dtype=torch.float64)
        for i, r in enumerate(rewards.tolist()):
            m = self.modalities.index(rows[i // G].modality)
            stats[m] += torch.tensor([1.0, r, r * r], dtype=torch.float64)
        stats[-1] += torch.tensor([float(lengths.numel()), float(lengths.sum()), float((lengths.double() ** 2).sum())])
        stats = stats.to(torch.cuda.current_device())
        dist.all_reduce(stats, group=parallel_state.get_data_parallel_group())
        stats = stats.cpu().tolist()
        by_mod = {m: _mean_std(s[1], s[2], s[0]) for m, s in zip(self.modalities, stats) if s[0] > 0}
        n_all = sum(s[0] for s in stats[:-1])
        mean_all, std_all = _mean_std(sum(s[1] for s in stats[:-1]), sum(s[2] for s in stats[:-1]), n_all)
        return {"reward_mean": mean_all, "reward_std": std_all,
                "reward_mean_by_modality": {m: v[0] for m, v in by_mod.items()},
                "reward_std_by_modality": {m: v[1] for m, v in by_mod.items()},
                "response_length_mean": stats[-1][1] / max(stats[-1][0], 1.0),
                "rollouts": int(stats[-1][0])}

    # ---------------------------------------------------------------- metrics (loop interface)

    def step_metrics(self, losses_reduced: List[Dict[str, torch.Tensor]]) -> Dict[str, object]:
        t = {name: v.tolist() for name, v in sum_reports(losses_reduced, [LM_LOSS, *GSPO_REPORTS]).items()}

        def mean(name):
            s, n = t[name]
            return s / n if n > 0 else None

        return {"gspo_loss": mean("gspo loss"), "clip_fraction": mean("gspo clip fraction"), "kl": mean("gspo kl"),
                "ratio_mean": mean("gspo ratio"), "rollout_batch": self._batch_index,
                "rollout_time_s": self._rollout_time, "train_time_s": time.perf_counter() - self._train_start,
                **self._rollout_metrics, "encoder_flops": 0.0}

    def tokens_per_modality(self) -> Dict[str, int]:
        rows = self.cfg.train.micro_batch_size * self.dp_size
        return {m: n * rows * self.cfg.data.seq_length for m, n in self._step_microbatches.items()}

    def modality_weights(self, step: int) -> Dict[str, float]:
        return {}

    def validation_losses(self, model, run_schedule) -> Dict[str, float]:
        return {}  # a GSPO stage has no held-out loss; its progress is the reward

    def update_balance(self, val_losses) -> None:
        return None

    # ---------------------------------------------------------------- checkpoint

    def before_checkpoint(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {"gspo_rollout_batch": self._batch_index}  # prompts are a function of the batch index

    def load_state_dict(self, state) -> None:
        pass


def build_gspo_data(cfg: RunConfig, vocab, num_chunks: int, num_microbatches: int) -> GSPOData:
    from megatron_omni.data.blend import load_blend
    from megatron_omni.inference.chat import ChatPrompts

    d = cfg.data
    if not d.omni_blend or not d.root:
        raise ConfigError("a GSPO stage needs data.omni_blend (a blend of verifiable QA sources with rewards, e.g. "
                          "configs/data/gspo.yaml) and data.root (python tools/make_demo_data.py --out DIR)")
    if d.mock:
        raise ConfigError("a GSPO stage has no mock data (rewards need answers): drop data.mock")
    blend = load_blend(d.omni_blend)
    chat = ChatPrompts(cfg)
    if chat.vocab.size != vocab.size:
        raise ConfigError(f"the tokenizer's omni vocabulary ({chat.vocab.size}) is not the model's ({vocab.size})")
    encoder = RolloutEncoder(chat, cfg.omni.vision, cfg.omni.audio, blend, d.root)
    prompts = PromptSource(blend, d.root, cfg.train.seed)
    log.info("gspo: blend %s, %d prompts over %s; G=%d, %d mini-batches per rollout batch",
             d.omni_blend, len(prompts.rows), ", ".join(prompts.modalities), cfg.gspo.group_size, cfg.gspo.minibatches)
    return GSPOData(cfg, prompts, encoder, num_chunks, num_microbatches)
