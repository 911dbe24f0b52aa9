"""Sparse upcycling: an MoE model initialised from a dense checkpoint.

Every routed expert and the shared expert start as copies of the dense layer's SwiGLU MLP
(Komatsuzaki et al. 2022, "Sparse Upcycling", arXiv:2212.05055), the routed ones optionally
plus Gaussian noise so that they do not stay identical; the router (and the shared-expert gate)
start random; attention, norms, embedding and output layer are copied.

Runs inside a world at any TP / PP / EP (the run config's parallel section): the dense model is
built and loaded at that layout, each local MoE parameter copies its dense counterpart's local
shard (experts are TP-split exactly like the dense MLP: expert TP = TP), and the result is a
megatron distributed checkpoint, loadable at any layout with `train.load=OUT train.finetune=true`.
Noise and random weights are drawn full-size from (seed, global parameter name) and sliced, so the
output does not depend on the layout the tool ran at.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import zlib
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

from megatron_omni.config.schema import ModelConfig, RunConfig
from megatron_omni.models.init import init_weights_layout_invariant
from megatron_omni.models.llama import build_llama_chunks
from megatron_omni.parallel import layout
from megatron_omni.training.checkpoint import TRACKER_FILE, checkpoint_dir, load_checkpoint
from megatron_omni.training.setup import TrainState, params_dtype

log = logging.getLogger(__name__)

_ROUTED = re.compile(r"(.*\.mlp\.)experts\.(?:local_experts\.\d+\.(linear_fc[12]\.weight)|(linear_fc[12]\.weight)\d+)$")
_SHARED = re.compile(r"(.*\.mlp\.)shared_experts\.(linear_fc[12]\.weight)$")
_RANDOM = re.compile(r".*\.mlp\.(router\.(weight|bias)|shared_experts\.gate_weight)$")


def dense_model_of(moe_model: ModelConfig) -> ModelConfig:
    """The dense model an MoE config upcycles from: the same config without `moe`."""
    return dataclasses.replace(moe_model, moe=None)


def dense_source(name: str, dense_names) -> Optional[str]:
    """Global name of the dense parameter that MoE parameter `name` copies (None: stays random)."""
    if _RANDOM.match(name):
        return None
    m = _ROUTED.match(name)
    if m:
        return m.group(1) + (m.group(2) or m.group(3))
    m = _SHARED.match(name)
    if m:
        return m.group(1) + m.group(2)
    if name.endswith("pre_mlp_layernorm.weight") and name not in dense_names:
        # Transformer Engine's dense layer fuses the pre-MLP norm into fc1; its MoE layer cannot.
        return name[: -len("pre_mlp_layernorm.weight")] + "mlp.linear_fc1.layer_norm_weight"
    return name


def check_upcyclable(dense: ModelConfig, moe_model: ModelConfig) -> None:
    moe = moe_model.moe
    if moe is None:
        raise ValueError("upcycling needs an MoE target: the run config's model has no moe section")
    if moe.ffn_hidden_size != dense.ffn_hidden_size:
        raise ValueError(
            f"routed experts copy the dense MLP: model.moe.ffn_hidden_size={moe.ffn_hidden_size} must equal the "
            f"dense ffn_hidden_size={dense.ffn_hidden_size}"
        )
    if moe.shared_expert_ffn_hidden_size not in (None, dense.ffn_hidden_size):
        raise ValueError(
            f"the shared expert copies the dense MLP: model.moe.shared_expert_ffn_hidden_size="
            f"{moe.shared_expert_ffn_hidden_size} must be null or {dense.ffn_hidden_size}"
        )
    same = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in ("moe", "ffn_hidden_size")]
    differing = [n for n in same if getattr(dense, n) != getattr(moe_model, n)]
    if differing:
        raise ValueError(f"dense and MoE models differ outside the MLP: {', '.join(differing)}")


def _noise(name: str, param: torch.Tensor, std: float, seed: int, gated: bool) -> torch.Tensor:
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    gen = torch.Generator(device=param.device)
    gen.manual_seed(zlib.crc32(f"{seed}:upcycle-noise:{name}".encode()))
    full = torch.empty(layout.full_shape(param, tp), dtype=torch.float32, device=param.device).normal_(
        0.0, std, generator=gen
    )
    return layout.shard(full, param, tp, rank, gated=gated).to(param.dtype)


@torch.no_grad()
def upcycle_chunks(dense_chunks, moe_chunks, *, noise_std: float = 0.0, seed: int = 0) -> Dict[str, int]:
    """Copy dense weights into already-initialised MoE chunks (same layout); returns counts."""
    counts = {"copied": 0, "experts_with_noise": 0, "random": 0}
    for dense_chunk, moe_chunk in zip(dense_chunks, moe_chunks):
        dense_params = dict(layout.global_named_parameters(dense_chunk))
        gated = layout.gated_fc1_weights(moe_chunk)
        for name, param in layout.global_named_parameters(moe_chunk):
            source = dense_source(name, dense_params)
            if source is None:
                counts["random"] += 1
                continue
            if source not in dense_params:
                raise KeyError(f"MoE parameter {name}: no dense parameter {source} to copy from")
            src = dense_params[source]
            if src.shape != param.shape:
                raise ValueError(f"{name} {tuple(param.shape)} cannot copy {source} {tuple(src.shape)}")
            param.copy_(src)
            counts["copied"] += 1
            if noise_std > 0 and _ROUTED.match(name):
                param.add_(_noise(name, param, noise_std, seed, gated=id(param) in gated))
                counts["experts_with_noise"] += 1
    return counts


def save_model_checkpoint(chunks: List[torch.nn.Module], root: str, step: int = 0, extra: Optional[dict] = None) -> str:
    """Weights only, in the training checkpoint layout (`root/iter_<step>` + tracker file)."""
    path = checkpoint_dir(root, step)
    if dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    dist.barrier()
    chunks = [layout.unwrap(c) for c in chunks]
    sd = {"model": chunks[0].sharded_state_dict()} if len(chunks) == 1 else {
        f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}
    if extra:
        sd["extra"] = extra
    strategy = FullyParallelSaveStrategyWrapper(
        get_default_save_sharded_strategy("torch_dist"), parallel_state.get_data_parallel_group(with_context_parallel=True)
    )
    dist_checkpointing.save(sd, path, sharded_strategy=strategy)
    dist.barrier()
    if dist.get_rank() == 0:
        with open(os.path.join(root, TRACKER_FILE), "w") as f:
            f.write(str(step))
    dist.barrier()
    return path


def upcycle(cfg: RunConfig, dense_load: str, out: str, *, dense_model: Optional[ModelConfig] = None,
            noise_std: float = 0.0) -> str:
    """Dense checkpoint `dense_load` -> MoE checkpoint `out` for `cfg.model` (world already initialised)."""
    dense_model = dense_model or dense_model_of(cfg.model)
    check_upcyclable(dense_model, cfg.model)
    dtype = params_dtype(cfg.train.precision)
    kwargs = dict(seq_length=cfg.data.seq_length, params_dtype=dtype)
    dense = build_llama_chunks(dense_model, cfg.parallel, **kwargs)
    load_checkpoint(TrainState(model=dense, optimizer=None, scheduler=None), dense_load, finetune=True)
    moe = build_llama_chunks(cfg.model, cfg.parallel, **kwargs)
    init_weights_layout_invariant(moe, cfg.model, cfg.train.seed)  # the router's random start
    counts = upcycle_chunks(dense, moe, noise_std=noise_std, seed=cfg.train.seed)
    del dense
    path = save_model_checkpoint(moe, out, extra={"upcycled_from": os.path.abspath(dense_load), "noise_std": noise_std})
    log.info("upcycled %s -> %s (%s)", dense_load, path, counts)
    return path
