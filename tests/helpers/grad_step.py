"""One forward/backward on the tiny config's first global batch; rank 0 saves the full
(un-sharded, global-named) gradients and the loss.  Run under torchrun by the tests.

    torchrun --nproc_per_node N tests/helpers/grad_step.py OUT.pt [section.key=value ...]
"""

import sys

import torch


def main() -> None:
    out, overrides = sys.argv[1], sys.argv[2:]
    from megatron_omni.config import load_config
    from megatron_omni.parallel.initialize import destroy_distributed
    from megatron_omni.parallel.layout import gather_full_model
    from megatron_omni.training.loop import build_train_state, num_microbatches
    from megatron_omni.training.step import reduce_losses, run_schedule
    from megatron_omni.training.text_data import build_text_data

    cfg = load_config("configs/tiny/llm.yaml", overrides)
    state = build_train_state(cfg)
    data = build_text_data(cfg)
    iterators = data.train_iterators(cfg, len(state.model), consumed_samples=0)
    for chunk in state.model:
        chunk.zero_grad_buffer()
    losses = run_schedule(
        state.model, iterators, num_microbatches=num_microbatches(cfg), seq_length=cfg.data.seq_length,
        micro_batch_size=cfg.train.micro_batch_size, forward_only=False,
    )
    total = reduce_losses(losses)
    grads = gather_full_model(state.model, grads=True)
    if grads is not None:
        torch.save({"loss": (total[0] / total[1]).item(), "grads": grads}, out)
    destroy_distributed()


if __name__ == "__main__":
    main()
