"""NaViT-style vision encoder on megatron-core (Qwen2-VL vision-tower architecture).

Input is exactly what a Qwen2-VL image processor produces: ``pixel_values`` ``[N, C*T*P*P]`` (one row
per 14x14 patch, ``T = temporal_patch_size`` frames stacked; rows already in 2x2 merge-window order)
and ``grid_thw`` ``[n_items, 3]`` (patch grid per image / video).  Images of different sizes are
concatenated ("packed") along ``N``; nothing is padded.

Pipeline::

    Conv3d patch embed (kernel = stride = (T, P, P), no bias)         [N, D]
    2D rotary (h, w) frequencies, per token                             [N, 1, 1, head_dim]
    megatron-core TransformerBlock (pre-LN LayerNorm, QKV bias, MLP quick_gelu)   -> TP
    2x2 merge + MLP connector: LayerNorm -> view 4 tokens -> Linear -> GELU -> Linear   [N/4, out]

Packed attention (attention never crosses segments; a segment is one frame of one item, i.e.
``h*w`` tokens, the Qwen2-VL convention), the LLM's backends (`models/packed_attention.py`,
``packed_attention`` = ``model.packed_attention``: auto | te | torch | dense):

* ``te`` (auto with Transformer Engine layers): TE's THD attention via
  ``PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens_kv=cu)``; ``apply_rope_fusion`` is
  kept off, because megatron's *unfused* THD rotary maps freqs with ``freqs.size(0) ==
  cu_seqlens[-1]`` per token (what the 2D positions need) while the fused TE THD kernel would index
  them by position-inside-sequence.
* ``torch`` (auto without TE: CPU, "local"): the same THD inputs into ``PackedCoreAttention``
  (varlen_attn on CUDA, per-segment SDPA elsewhere), non-causal: nothing of size N x N.
* ``dense`` (the reference): an explicit block-diagonal boolean mask ``[1, 1, N, N]`` (True =
  masked): megatron's local ``DotProductAttention`` (``FusedScaleMaskSoftmax``'s torch path fills
  -10000 before the fp32 softmax, which underflows to exactly 0), TE's as an arbitrary mask.

In both cases the rotary is applied inside megatron's ``SelfAttention`` from ``rotary_pos_emb``
(non-interleaved ``rotate_half`` form, head_dim/2 channels for h and head_dim/2 for w).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.activations import quick_gelu
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.utils import init_method_normal
from torch import Tensor, nn

from megatron_omni.models.encoder_config import bidirectional_encoder_config
from megatron_omni.models.kernels import Kernels, detect_kernels, weight_gradient_fusion
from megatron_omni.config.encoders import VisionConfig
from megatron_omni.models.packed_attention import (
    PackedCoreAttention,
    resolve_packed_attention,
    thd_packed_seq_params,
)

__all__ = [
    "NaViTEncoder",
    "vision_transformer_config",
    "vision_layer_spec",
    "vision_position_ids",
    "vision_cu_seqlens",
    "block_diagonal_mask",
    "vision_rotary_freqs",
    "merged_token_counts",
]


# --------------------------------------------------------------------------------------------
# positions, segments, masks (pure functions of grid_thw)
# --------------------------------------------------------------------------------------------


def vision_position_ids(grid_thw: Tensor, spatial_merge_size: int) -> Tensor:
    """[N, 2] (h, w) patch coordinates in the order the tokens arrive: per item, per frame, the
    (h/m, w/m) merge windows row-major and inside each window its m x m patches row-major."""
    m = spatial_merge_size
    out = []
    for t, h, w in grid_thw.tolist():
        if h % m or w % m:
            raise ValueError(f"grid (h={h}, w={w}) not divisible by spatial_merge_size {m}")
        hh = torch.arange(h).view(h // m, m, 1, 1).expand(h // m, m, w // m, m)
        ww = torch.arange(w).view(1, 1, w // m, m).expand(h // m, m, w // m, m)
        # window order: (h-block, w-block, h-in-block, w-in-block)
        hh = hh.permute(0, 2, 1, 3).reshape(-1)
        ww = ww.permute(0, 2, 1, 3).reshape(-1)
        out.append(torch.stack([hh, ww], dim=-1).repeat(t, 1))
    return torch.cat(out).to(grid_thw.device)


def vision_cu_seqlens(grid_thw: Tensor) -> Tensor:
    """int32 [n_segments + 1]: one attention segment per frame (h*w tokens) of every item."""
    seqlens = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return F.pad(seqlens.cumsum(0, dtype=torch.int32), (1, 0))


def merged_token_counts(grid_thw: Tensor, spatial_merge_size: int) -> Tensor:
    """Number of output (LLM) tokens per item: t * h * w / m^2."""
    return grid_thw.prod(-1) // spatial_merge_size ** 2


def block_diagonal_mask(cu_seqlens: Tensor, n: Optional[int] = None) -> Tensor:
    """Boolean [1, 1, N, N] attention mask, True where attention is *not* allowed (megatron's
    convention): tokens attend only inside their own segment.  `n` = cu_seqlens[-1] when known
    on the host (then nothing is read from the device)."""
    n = int(cu_seqlens[-1]) if n is None else n
    seg = torch.repeat_interleave(
        torch.arange(cu_seqlens.numel() - 1, device=cu_seqlens.device), (cu_seqlens[1:] - cu_seqlens[:-1]).long(),
        output_size=n,
    )
    assert seg.numel() == n
    return (seg.view(-1, 1) != seg.view(1, -1)).view(1, 1, n, n)


def vision_rotary_freqs(position_ids: Tensor, head_dim: int, base: float = 10000.0) -> Tensor:
    """megatron rotary freqs [N, 1, 1, head_dim] (fp32) for 2D positions [N, 2].

    head_dim/4 inverse frequencies (over a head_dim/2 rotary space) are applied to h and to w;
    [f_h, f_w] is duplicated (megatron's non-interleaved layout: the rotation pairs channel i with
    i + head_dim/2), so half of each rotary pair budget goes to h and half to w."""
    spatial = head_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, spatial, 2, dtype=torch.float32, device=position_ids.device) / spatial))
    pos = position_ids.to(torch.float32)
    f = torch.cat([pos[:, :1] * inv_freq, pos[:, 1:2] * inv_freq], dim=-1)  # [N, head_dim/2]
    return torch.cat([f, f], dim=-1).view(-1, 1, 1, head_dim)


# --------------------------------------------------------------------------------------------
# megatron config and layer spec
# --------------------------------------------------------------------------------------------


def _quick_gelu_eager(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


def vision_transformer_config(
    cfg: VisionConfig, *, tp: Optional[int] = None, params_dtype: torch.dtype = torch.float32,
    kernels: Optional[Kernels] = None,
) -> TransformerConfig:
    """megatron TransformerConfig of the ViT blocks.  The encoder is not pipeline-split (it lives on
    the first pipeline stage), so pipeline_model_parallel_size is 1 here; TP follows the world."""
    kernels = kernels or detect_kernels(cfg.transformer_impl)
    # megatron's quick_gelu is wrapped in torch.compile (jit_fuser): worth it on CUDA, a long
    # first-call compile (and recompiles per packed length) on CPU, where the eager form is used.
    act = {"quick_gelu": quick_gelu if kernels.cuda else _quick_gelu_eager, "gelu": F.gelu}[cfg.activation]
    return bidirectional_encoder_config(
        num_layers=cfg.depth,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        kv_channels=cfg.head_dim,
        layernorm_epsilon=cfg.norm_epsilon,
        activation_func=act,
        attention_dropout=cfg.attention_dropout,
        hidden_dropout=cfg.hidden_dropout,
        init_method_std=cfg.init_method_std,
        params_dtype=params_dtype,
        tp=tp,
        masked_softmax_fusion=False,  # arbitrary block mask on the local path
        bias_activation_fusion=False,  # quick_gelu has no fused bias kernel in megatron's MLP
        bias_dropout_fusion=kernels.cuda,
        apply_rope_fusion=False,  # see module docstring: per-token freqs in THD need the unfused path
        gradient_accumulation_fusion=weight_gradient_fusion(),
        recompute=cfg.recompute,
    )


def vision_layer_spec(kernels: Kernels, packed_attention: str = "auto") -> ModuleSpec:
    """Pre-LN ViT layer: LayerNorm -> SelfAttention (QKV bias, no mask type) -> LayerNorm -> MLP;
    core attention of the `packed_attention` path (module docstring)."""
    backend = resolve_packed_attention(packed_attention, kernels.transformer_engine)
    if kernels.transformer_engine:
        from megatron.core.extensions.transformer_engine import (
            TEDotProductAttention,
            TELayerNormColumnParallelLinear,
            TERowParallelLinear,
        )

        return ModuleSpec(
            module=TransformerLayer,
            submodules=TransformerLayerSubmodules(
                input_layernorm=IdentityOp,  # fused into linear_qkv
                self_attention=ModuleSpec(
                    module=SelfAttention,
                    # TE turns THD no_mask into padding; `dense` hands it the block-diagonal mask
                    params={"attn_mask_type": AttnMaskType.arbitrary if backend == "dense" else AttnMaskType.no_mask},
                    submodules=SelfAttentionSubmodules(
                        linear_qkv=TELayerNormColumnParallelLinear,
                        core_attention=TEDotProductAttention,
                        linear_proj=TERowParallelLinear,
                    ),
                ),
                self_attn_bda=get_bias_dropout_add,
                pre_mlp_layernorm=IdentityOp,  # fused into linear_fc1
                mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(
                    linear_fc1=TELayerNormColumnParallelLinear, linear_fc2=TERowParallelLinear)),
                mlp_bda=get_bias_dropout_add,
            ),
        )
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=WrappedTorchNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.no_mask},  # dense: the block-diagonal mask is explicit
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=PackedCoreAttention if backend == "torch" else DotProductAttention,
                    linear_proj=RowParallelLinear,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=WrappedTorchNorm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(
                linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)),
            mlp_bda=get_bias_dropout_add,
            # Checkpoint keys as the TE layers name them (megatron's local GPT spec does the same), so
            # a checkpoint written with local layers (CPU) loads into TE layers (GPU) and back.
            sharded_state_dict_keys_map={"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                                         "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"},
        ),
    )


# --------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------


class PatchMergerMLP(MegatronModule):
    """2x2 adjacent-token merge + MLP connector: LayerNorm(D) -> [N/m^2, m^2*D] -> Linear -> GELU ->
    Linear(out).  The first Linear is column-parallel, the second row-parallel (TP like an MLP)."""

    def __init__(self, config: TransformerConfig, cfg: VisionConfig):
        super().__init__(config=config)
        self.merge_width = cfg.merge_width
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_epsilon, dtype=config.params_dtype)
        init = init_method_normal(cfg.init_method_std)
        self.linear_fc1 = ColumnParallelLinear(
            cfg.merge_width, cfg.merge_width, config=config, init_method=init, bias=True,
            gather_output=False, skip_bias_add=False)
        self.linear_fc2 = RowParallelLinear(
            cfg.merge_width, cfg.out_hidden_size, config=config, init_method=init, bias=True,
            input_is_parallel=True, skip_bias_add=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layernorm(x).reshape(-1, self.merge_width)
        x, _ = self.linear_fc1(x)
        x = F.gelu(x)
        x, _ = self.linear_fc2(x)
        return x


def encoder_process_groups() -> Optional[ProcessGroupCollection]:
    """megatron's process groups for an encoder, but with a context-parallel group of one rank: under
    context parallelism each CP rank encodes whole media items (its share, outputs all-gathered), so
    the THD rotary inside the encoder's attention must not take its tokens for a CP split of a longer
    stream.  None (megatron's defaults) without CP.  The group is this rank alone, created without
    the other ranks (only the first pipeline stage builds encoders)."""
    if not parallel_state.model_parallel_is_initialized() or parallel_state.get_context_parallel_world_size() == 1:
        return None
    groups = ProcessGroupCollection.use_mpu_process_groups()
    groups.cp = dist.new_group([dist.get_rank()], use_local_synchronization=True)
    return groups


class NaViTEncoder(MegatronModule):
    """Native-resolution ViT (Qwen2-VL vision tower) + 2x2 merge connector on megatron-core.

    Args:
        cfg: VisionConfig.
        params_dtype: parameter dtype.
        kernels: override kernel detection (default: ``detect_kernels(cfg.transformer_impl)``).
        tp: tensor-parallel size (default: megatron's current TP world size).
        packed_attention: the packed attention path (``model.packed_attention``; module docstring).

    ``forward(pixel_values [N, C*T*P*P], grid_thw [n, 3]) -> [N / m^2, out_hidden_size]``; with
    ``return_hidden=True`` also the ViT output before the merger ``[N, hidden_size]``.
    """

    def __init__(self, cfg: VisionConfig, *, params_dtype: torch.dtype = torch.float32,
                 kernels: Optional[Kernels] = None, tp: Optional[int] = None, packed_attention: str = "auto"):
        self.kernels = kernels or detect_kernels(cfg.transformer_impl)
        config = vision_transformer_config(cfg, tp=tp, params_dtype=params_dtype, kernels=self.kernels)
        super().__init__(config=config)
        self.cfg = cfg
        self.packed_attention = resolve_packed_attention(packed_attention, self.kernels.transformer_engine)
        self.use_thd = self.packed_attention != "dense"
        self.patch_embed = nn.Conv3d(
            cfg.in_channels, cfg.hidden_size,
            kernel_size=(cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size),
            stride=(cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size),
            bias=False, dtype=params_dtype)
        self.decoder = TransformerBlock(
            config=config, spec=vision_layer_spec(self.kernels, self.packed_attention), post_layer_norm=False,
            pre_process=True, post_process=False, pg_collection=encoder_process_groups())
        self.merger = PatchMergerMLP(config, cfg)

    def set_input_tensor(self, input_tensor) -> None:  # megatron API; the encoder is never PP-split
        self.decoder.set_input_tensor(input_tensor)

    def attention_inputs(self, grid_thw: Tensor, device) -> Tuple[Optional[Tensor], Optional[PackedSeqParams]]:
        """(attention_mask, packed_seq_params) for the selected attention path."""
        host = vision_cu_seqlens(grid_thw.cpu())  # sizes read on the host, not from the device copy
        cu = host.to(device)
        if self.packed_attention == "torch":  # the segment lengths read once, on the host
            return None, thd_packed_seq_params(host, cu, "torch")
        if self.use_thd:
            max_len = int((host[1:] - host[:-1]).max())
            return None, PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                         max_seqlen_q=max_len, max_seqlen_kv=max_len)
        return block_diagonal_mask(cu, n=int(host[-1])), None

    def forward(self, pixel_values: Tensor, grid_thw: Tensor, *, return_hidden: bool = False):
        cfg = self.cfg
        grid_thw = grid_thw.to(torch.long)
        n = int(grid_thw.prod(-1).sum())
        if pixel_values.shape != (n, cfg.patch_dim):
            raise ValueError(f"pixel_values {tuple(pixel_values.shape)} != ({n}, {cfg.patch_dim}) from grid_thw")
        device = pixel_values.device
        x = pixel_values.view(-1, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        x = self.patch_embed(x.to(self.patch_embed.weight.dtype)).view(n, 1, cfg.hidden_size)  # [S, B=1, D]
        freqs = vision_rotary_freqs(vision_position_ids(grid_thw.cpu(), cfg.spatial_merge_size).to(device),
                                    cfg.head_dim, cfg.rotary_base)
        mask, packed = self.attention_inputs(grid_thw.cpu(), device)
        x = self.decoder(x, attention_mask=mask, rotary_pos_emb=freqs, packed_seq_params=packed)
        hidden = x.view(n, cfg.hidden_size)
        out = self.merger(hidden)
        return (out, hidden) if return_hidden else out
