"""`generate`: KV-cached generation on the training layout (TP, PP, VPP), for Llama and the omni model.

Every rank of a model-parallel group calls `generate` with the same prompts and params; every rank
gets the same `GenerationOutput`.  Per step: one pipeline pass (`pipeline.pipeline_forward`) of the
new tokens against megatron-core's `StaticInferenceContext` (the KV cache lives in megatron's own
attention, `Attention._adjust_key_value_for_inference`), the last stage picks the next token from
the TP-gathered logits (`sampling.sample_next`) and broadcasts it, with its log-prob, over the
pipeline (`broadcast_from_last_pipeline_stage`).  Prompts are left padded (`prompts.py`).

What megatron-core's inference stack gives and what it does not (0.16.1):
* used: `StaticInferenceContext` (KV cache, last-token logits), its pipeline p2p helpers,
  `set_model_to_sequence_parallel` (SP is switched off while generating: a decode step has one token
  per row, which cannot be split over TP ranks; restored afterwards).
* not used: `StaticInferenceEngine` / `TextGenerationController` / `GPTInferenceWrapper`.  Their
  static path pads prompts on the right and feeds the longer prompts' tails one token per decode
  step, which cannot carry media (the encoders' tokens must be scattered into the prompt at
  prefill); the wrapper builds 1D position ids (M-RoPE needs [3, B, S] ids continued with the
  `deltas` rule), runs only non-interleaved pipelines ("vpp is not used in inference") and needs a
  tokenizer object.  The dynamic engine needs flash-attention kernels (no CPU path).
* padding mask: megatron's local attention applies the given mask in prefill and decode; TE's
  attention and the fused softmax kernels follow the mask *type* (causal / no_mask in decode) and
  would ignore padding.  With those, prompts of different lengths are generated in groups of equal
  length (a log line says so) - correct, only less batched.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Union

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.utils import set_model_to_sequence_parallel
from torch import Tensor

from megatron_omni.inference.pipeline import pipeline_forward
from megatron_omni.inference.prompts import (
    PromptBatch,
    PromptMedia,
    build_prompt_batch,
    decode_attention_mask,
    prefill_attention_mask,
)
from megatron_omni.inference.sampling import SamplingParams, sample_next
from megatron_omni.parallel.layout import unwrap

__all__ = ["GenerationOutput", "SamplingParams", "PromptMedia", "generate"]

log = logging.getLogger(__name__)


@dataclass
class GenerationOutput:
    """`tokens` [B, K] int64 new tokens (K = max_new_tokens), each row padded after its stop token with
    `SamplingParams.padding_id`; `logprobs` [B, K] float32 log-probs of the chosen tokens (0 on
    padding; `SamplingParams.logprobs_over` says over what, see `sampling`); `lengths` [B] int64 new
    tokens per row, the stop token included.  CPU tensors, the same on every rank."""

    tokens: Tensor
    logprobs: Tensor
    lengths: Tensor
    elapsed_s: float = 0.0

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())


def _omni_model(model: torch.nn.Module):
    from megatron_omni.models.omni import OmniModel

    return model if isinstance(model, OmniModel) else None


def _real_vocab_size(model: torch.nn.Module, vocab_size: Optional[int]) -> int:
    if vocab_size is not None:
        return int(vocab_size)
    omni = _omni_model(model)
    if omni is not None:
        return omni.vocab.size
    real = getattr(model, "real_vocab_size", None)
    if real is None:
        raise ValueError("generate: the model does not record its unpadded vocabulary size (built outside "
                         "models.llama.build_llama_chunks); pass vocab_size=")
    return int(real)


def _padding_mask_honoured(chunks: Sequence[torch.nn.Module]) -> bool:
    """True when every attention of the model applies an explicit padding mask (megatron's local
    attention with the unfused softmax); agreed over the model-parallel group (stages differ)."""
    ok = True
    for chunk in chunks:  # the LLM decoder only: the encoders run once, unpadded, at prefill
        decoder = getattr(unwrap(chunk), "decoder", None)
        for module in decoder.modules() if decoder is not None else ():
            if hasattr(module, "core_attention"):
                # the THD core attention hands masked (generation) batches to megatron's DotProductAttention
                core = getattr(module.core_attention, "masked_attention", module.core_attention)
                ok &= isinstance(core, DotProductAttention) and not core.config.masked_softmax_fusion
    flag = torch.tensor([1 if ok else 0], dtype=torch.int64, device=torch.cuda.current_device())
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=parallel_state.get_model_parallel_group())
    return bool(flag.item())


@contextmanager
def _inference_mode(chunks: Sequence[torch.nn.Module]) -> Iterator[None]:
    """eval(), no autograd and sequence parallelism off while generating; the caller's state after
    (GSPO generates in the middle of training)."""
    models = [unwrap(c) for c in chunks]
    training = [c.training for c in chunks]
    sp = models[0].config.sequence_parallel
    moe_tp_ep = (models[0].config.tensor_model_parallel_size > 1
                 and models[0].config.expert_model_parallel_size > 1)
    exclude = None
    if moe_tp_ep:  # MoE token dispatch with TP x EP relies on SP (as upstream's controller does)
        from megatron.core.transformer.moe.moe_layer import BaseMoELayer

        exclude = [BaseMoELayer]
    try:
        for c in chunks:
            c.eval()
        if sp:
            for m in models:
                set_model_to_sequence_parallel(m, False, exclude_modules=exclude)
        with torch.no_grad():
            yield
    finally:
        if sp:
            for m in models:
                set_model_to_sequence_parallel(m, True, exclude_modules=exclude)
        for c, was_training in zip(chunks, training):
            c.train(was_training)


def _from_last_stage(value: Optional[Tensor], shape) -> Tensor:
    """`value` of the last pipeline stage on every stage.  (megatron's
    `broadcast_from_last_pipeline_stage` asserts `tensor.is_cuda`, false under the CPU emulation.)"""
    group = parallel_state.get_pipeline_model_parallel_group()
    if group.size() == 1:
        return value
    if value is None:
        value = torch.empty(shape, dtype=torch.float64, device=torch.cuda.current_device())
    dist.broadcast(value, src=parallel_state.get_pipeline_model_parallel_last_rank(), group=group)
    return value


def _generate_batch(chunks: Sequence[torch.nn.Module], batch: PromptBatch, params: SamplingParams, vocab_size: int,
                    banned_ids: Sequence[int], generator: torch.Generator) -> GenerationOutput:
    device = torch.cuda.current_device()
    B, S = batch.tokens.shape
    K = params.max_new_tokens
    pad = params.padding_id
    context = StaticInferenceContext(max_batch_size=B, max_sequence_length=S + K)
    last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    valid = torch.zeros(B, S + K, dtype=torch.bool, device=device)
    valid[:, :S] = batch.valid.to(device)
    stop = torch.tensor(params.stop_ids, dtype=torch.long, device=device)
    tokens = torch.full((B, K), pad, dtype=torch.long, device=device)
    logprobs = torch.zeros(B, K, dtype=torch.float32, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)

    step_tokens = batch.tokens.to(device)
    positions = batch.position_ids.to(device) if batch.position_ids is not None else None
    mask = prefill_attention_mask(valid[:, :S])
    media = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.media.items()}
    for step in range(K):
        logits = pipeline_forward(chunks, step_tokens, positions, mask, context, media if step == 0 else None)
        context.increment_sequence_len_offset(step_tokens.shape[1])
        if step == 0:
            context.enable_decode_mode()
        choice = None
        if last_stage:
            model_logits = logits[:, -1].float()  # [B, V_padded]: the training cross entropy's normaliser
            logits = model_logits[:, :vocab_size].clone()
            if banned_ids:
                logits[:, list(banned_ids)] = float("-inf")
            tok, lp = sample_next(logits, params, generator, model_logits)
            choice = torch.stack([tok.double(), lp.double()]).contiguous()
        choice = _from_last_stage(choice, (2, B))
        tok, lp = choice[0].long(), choice[1].float()
        tokens[:, step] = torch.where(done, pad, tok)
        logprobs[:, step] = torch.where(done, 0.0, lp)
        lengths += (~done).long()
        done |= torch.isin(tok, stop) & ~done
        if bool(done.all()) or step == K - 1:
            break
        valid[:, S + step] = True
        step_tokens = tokens[:, step:step + 1]
        mask = decode_attention_mask(valid[:, :S + step + 1])
        if positions is not None:  # static cache slices q/k freqs by column: ids of every cached column
            positions = torch.cat([positions, batch.decode_positions(step).to(device)], dim=2)
    return GenerationOutput(tokens=tokens.cpu(), logprobs=logprobs.cpu(), lengths=lengths.cpu())


def generate(model_chunks: Union[torch.nn.Module, Sequence[torch.nn.Module]], prompts: Sequence[Sequence[int]],
             params: SamplingParams, *, media: Optional[Sequence[Optional[PromptMedia]]] = None,
             vocab_size: Optional[int] = None) -> GenerationOutput:
    """Generate up to `params.max_new_tokens` tokens after each prompt (token-id lists; `media[i]`:
    prompt i's images/videos/audio for the omni model).  `model_chunks`: this rank's chunks (one per
    virtual stage, wrapped or not: DDP / Float16Module).  `vocab_size`: the unpadded vocabulary
    (default: the omni vocabulary, or `real_vocab_size` set by `build_llama_chunks`)."""
    chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    model = unwrap(chunks[0])
    if parallel_state.get_context_parallel_world_size() > 1:
        raise NotImplementedError("generate: context parallelism (parallel.cp > 1) is not supported; generate at cp=1")
    omni = _omni_model(model)
    vocab = _real_vocab_size(model, vocab_size)
    pad = params.padding_id
    if not 0 <= pad < vocab:
        raise ValueError(f"SamplingParams padding id {pad} is outside the vocabulary [0, {vocab})")
    # The omni model cannot *generate* media: placeholders are filled by encoders at prefill only.
    banned = list(omni.vocab.placeholder_ids) if omni is not None else []
    device = torch.cuda.current_device()
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed)

    start = time.perf_counter()
    with _inference_mode(chunks):
        lengths = [len(p) for p in prompts]
        groups: List[List[int]] = [list(range(len(prompts)))]
        if len(set(lengths)) > 1 and not _padding_mask_honoured(chunks):
            by_len = {}
            for i, n in enumerate(lengths):
                by_len.setdefault(n, []).append(i)
            groups = list(by_len.values())
            log.info("generate: the attention kernels ignore an explicit padding mask (TE / fused softmax); "
                     "%d prompts run as %d groups of equal length", len(prompts), len(groups))
        B, K = len(prompts), params.max_new_tokens
        out = GenerationOutput(tokens=torch.full((B, K), pad, dtype=torch.long),
                               logprobs=torch.zeros(B, K), lengths=torch.zeros(B, dtype=torch.long))
        for rows in groups:
            batch = build_prompt_batch([prompts[i] for i in rows], [media[i] for i in rows] if media else None,
                                       vocab_size=vocab, pad_id=pad, omni=omni)
            part = _generate_batch(chunks, batch, params, vocab, banned, generator)
            out.tokens[rows], out.logprobs[rows], out.lengths[rows] = part.tokens, part.logprobs, part.lengths
    out.elapsed_s = time.perf_counter() - start
    return out
