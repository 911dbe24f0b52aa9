"""One forward/backward on the tiny config's first global batch; rank 0 saves the full
(un-sharded, global-named) gradients and the loss.  Run under torchrun by the tests.

    torchrun --nproc_per_node N tests/helpers/grad_step.py OUT.pt [--config CFG.yaml] [section.key=value ...]

With an omni config (e.g. configs/tiny/omni_mock.yaml) the step runs the omni model on the
first step's planned microbatches, and the per-modality losses are saved too.
"""

import sys

import torch


def main() -> None:
    out, overrides = sys.argv[1], sys.argv[2:]
    config = "configs/tiny/llm.yaml"
    if overrides[:1] == ["--config"]:
        config, overrides = overrides[1], overrides[2:]
    from megatron_omni.config import load_config
    from megatron_omni.parallel.initialize import destroy_distributed
    from megatron_omni.parallel.layout import gather_full_model
    from megatron_omni.training.loop import build_train_state
    from megatron_omni.training.step import reduce_losses, run_schedule
    from megatron_omni.training.tasks import num_microbatches, task_for

    cfg = load_config(config, overrides)
    task = task_for(cfg)
    state = build_train_state(cfg, task=task)
    task.build_data(state)
    iterators = task.step_iterators(state)
    for chunk in state.model:
        chunk.zero_grad_buffer()
    losses = run_schedule(
        state.model, iterators, num_microbatches=num_microbatches(cfg), seq_length=cfg.data.seq_length,
        micro_batch_size=cfg.train.micro_batch_size, forward_only=False, forward_step_func=task.forward_step_func,
    )
    total = reduce_losses(losses)
    extra = task.data.step_metrics(losses) if cfg.omni is not None else {}  # the per-modality losses
    grads = gather_full_model(state.model, grads=True)
    # what the optimizer holds (fp32 main params of this rank's shard; all of them at DP=1)
    extra["optimizer_numel"] = sum(p.numel() for g in state.optimizer.param_groups for p in g["params"])
    if grads is not None:
        torch.save({"loss": (total[0] / total[1]).item(), "grads": grads, **extra}, out)
    destroy_distributed()


if __name__ == "__main__":
    main()
