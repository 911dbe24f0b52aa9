"""One-command acceptance check of every CUDA path on one GPU (tools/gpu_check.py).

Check groups, one file each (groups.py lists them in run order): train_checks.py (CUDA vs CPU
emulation, bf16 vs fp32, omni loader wait), throughput.py (Llama-3-8B-width and ViT-600M vs the
planner), packed_attention.py (THD backends vs dense), transformer_engine.py (TE spec, FP8, fused
M-RoPE), dali_decode.py (DALI GPU vs CPU decode).  runner.py runs each group in a child process
(worker.py) under a time limit; report.py writes DIR/gpu_check.json and DIR/gpu_check.md.
"""

from megatron_omni.gpu_check.context import CheckContext
from megatron_omni.gpu_check.result import CheckResult

__all__ = ["CheckContext", "CheckResult"]
