"""A data position saved at one data-parallel size, re-split for another (resume at a new layout).

The per-modality order is a pure function of the seed (`SampleOrder`): epoch e's global list is
fixed and DP rank r reads positions r, r + dp, r + 2 dp, ...  A checkpoint keeps every DP rank's
(epoch, cursor, packing-buffer keys); at a new DP size the run continues from the earliest
global position none of the old ranks had consumed past (the earliest epoch, and in it the
smallest cursor minus the samples still waiting in that rank's packing buffer), so no sample of
the epoch is lost; up to (lookahead x old dp) samples are read twice.  Counters (skips, tokens)
are summed onto the new rank 0 (the loop all-reduces them); the bad-sample memory is shared by
all.  Exact resume needs the same DP size; TP and PP may change freely.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Dict, List, Sequence

log = logging.getLogger("megatron_omni.data")

__all__ = ["resplit_source_state"]


def _resplit_position(states: Sequence[Dict[str, Any]], dp_size: int, buffered=lambda s: 0):
    """(epoch, cursor) at the new DP size from the old ranks' states (see the module doc)."""
    old_dp = len(states)
    epoch = min(int(s["epoch"]) for s in states)
    starts = [max(0, int(s["cursor"]) - buffered(s)) * old_dp + r for r, s in enumerate(states)
              if int(s["epoch"]) == epoch]
    return epoch, min(starts) // dp_size


def _resplit_stream(states: Sequence[Dict[str, Any]], dp_rank: int, dp_size: int) -> Dict[str, Any]:
    epoch, cursor = _resplit_position(states, dp_size, buffered=lambda s: len(s["buffer"]))
    first = dp_rank == 0
    out = dict(states[0])
    out.update(dp_rank=dp_rank, dp_size=dp_size, epoch=epoch, cursor=cursor, buffer=[], window=[])
    out["skipped"] = dict(sum((Counter(s["skipped"]) for s in states), Counter())) if first else {}
    for key in ("real_tokens", "total_tokens", "microbatches"):
        out[key] = sum(int(s[key]) for s in states) if first else 0
    out["bad"] = sorted({(int(a), int(b), r) for s in states for a, b, r in s.get("bad", [])})
    return out


def resplit_source_state(states: List[Dict[str, Any]], dp_rank: int, dp_size: int) -> Dict[str, Any]:
    """This new DP rank's state of an omni data source from every old DP rank's state:
    `OmniLoader` ({modality: stream state}), `WithPreferences` ({"loader", "preference"}) or
    `MockOmniData` ({"consumed"})."""
    head = states[0]
    if "consumed" in head:  # mock data: fresh random microbatches, none repeated
        return {"consumed": {m: max(s["consumed"][m] for s in states) for m in head["consumed"]}}
    if "loader" in head:
        out = {"loader": resplit_source_state([s["loader"] for s in states], dp_rank, dp_size)}
        for key in (k for k in head if k != "loader"):  # the preference stream: no buffer
            epoch, cursor = _resplit_position([s[key] for s in states], dp_size)
            skipped = sum((Counter(s[key]["skipped"]) for s in states), Counter()) if dp_rank == 0 else {}
            out[key] = {"epoch": epoch, "cursor": cursor, "skipped": dict(skipped)}
        return out
    if all(isinstance(v, dict) and "version" in v for v in head.values()):
        out = {m: _resplit_stream([s[m] for s in states], dp_rank, dp_size) for m in head}
        log.info("data position re-split from %d to %d DP ranks: %s", len(states), dp_size,
                 ", ".join(f"{m} epoch {s['epoch']} cursor {s['cursor']}" for m, s in out.items()))
        return out
    raise ValueError(f"cannot re-split a data position of keys {sorted(head)} over a new data-parallel size; "
                     f"resume with the checkpoint's DP size ({len(states)})")
