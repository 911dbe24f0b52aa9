"""Turn a profiled run (per-step, per-rank timers + per-rank trace analysis) into numbers,
DIR/report.md, DIR/profile.json and two PNG charts.

Everything here is plain Python over the gathered data (no torch.distributed), so it is
unit-testable and can be re-run on a saved profile.json.
"""

from __future__ import annotations

import json
import os
import statistics
from typing import Any, Dict, List, Optional, Sequence, Tuple

from megatron_omni.profiling import charts
from megatron_omni.profiling.timers import (
    BACKWARD_COMPUTE,
    DATA_FETCH,
    DATA_WAIT,
    DP_GRAD_SYNC_TIMERS,
    FORWARD_BACKWARD,
    FORWARD_COMPUTE,
    GRAD_SYNC_TIMERS,
    OPTIMIZER,
    OPTIMIZER_TIMERS,
    OTHER_GRAD_SYNC_TIMERS,
    P2P_TIMERS,
    TRAIN_STEP,
    ordered,
)
from megatron_omni.profiling.trace import COMM_CATEGORIES

# Segments of the per-stage time split; they add up to the stage's step time.
SPLIT = (
    ("data_wait", "data wait"),
    ("forward", "forward compute"),
    ("backward", "backward compute"),
    ("pipeline", "PP p2p + bubble"),
    ("grad_sync", "grad sync (DP, embedding)"),
    ("optimizer", "optimizer"),
    ("other", "other (loss reduce, zero grad)"),
)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _stage_timers(records: List[Dict[str, Any]], ranks: List[int]) -> Dict[str, float]:
    """Per timer: max over `ranks` within each step, then mean over steps (ms)."""
    names = {n for rec in records for r in ranks for n in rec["ranks"][r]}
    return {
        n: _mean([max(rec["ranks"][r].get(n, 0.0) for r in ranks) for rec in records])
        for n in ordered(names)
    }


def _split(t: Dict[str, float]) -> Dict[str, float]:
    g = t.get
    in_schedule = g(DATA_WAIT, 0.0)  # runs inside forward-compute
    fetch = g(DATA_FETCH, 0.0)  # omni: the step's microbatches, drawn before the schedule
    fwd = max(0.0, g(FORWARD_COMPUTE, 0.0) - in_schedule)
    bwd = g(BACKWARD_COMPUTE, 0.0)
    grad_sync = sum(g(n, 0.0) for n in GRAD_SYNC_TIMERS)
    fb = g(FORWARD_BACKWARD, 0.0)
    opt = g(OPTIMIZER, 0.0)
    step = g(TRAIN_STEP, 0.0)
    return {
        "data_wait": in_schedule + fetch, "forward": fwd, "backward": bwd,
        "pipeline": max(0.0, fb - in_schedule - fwd - bwd - grad_sync),
        "grad_sync": grad_sync, "optimizer": opt,
        "other": max(0.0, step - fb - opt - fetch),
        "step": step,
        "p2p_timers": sum(g(n, 0.0) for n in P2P_TIMERS),
        # what the bubble is measured against: the stage's work inside the schedule
        "schedule_compute": in_schedule + fwd + bwd,
    }


def _modalities(measured: List[Dict[str, Any]], llm_flops_per_step: float) -> Optional[List[Dict[str, Any]]]:
    """Per modality over the measured steps of an omni run (None for a text-only run): tokens/s,
    and its FLOPs per step -- the LLM's share by tokens (every microbatch is micro batch x seq
    length, so the LLM costs the same per token whatever the modality) plus its encoders'."""
    if not measured or not all("tokens_per_s_by_modality" in r for r in measured):
        return None
    names = list(dict.fromkeys(m for r in measured for m in r["tokens_per_s_by_modality"]))
    seconds = sum(r["step_time_s"] for r in measured)
    tokens = {m: sum(r["tokens_per_s_by_modality"].get(m, 0.0) * r["step_time_s"] for r in measured) for m in names}
    all_tokens = sum(tokens.values()) or 1.0
    encoder = {m: _mean([(r.get("encoder_flops_by_modality") or {}).get(m, 0.0) for r in measured]) for m in names}
    step_flops = llm_flops_per_step + sum(encoder.values())
    rows = []
    for m in names:
        llm = llm_flops_per_step * tokens[m] / all_tokens
        total = llm + encoder[m]
        rows.append({
            "modality": m, "tokens_per_s": tokens[m] / seconds, "token_share": tokens[m] / all_tokens,
            "llm_flops_per_step": llm, "encoder_flops_per_step": encoder[m],
            "encoder_share": encoder[m] / total if total > 0 else 0.0,
            "flops_share": total / step_flops if step_flops > 0 else 0.0,
        })
    return rows


def summarize(
    meta: Dict[str, Any], records: List[Dict[str, Any]], rank_info: List[Dict[str, int]],
    trace_by_rank: List[Dict[str, Any]], *, warmup: int, trace_steps: Optional[Tuple[int, int]],
) -> Dict[str, Any]:
    from megatron_omni.training import flops

    if not records:
        raise ValueError("no profiled steps")
    after_warmup = [r for r in records if r["step"] > warmup] or records
    untraced = [r for r in after_warmup if not r.get("traced")]
    measured = untraced or after_warmup
    step_s = [r["step_time_s"] for r in measured]
    mean_s = _mean(step_s)
    world = meta["world"]
    tokens_per_step = meta["global_batch_size"] * meta["seq_length"]
    # omni steps count their packed rows' LLM FLOPs and add their encoders' FLOPs on the step's media
    # (as the loop's metrics rows do)
    llm_flops = _mean([r.get("llm_flops", meta["flops_per_step"]) for r in measured])
    encoder_flops = _mean([r.get("encoder_flops", 0.0) for r in measured])
    step_flops = llm_flops + encoder_flops
    tflops = step_flops / mean_s / world / 1e12
    mfu = flops.mfu(tflops, meta["device"], meta["precision"])

    stages = sorted({info["pp"] for info in rank_info})
    per_stage = []
    for pp in stages:
        ranks = [info["rank"] for info in rank_info if info["pp"] == pp]
        timers = _stage_timers(measured, ranks)
        per_stage.append({"pp": pp, "ranks": ranks, "timers": timers, "split": _split(timers)})
    everywhere = _stage_timers(measured, [info["rank"] for info in rank_info])

    # Bubble: the busiest stage computes the most; what the schedule spends beyond that
    # (and beyond the gradient sync it also contains) is fill/drain bubble + p2p transfer.
    busiest = max(per_stage, key=lambda s: s["split"]["schedule_compute"])
    compute_busiest = busiest["split"]["schedule_compute"]
    step_ms = everywhere.get(TRAIN_STEP, mean_s * 1e3)
    fb_ms = everywhere.get(FORWARD_BACKWARD, 0.0)
    p, v, m = meta["pp"], meta.get("vpp") or 1, meta["num_microbatches"]
    analytic = (p - 1) / (v * m)
    has_compute = FORWARD_COMPUTE in busiest["timers"]
    bubble = {
        "busiest_stage": busiest["pp"],
        "busiest_compute_ms": compute_busiest,
        "step_minus_compute_ms": step_ms - compute_busiest if has_compute else None,
        "measured_ms": max(0.0, fb_ms - compute_busiest - busiest["split"]["grad_sync"]) if has_compute else None,
        "analytic_fraction": analytic,
        "analytic_ms": analytic * compute_busiest if has_compute else None,
    }
    bubble["measured_fraction"] = (bubble["measured_ms"] / compute_busiest
                                   if bubble["measured_ms"] is not None and compute_busiest > 0 else None)

    comm_timers = {
        "dp_grad_sync_ms": sum(everywhere.get(n, 0.0) for n in DP_GRAD_SYNC_TIMERS),
        "dp_params_all_gather_ms": everywhere.get("params-all-gather", 0.0),
        "embedding_ln_grads_ms": sum(everywhere.get(n, 0.0) for n in OTHER_GRAD_SYNC_TIMERS),
        "pp_p2p_ms_per_stage": {s["pp"]: s["split"]["p2p_timers"] for s in per_stage},
    }
    trace_rows = []
    for tr in trace_by_rank:
        if "comm_ms_per_step" not in tr:
            continue
        info = next((i for i in rank_info if i["rank"] == tr["rank"]), {})
        comm = tr["comm_ms_per_step"]
        trace_rows.append({
            "rank": tr["rank"], "pp": info.get("pp"), "tp": info.get("tp"), "dp": info.get("dp"),
            "comm_ms": {c: comm.get(c, 0.0) for c in (*COMM_CATEGORIES, "other", "barrier")},
            "comm_sum_ms": {c: tr["comm_sum_ms_per_step"].get(c, 0.0) for c in (*COMM_CATEGORIES, "other", "barrier")},
            "total_ms": tr["comm_busy_ms_per_step"],
            "total_sum_ms": sum(tr["comm_sum_ms_per_step"].get(c, 0.0) for c in (*COMM_CATEGORIES, "other")),
            "collectives": tr["num_collectives"] / max(1, tr["traced_steps"]),
            "source": tr["source"], "file": os.path.basename(tr.get("file") or ""),
            "num_events": tr["num_events"], "ops": tr["ops_per_step"],
        })
    steps = [{"step": r["step"], "step_time_ms": r["step_time_s"] * 1e3, "tokens_per_s": r.get("tokens_per_s"),
              "tflops_per_gpu": r.get("tflops_per_gpu"), "traced": bool(r.get("traced")),
              "warmup": r["step"] <= warmup} for r in records]
    return {
        "meta": meta,
        "warmup": warmup,
        "trace_steps": list(trace_steps) if trace_steps else None,
        "measured_steps": [r["step"] for r in measured],
        "traced_excluded": bool(untraced) and len(untraced) < len(after_warmup),
        "throughput": {
            "tokens_per_s": tokens_per_step / mean_s,
            "tokens_per_s_per_gpu": tokens_per_step / mean_s / world,
            "tflops_per_gpu": tflops,
            "mfu": mfu,
            "llm_tflops_per_gpu": llm_flops / mean_s / world / 1e12,
            "flops_per_step": step_flops,
            "llm_flops_per_step": llm_flops,
            "encoder_flops_per_step": encoder_flops,
            "encoder_flops_share": encoder_flops / step_flops if step_flops > 0 else 0.0,
        },
        "modalities": _modalities(measured, llm_flops),
        "step_time_ms": {
            "mean": mean_s * 1e3, "p50": statistics.median(step_s) * 1e3, "max": max(step_s) * 1e3,
            "min": min(step_s) * 1e3,
        },
        "timers_max_ms": everywhere,
        "stages": per_stage,
        "bubble": bubble,
        "comm_timers": comm_timers,
        "comm_trace": trace_rows,
        "optimizer_ms": {n: everywhere[n] for n in (OPTIMIZER, *OPTIMIZER_TIMERS) if n in everywhere},
        "steps": steps,
    }


# ---------------------------------------------------------------- markdown


def _f(value: Optional[float], digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> List[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def render_markdown(s: Dict[str, Any]) -> str:
    meta, thr, st, b = s["meta"], s["throughput"], s["step_time_ms"], s["bubble"]
    mfu = "n/a on CPU" if meta["device"] == "cpu" else ("n/a (no peak for this device/precision)"
                                                         if thr["mfu"] is None else f"{100 * thr['mfu']:.1f} %")
    lines = [
        "# Throughput profile", "",
        f"Config `{meta.get('config', '?')}` on {meta['world']} rank(s) ({meta['device']}, {meta['precision']}): "
        f"TP{meta['tp']} x PP{meta['pp']}" + (f" (VPP{meta['vpp']})" if meta.get("vpp") else "")
        + f" x CP{meta['cp']} x DP{meta['dp']}; global batch {meta['global_batch_size']} x seq "
        f"{meta['seq_length']}, micro batch {meta['micro_batch_size']}, {meta['num_microbatches']} microbatches "
        f"per step; {thr['flops_per_step']:.3e} model FLOPs per step"
        + (f" ({thr['llm_flops_per_step']:.3e} LLM + {thr['encoder_flops_per_step']:.3e} encoders)"
           if thr["encoder_flops_per_step"] else "")
        + f"; megatron timer level {meta['timing_log_level']}.",
        "",
        f"Steps run: {len(s['steps'])}; warmup: {s['warmup']}; traced (torch.profiler): "
        + (f"{s['trace_steps'][0]}..{s['trace_steps'][1]}" if s["trace_steps"] else "none")
        + f"; measured: {_ranges(s['measured_steps'])} (after warmup"
        + ("; traced steps excluded for the profiler's overhead)." if s["traced_excluded"] else ")."),
        "",
        "## Throughput", "",
        *_table(["tokens/s", "tokens/s/GPU", "TFLOP/s/GPU", "MFU"],
                [[_f(thr["tokens_per_s"], 0), _f(thr["tokens_per_s_per_gpu"], 0), _f(thr["tflops_per_gpu"], 4), mfu]]),
        "",
        *_modality_lines(s),
        "## Step time", "",
        *_table(["mean (ms)", "p50 (ms)", "max (ms)", "min (ms)"],
                [[_f(st["mean"]), _f(st["p50"]), _f(st["max"]), _f(st["min"])]]),
        "",
        "![step time](step_time.png)", "",
        "## Time split per pipeline stage", "",
        "ms per step: each timer's max over the stage's ranks, mean over measured steps.  "
        "Data wait is the microbatch fetch (inside megatron's forward-compute; forward compute here "
        "excludes it; an omni step draws its microbatches before the schedule, timed as data-fetch "
        "and counted here too); *PP p2p + bubble* is the rest of the forward-backward schedule (pipeline sends/"
        "receives and the time spent waiting for other stages); grad sync is finalize_model_grads "
        "(DP reduce-scatter/all-reduce, embedding and layernorm grads); other is the step outside the "
        "schedule and optimizer (loss reduction, zeroing grads, timer barriers).",
        "",
        *_table(["PP stage", "ranks", *[label for _, label in SPLIT], "step", "p2p timers"],
                [[f"{x['pp']}", ",".join(map(str, x["ranks"])), *[_f(x["split"][k]) for k, _ in SPLIT],
                  _f(x["split"]["step"]), _f(x["split"]["p2p_timers"])] for x in s["stages"]]),
        "",
        "![time split](time_split.png)", "",
        "## Pipeline bubble", "",
    ]
    if b["measured_ms"] is None:
        lines.append("Needs forward/backward compute timers (timer level 2).")
    else:
        lines += _table(
            ["", "ms per step", "fraction of busiest-stage compute"],
            [["busiest stage compute (PP stage %d: data wait + forward + backward inside the schedule)"
              % b["busiest_stage"],
              _f(b["busiest_compute_ms"]), "1"],
             ["measured: forward-backward - busiest compute - grad sync", _f(b["measured_ms"]),
              _f(b["measured_fraction"], 3)],
             ["analytic 1F1B: (p-1)/(v*m) = (%d-1)/(%d*%d)" % (meta["pp"], meta.get("vpp") or 1,
                                                               meta["num_microbatches"]),
              _f(b["analytic_ms"]), _f(b["analytic_fraction"], 3)],
             ["step - busiest compute (bubble + comm + optimizer + overhead)", _f(b["step_minus_compute_ms"]),
              "-"]],
        )
    lines += ["", "## Optimizer", "",
              *_table(["timer", "ms per step (max over ranks)"],
                      [[n, _f(v)] for n, v in s["optimizer_ms"].items()] or [["(timer level < 1)", "-"]]),
              "", "## Communication", "",
              "### From megatron timers", "",
              *_table(["what", "ms per step (max over ranks)"], [
                  ["DP gradient sync (all-grads-sync)", _f(s["comm_timers"]["dp_grad_sync_ms"])],
                  ["DP parameter all-gather (distributed optimizer)",
                   _f(s["comm_timers"]["dp_params_all_gather_ms"])],
                  ["embedding / layernorm grad all-reduces", _f(s["comm_timers"]["embedding_ln_grads_ms"])],
                  *[[f"PP p2p timers, stage {pp} (waits included)", _f(ms)]
                    for pp, ms in s["comm_timers"]["pp_p2p_ms_per_stage"].items()],
                  ["TP collectives", "not timed by megatron (inside forward/backward compute): see the trace"],
              ]),
              "", "### From the torch.profiler trace", ""]
    if s["comm_trace"]:
        lines += [
            "Collective ops per rank (%s), ms per traced step, attributed to the megatron timer they "
            "ran under: TP = inside forward/backward compute, PP = p2p, DP = grad sync / param all-gather. "
            "Per category the wall time with an op in flight (a batched send+recv pair counts once); "
            "*sum* is the plain sum of op durations.  On CPU the durations include waiting for the "
            "peer rank (skew and, for PP, the bubble)." % s["comm_trace"][0]["source"], "",
            _trace_table(s["comm_trace"]),
        ]
        ops: Dict[str, List[float]] = {}
        for r in s["comm_trace"]:
            for name, o in r["ops"].items():
                acc = ops.setdefault(name, [0.0, 0.0])
                acc[0] += o["count"]
                acc[1] += o["ms"]
        lines += ["", *_table(["op (all ranks)", "calls/step", "ms/step"],
                             [[n, _f(c, 1), _f(ms)] for n, (c, ms) in sorted(ops.items(), key=lambda x: -x[1][1])])]
    else:
        lines.append("No trace window.")
    lines += ["", "## Charts", "", "- `time_split.png`: stacked time split per pipeline stage",
              "- `step_time.png`: step time over steps (warmup shaded, traced steps boxed)",
              "- `trace_rank{r}.json`: Chrome traces (open in chrome://tracing or Perfetto)", "",
              "## All megatron timers", "",
              "ms per step, max over each stage's ranks, mean over measured steps.", "",
              *_table(["timer", *[f"PP {x['pp']}" for x in s["stages"]], "max over all ranks"],
                      [[n, *[_f(x["timers"].get(n)) for x in s["stages"]], _f(v)]
                       for n, v in s["timers_max_ms"].items()]),
              "", "## Steps", "",
              *_table(["step", "step time (ms)", "tokens/s", "TFLOP/s/GPU", "note"],
                      [[x["step"], _f(x["step_time_ms"]), _f(x["tokens_per_s"], 0), _f(x["tflops_per_gpu"], 4),
                        "warmup" if x["warmup"] else ("traced" if x["traced"] else "")] for x in s["steps"]]),
              ""]
    return "\n".join(lines)


def _modality_lines(s: Dict[str, Any]) -> List[str]:
    """The omni run's throughput per modality (nothing for a text-only run)."""
    rows, thr = s.get("modalities"), s["throughput"]
    if not rows:
        return []
    return [
        "### Per modality", "",
        "Tokens each modality's microbatches carried (rows x seq length, packing padding included) per "
        "second of measured step time; they add up to the total.  FLOPs per step: the LLM's by the "
        "modality's share of the step's tokens, plus its encoders' (vision NaViT + merger, audio "
        "encoder + connector, as `training/encoder_flops.py` counts them for training, frozen modules "
        "included).  "
        f"TFLOP/s/GPU and MFU above count both: encoders are {100 * thr['encoder_flops_share']:.1f} % of "
        f"the step's FLOPs (LLM alone: {thr['llm_tflops_per_gpu']:.4f} TFLOP/s/GPU).", "",
        *_table(["modality", "tokens/s", "share of tokens", "LLM GFLOP/step", "encoder GFLOP/step",
                 "encoder share of its FLOPs", "share of step FLOPs"],
                [[r["modality"], _f(r["tokens_per_s"], 0), _f(100 * r["token_share"], 1) + " %",
                  _f(r["llm_flops_per_step"] / 1e9), _f(r["encoder_flops_per_step"] / 1e9),
                  _f(100 * r["encoder_share"], 1) + " %", _f(100 * r["flops_share"], 1) + " %"] for r in rows]
                + [["**total**", _f(sum(r["tokens_per_s"] for r in rows), 0), "100 %",
                    _f(thr["llm_flops_per_step"] / 1e9), _f(thr["encoder_flops_per_step"] / 1e9),
                    _f(100 * thr["encoder_flops_share"], 1) + " %", "100 %"]]),
        "",
    ]


def _trace_table(rows: List[Dict[str, Any]]) -> str:
    return "\n".join(_table(
        ["rank", "pp", "tp", "dp", "TP", "PP", "DP", "emb/LN grads", "optimizer", "other", "total", "total (sum)",
         "barriers", "collectives/step", "trace"],
        [[r["rank"], r["pp"], r["tp"], r["dp"], *[_f(r["comm_ms"][c]) for c in COMM_CATEGORIES],
          _f(r["comm_ms"]["other"]), _f(r["total_ms"]), _f(r["total_sum_ms"]), _f(r["comm_ms"]["barrier"]),
          _f(r["collectives"], 1), f"`{r['file']}`"] for r in rows],
    ))


def _ranges(steps: Sequence[int]) -> str:
    if not steps:
        return "none"
    out, start, prev = [], steps[0], steps[0]
    for x in list(steps[1:]) + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        out.append(f"{start}" if start == prev else f"{start}..{prev}")
        if x is not None:
            start = prev = x
    return ", ".join(out)


# ---------------------------------------------------------------- files


def write_charts(out_dir: str, s: Dict[str, Any]) -> List[str]:
    split_png = os.path.join(out_dir, "time_split.png")
    charts.stacked_bars(
        split_png, [f"PP stage {x['pp']}" for x in s["stages"]],
        [(label, [x["split"][key] for x in s["stages"]]) for key, label in SPLIT],
        totals=[x["split"]["step"] for x in s["stages"]],
        title=f"Time split per pipeline stage (ms/step, TP{s['meta']['tp']} PP{s['meta']['pp']} "
              f"DP{s['meta']['dp']})",
        ylabel="ms",
    )
    step_png = os.path.join(out_dir, "step_time.png")
    xs = [x["step"] for x in s["steps"]]
    traced = [x["step"] for x in s["steps"] if x["traced"]]
    charts.line_chart(
        step_png, xs, [("step time", [x["step_time_ms"] for x in s["steps"]])],
        title="Step time over steps", xlabel="step", ylabel="ms",
        shade=(0.5, s["warmup"] + 0.5, "warmup") if s["warmup"] else None,
        marks=[(min(traced) - 0.4, max(traced) + 0.4, "traced")] if traced else None,
    )
    return [split_png, step_png]


def write_report(out_dir: str, summary: Dict[str, Any]) -> str:
    os.makedirs(out_dir, exist_ok=True)
    write_charts(out_dir, summary)
    with open(os.path.join(out_dir, "profile.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write(render_markdown(summary))
    return path
