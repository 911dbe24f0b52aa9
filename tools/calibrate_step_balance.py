#!/usr/bin/env python
"""Step-balance calibration (M2-omni Alg. 1 lines 3-8): per-modality loss weights w_i of Eq. 6.

    torchrun --nproc_per_node 8 tools/calibrate_step_balance.py --config configs/stage3.yaml \
        --out configs/stage3_step_weights.yaml [section.key=value ...]

Trains each modality of ``balance.modalities`` alone, from the stage's initial weights, on
its calibration subset until the loss plateaus (``balance.calibration``: window, delta,
patience, max_steps), then writes a ``balance`` section file

    step_weights: {image: ..., audio: ..., text: ...}

with the converged losses and step counts as comments.  The stage config includes it by the
config system's section-file rule (the keys beside ``base`` are merged on top):

    balance: {base: stage3_step_weights.yaml, mode: accumulation, modalities: [image, audio, text]}

--trainer names the function that builds one modality's trainer, ``module:function`` taking
(RunConfig, modality) and returning ``train_one_step(modality) -> loss``; the default is the
omni training loop's.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Callable, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_TRAINER = "megatron_omni.training.omni_loop:single_modality_trainer"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the stage's run config (YAML with a balance: section)")
    p.add_argument("--out", required=True, help="balance section file to write (step_weights)")
    p.add_argument("--trainer", default=DEFAULT_TRAINER,
                   help=f"module:function building a modality's train_one_step (default {DEFAULT_TRAINER})")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. balance.calibration.max_steps=2000")
    return p.parse_args(argv)


def load_trainer_factory(spec: str) -> Callable:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise SystemExit(f"--trainer must look like module:function, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise SystemExit(f"--trainer {spec}: cannot import {module_name} ({e})") from e
    factory = getattr(module, attr, None)
    if factory is None:
        raise SystemExit(f"--trainer {spec}: {module_name} has no {attr}")
    return factory


def snippet(result, settings) -> str:
    """The YAML text written to --out (hand-written so the comments survive)."""
    lines = [
        "# Step-balance loss weights, M2-omni Eq. 6: w_i = alpha * (1/L_i*) / sum_j (1/L_j*),",
        f"# alpha = {settings.alpha:g}; written by tools/calibrate_step_balance.py.",
        "# modality: converged loss L* (steps to plateau)",
    ]
    for m, loss in result.converged_losses.items():
        lines.append(f"#   {m}: {loss:.6f} ({result.steps_per_modality[m]} steps)")
    lines += ["step_weights:"]
    lines += [f"  {m}: {w!r}" for m, w in result.weights.items()]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    from megatron_omni.balance.calibrate import calibrate
    from megatron_omni.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from e
    if cfg.balance is None:
        raise SystemExit(f"error: {args.config} has no balance: section; list the modalities to calibrate "
                         f"under balance.modalities")
    factory = load_trainer_factory(args.trainer)
    trainers: Dict[str, Callable[[str], float]] = {}

    def train_one_step(modality: str) -> float:
        # One fresh trainer per modality: every calibration run starts from the stage's weights.
        if modality not in trainers:
            trainers.clear()
            trainers[modality] = factory(cfg, modality)
        return trainers[modality](modality)

    result = calibrate(train_one_step, cfg.balance.modalities, cfg.balance.calibration)
    text = snippet(result, cfg.balance.calibration)
    if _is_writer():
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
        print(text, end="")
    return 0


def _is_writer() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


if __name__ == "__main__":
    sys.exit(main())
