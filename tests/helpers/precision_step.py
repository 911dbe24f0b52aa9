"""The same omni training steps at several precisions, in one torchrun world; rank 0 saves per
precision the losses, grad norms, per-modality losses and the first step's full gradients.

    torchrun --nproc_per_node N tests/helpers/precision_step.py OUT.pt --config CFG.yaml \
        [--precisions fp32,bf16] [--steps 2] [section.key=value ...]

Each precision is the real training stack (`build_train_state`: megatron Float16Module around the
bf16/fp16 chunks, fp32 main parameters in megatron's optimizer, fp16's dynamic loss scaler), the
same seed (same initial weights up to the bf16 rounding of the layout-invariant init) and the same
microbatches (mock data is deterministic in the seed).  Step 1's gradients are taken after the
backward pass, before the optimizer touches them (megatron's `main_grad` buffers, fp32), divided
by the loss scale they were computed under (1 but for fp16).
"""

import math
import sys

import torch


def _one_precision(config, overrides, precision, steps):
    from megatron_omni.config import load_config
    from megatron_omni.parallel.layout import gather_full_model
    from megatron_omni.training.loop import build_train_state
    from megatron_omni.training.step import reduce_losses, run_schedule, train_step
    from megatron_omni.training.tasks import num_microbatches, task_for

    cfg = load_config(config, [*overrides, f"train.precision={precision}"])
    task = task_for(cfg)
    state = build_train_state(cfg, task=task)
    n_micro = num_microbatches(cfg)
    task.build_data(state)
    data = task.data  # the omni data: per-modality losses of each step
    kw = dict(num_microbatches=n_micro, seq_length=cfg.data.seq_length, micro_batch_size=cfg.train.micro_batch_size)
    # step 1 by hand, to read the gradients between backward and optimizer
    for chunk in state.model:
        chunk.zero_grad_buffer()
    state.optimizer.zero_grad()
    losses = run_schedule(state.model, task.step_iterators(state), forward_only=False,
                          forward_step_func=task.forward_step_func, **kw)
    total = reduce_losses(losses)
    grads = gather_full_model(state.model, grads=True)
    backward_scale = float(state.optimizer.get_loss_scale())  # fp16: main_grad holds scaled gradients
    grads = {n: g / backward_scale for n, g in grads.items()} if grads is not None else None
    metrics = data.step_metrics(losses)
    ok, grad_norm, _ = state.optimizer.step()
    if ok:
        state.scheduler.step(increment=1)
    rows = [{"loss": (total[0] / total[1].clamp(min=1)).item(), "grad_norm": grad_norm, "update_successful": ok,
             **{k: v for k, v in metrics.items() if k in ("losses", "audio_gen_loss", "dpo_loss")}}]
    for step in range(1, steps):
        state.step = step
        result = train_step(state, task.step_iterators(state), forward_step_func=task.forward_step_func, **kw)
        rows.append({"loss": result.loss, "grad_norm": result.grad_norm, "update_successful": result.update_successful,
                     **{k: v for k, v in data.step_metrics(result.losses_reduced).items()
                        if k in ("losses", "audio_gen_loss", "dpo_loss")}})
    return {"rows": rows, "grads": grads, "loss_scale": float(state.optimizer.get_loss_scale()),
            "param_dtypes": sorted({str(p.dtype) for c in state.model for p in c.parameters() if p.requires_grad}),
            "fp32_params": sorted(n for c in state.model for n, p in c.named_parameters() if p.dtype == torch.float32),
            "main_param_dtypes": sorted({str(p.dtype) for g in state.optimizer.param_groups for p in g["params"]})}


def main() -> None:
    out, args = sys.argv[1], sys.argv[2:]
    config, precisions, steps, overrides = None, ["fp32", "bf16"], 2, []
    while args:
        if args[0] == "--config":
            config, args = args[1], args[2:]
        elif args[0] == "--precisions":
            precisions, args = args[1].split(","), args[2:]
        elif args[0] == "--steps":
            steps, args = int(args[1]), args[2:]
        else:
            overrides, args = overrides + [args[0]], args[1:]
    import torch.distributed as dist

    from megatron_omni.parallel.initialize import destroy_distributed

    results = {p: _one_precision(config, overrides, p, steps) for p in precisions}
    if dist.get_rank() == 0:
        for p, r in results.items():
            print(f"precision {p}: losses {[row['loss'] for row in r['rows']]} "
                  f"grad norms {[row['grad_norm'] for row in r['rows']]}", flush=True)
        assert all(math.isfinite(row["loss"]) for r in results.values() for row in r["rows"])
        torch.save(results, out)
    destroy_distributed()


if __name__ == "__main__":
    main()
