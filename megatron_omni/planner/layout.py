"""A candidate parallel layout, the job it runs, and the legality check megatron would apply.

Legality is `megatron_omni.config.validate.validate` on the `RunConfig` the layout would
launch with, so the planner never proposes a layout the trainer rejects (heads % tp,
groups % tp, layers % (pp*vpp), gbs % (mbs*dp), interleaving needs microbatches % pp).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional

from megatron_omni.config.loader import ConfigError
from megatron_omni.config.schema import (
    DataConfig,
    DataSource,
    DPOConfig,
    ModelConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
)
from megatron_omni.config.validate import validate

if TYPE_CHECKING:
    from megatron_omni.planner.omni import OmniWorkload

RECOMPUTE = ("none", "selective", "full")
PRECISIONS = ("bf16", "fp8")


@dataclass(frozen=True)
class Job:
    """What is trained: the model, tokens per step and the GEMM precision."""

    model: ModelConfig
    seq_len: int
    global_batch: int
    precision: str = "bf16"  # bf16 | fp8 (TE FP8 GEMMs, bf16 params/activations elsewhere)
    omni: Optional["OmniWorkload"] = None  # encoders, trainable modules, modality mix; None = text LLM

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.seq_len < 1 or self.global_batch < 1:
            raise ValueError("seq_len and global_batch must be >= 1")

    @property
    def fp8(self) -> bool:
        return self.precision == "fp8"


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None  # None = plain 1F1B; k = k model chunks per pipeline rank
    cp: int = 1
    ep: int = 1  # expert parallel; 1 until the model schema has MoE layers
    micro_batch: int = 1
    recompute: str = "none"  # none | selective (core attention) | full (uniform, every layer)
    # Decoder layers of pipeline rank 0 (parallel.first_stage_num_layers); None = L / pp.  Omni
    # models give the encoders' stage fewer layers.
    first_stage_layers: Optional[int] = None
    # Omni: recompute the encoders' layers (vision.recompute, audio.recompute); None = as configured.
    encoder_recompute: Optional[bool] = None

    @property
    def v(self) -> int:
        return self.vpp or 1

    def stage_layers(self, num_layers: int, rank: int) -> int:
        """Decoder layers held by pipeline rank `rank` (all of its virtual chunks)."""
        if self.first_stage_layers is None or self.pp == 1:
            return num_layers // self.pp
        if rank == 0:
            return self.first_stage_layers
        return (num_layers - self.first_stage_layers) // (self.pp - 1)

    @property
    def model_parallel(self) -> int:
        return self.tp * self.pp * self.cp

    def dp(self, num_gpus: int) -> int:
        return num_gpus // self.model_parallel

    def num_microbatches(self, num_gpus: int, global_batch: int) -> int:
        return global_batch // (self.micro_batch * self.dp(num_gpus))

    def describe(self) -> str:
        parts = [f"tp={self.tp}", f"pp={self.pp}"]
        if self.vpp:
            parts.append(f"vpp={self.vpp}")
        if self.first_stage_layers is not None:
            parts.append(f"first={self.first_stage_layers}")
        if self.encoder_recompute is not None:
            parts.append(f"encoder_recompute={int(self.encoder_recompute)}")
        parts += [f"cp={self.cp}", f"ep={self.ep}", f"mbs={self.micro_batch}", f"recompute={self.recompute}"]
        return ",".join(parts)


_KEYS = {
    "tp": "tp", "pp": "pp", "vpp": "vpp", "cp": "cp", "ep": "ep", "dp": "dp",
    "mbs": "micro_batch", "micro_batch": "micro_batch", "recompute": "recompute",
    "first": "first_stage_layers", "encoder_recompute": "encoder_recompute",
}


def parse_layout(text: str, num_gpus: int) -> Layout:
    """'tp=4,pp=8,vpp=5[,cp=1,ep=1,mbs=1,recompute=none,dp=2,first=17,encoder_recompute=1]' -> Layout.

    Unnamed fields take the defaults above; `dp`, when given, must equal
    gpus / (tp*pp*cp).  Raises ConfigError with a one-line message.
    """
    values = {}
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        if "=" not in item:
            raise ConfigError(f"--layout item '{item}' must look like key=value (e.g. tp=4,pp=8,vpp=5)")
        key, raw = (s.strip() for s in item.split("=", 1))
        if key not in _KEYS:
            raise ConfigError(f"--layout: unknown key '{key}'; valid keys: {', '.join(sorted(_KEYS))}")
        field = _KEYS[key]
        if field == "recompute":
            if raw not in RECOMPUTE:
                raise ConfigError(f"--layout: recompute={raw!r} is not one of {list(RECOMPUTE)}")
            values[field] = raw
            continue
        if field == "encoder_recompute":
            if raw.lower() not in ("0", "1", "true", "false"):
                raise ConfigError(f"--layout: encoder_recompute={raw!r} must be 0 or 1")
            values[field] = raw.lower() in ("1", "true")
            continue
        if field == "vpp" and raw.lower() in ("none", "null", "1"):
            values[field] = None
            continue
        try:
            n = int(raw)
        except ValueError:
            raise ConfigError(f"--layout: {key}={raw!r} is not an integer") from None
        if n < 1:
            raise ConfigError(f"--layout: {key} must be >= 1, got {n}")
        values[field] = n
    if not values:
        raise ConfigError("--layout is empty; give e.g. tp=4,pp=8,vpp=5")
    dp = values.pop("dp", None)
    layout = Layout(**values)
    if dp is not None and num_gpus % layout.model_parallel == 0 and dp != layout.dp(num_gpus):
        raise ConfigError(
            f"--layout: dp={dp} but gpus/(tp*pp*cp) = {num_gpus}/{layout.model_parallel} = {layout.dp(num_gpus)}"
        )
    return layout


def launch_overrides(job: Job, layout: Layout) -> List[str]:
    """The `section.key=value` overrides that launch this layout as it was priced (train.py, the
    stage configs): sequence parallel with TP, distributed optimizer with overlapped gradient
    reduce-scatter and parameter all-gather, TE FP8 when the job is FP8."""
    out = [f"parallel.tp={layout.tp}", f"parallel.pp={layout.pp}", f"parallel.vpp={layout.vpp or 'null'}",
           f"parallel.cp={layout.cp}", f"parallel.ep={layout.ep}",
           f"parallel.sequence_parallel={str(layout.tp > 1).lower()}",
           f"parallel.first_stage_num_layers={layout.first_stage_layers or 'null'}",
           "parallel.use_distributed_optimizer=true", "parallel.overlap_grad_reduce=true",
           "parallel.overlap_param_gather=true", f"train.micro_batch_size={layout.micro_batch}",
           f"model.fp8={'hybrid' if job.fp8 else 'null'}"]
    if layout.recompute == "none":
        out.append("model.recompute_granularity=null")
    else:
        out.append(f"model.recompute_granularity={layout.recompute}")
        if layout.recompute == "full":
            out += ["model.recompute_method=uniform", "model.recompute_num_layers=1"]
    if layout.encoder_recompute is not None:
        flag = str(layout.encoder_recompute).lower()
        out += [f"omni.vision.recompute={flag}", f"omni.audio.recompute={flag}"]
    return out


def run_config(job: Job, layout: Layout) -> RunConfig:
    """The RunConfig this layout would launch with (sequence parallel whenever tp > 1); an omni job's
    carries its omni section and, for a stage with preference rows, its `dpo:` (mock data: the
    planner checks the layout, not the data paths)."""
    granularity = None if layout.recompute == "none" else layout.recompute
    model = dataclasses.replace(
        job.model,
        fp8="hybrid" if job.fp8 else None,
        transformer_impl="auto",
        # `te` needs TE where the plan is made; on the cluster `auto` is `te` (the same rules)
        packed_attention="auto" if job.model.packed_attention == "te" else job.model.packed_attention,
        recompute_granularity=granularity,
        recompute_method="uniform" if layout.recompute == "full" else None,
        recompute_num_layers=1 if layout.recompute == "full" else None,
    )
    parallel = ParallelConfig(
        tp=layout.tp, pp=layout.pp, vpp=layout.vpp, cp=layout.cp, ep=layout.ep,
        first_stage_num_layers=layout.first_stage_layers,
        sequence_parallel=layout.tp > 1, use_distributed_optimizer=True,
        overlap_grad_reduce=True, overlap_param_gather=True,
    )
    omni = job.omni
    return RunConfig(
        model=model,
        parallel=parallel,
        data=DataConfig(blend=[DataSource(path="planner")], seq_length=job.seq_len, mock=omni is not None),
        train=TrainConfig(steps=1, micro_batch_size=layout.micro_batch, global_batch_size=job.global_batch,
                          precision="bf16", tensorboard=False),
        omni=None if omni is None else omni.omni,
        dpo=DPOConfig() if omni is not None and omni.preference_rows else None,
    )


def check_layout(job: Job, layout: Layout, num_gpus: int) -> None:
    """Raise ConfigError (one line) if megatron would reject this layout on `num_gpus` GPUs.

    `validate` asks whether *this* machine has Transformer Engine before allowing cp > 1 for a
    text LLM; the planner targets a GPU cluster with TE, so that one environment check is left out:
    CP is folded into the world size handed to validate (dp = gpus / (tp*pp*cp) is unchanged) and
    the CP/EP rules that depend on cp are checked here instead.  An omni job is validated with its
    real cp: the trainer's omni CP rules (a THD packed attention path, pp = 1, no preference rows)
    need no TE.
    """
    if layout.recompute not in RECOMPUTE:
        raise ConfigError(f"recompute={layout.recompute!r} is not one of {list(RECOMPUTE)}")
    if layout.vpp is not None and layout.vpp < 2:
        raise ConfigError(f"vpp={layout.vpp}: use vpp >= 2 (or leave it out for plain 1F1B)")
    if num_gpus % layout.model_parallel:
        raise ConfigError(
            f"{num_gpus} GPUs are not divisible by tp*pp*cp={layout.tp}*{layout.pp}*{layout.cp}="
            f"{layout.model_parallel}"
        )
    if layout.cp > 1 and job.seq_len % (2 * layout.cp):
        raise ConfigError(f"seq_len={job.seq_len} must be divisible by 2*cp={2 * layout.cp}")
    if (layout.dp(num_gpus) * layout.cp) % layout.ep:
        raise ConfigError(f"ep={layout.ep} must divide dp*cp={layout.dp(num_gpus) * layout.cp}")
    if job.omni is None and (layout.first_stage_layers is not None or layout.encoder_recompute is not None):
        raise ConfigError("first= and encoder_recompute= are for omni models (encoders on the first stage)")
    if job.omni is not None:
        validate(run_config(job, dataclasses.replace(layout, ep=1)), num_gpus)
    else:
        validate(run_config(job, dataclasses.replace(layout, cp=1, ep=1)), num_gpus // layout.cp)
    if job.omni is not None:
        try:  # the modality scheduler must be able to plan this many microbatches per update
            job.omni.modality_shares(layout.num_microbatches(num_gpus, job.global_batch))
        except ValueError as e:
            raise ConfigError(str(e)) from None
