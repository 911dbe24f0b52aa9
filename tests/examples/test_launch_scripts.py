"""The launch scripts' logic, with `sbatch` / `torchrun` replaced by recorders on PATH: the stage
chain's order, dependencies, checkpoints and configs; restart-where-it-stopped on one node."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from megatron_omni.config import load_config

REPO = Path(__file__).resolve().parents[2]
STAGES = ["pt1", "pt2", "pt3", "it1", "it2", "it3", "gspo", "at"]  # GSPO before AT (Uni-MoE 2.0)


def _fake(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _run(script: str, tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "RUNS": str(tmp_path / "runs"), **env}
    return subprocess.run(["bash", str(REPO / "examples" / script), *args], env=full, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("script", ["m2omni_stages.sh", "single_node_m2omni_9b_stages.sh", "slurm_train.sbatch",
                                    "single_node_8b.sh", "tiny_stages.sh"])
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(REPO / "examples" / script)], check=True)


def test_slurm_chain_submits_every_stage_after_the_previous(tmp_path):
    (tmp_path / "bin").mkdir()
    log = tmp_path / "sbatch.jsonl"
    # records argv + the CONFIG / OUTPUT_DIR the batch script will see; prints a job id as --parsable does
    _fake(tmp_path / "bin", "sbatch", f"""n=$(( $(wc -l < {log} 2>/dev/null || echo 0) + 101 ))
python3 -c 'import json,os,sys; print(json.dumps({{"argv": sys.argv[1:], "config": os.environ["CONFIG"],
    "output_dir": os.environ["OUTPUT_DIR"]}}))' "$@" >> {log}
echo "$n;cluster"
""")
    proc = _run("m2omni_stages.sh", tmp_path, "72b", "train.steps=5")
    assert proc.returncode == 0, proc.stderr
    jobs = [json.loads(line) for line in log.read_text().splitlines()]
    runs = tmp_path / "runs" / "m2omni_72b"
    assert [Path(j["config"]).stem for j in jobs] == STAGES
    for i, job in enumerate(jobs):
        argv = job["argv"]
        assert argv[argv.index("--nodes") + 1] == "16"  # the plan's cluster
        assert job["output_dir"] == str(runs / STAGES[i])
        assert (REPO / job["config"]).is_file() and "examples/slurm_train.sbatch" in argv
        assert argv[-1] == "train.steps=5"  # user overrides last (they win)
        if i == 0:
            assert not any(a.startswith("--dependency") for a in argv)
            assert not any(a.startswith("train.pretrained_checkpoint") for a in argv)
        else:
            assert f"--dependency=afterok:{100 + i}" in argv  # the previous job's id, cluster suffix dropped
            assert f"train.pretrained_checkpoint={runs / STAGES[i - 1] / 'checkpoints'}" in argv
    # each stage config loads with what the chain passes
    load_config(jobs[3]["config"], [a for a in jobs[3]["argv"] if a.startswith("train.")])

    log.unlink()
    again = _run("m2omni_stages.sh", tmp_path, "9b", FROM_STAGE="it1", NODES="2")
    assert again.returncode == 0 and "planned for 1 node" in again.stderr
    jobs = [json.loads(line) for line in log.read_text().splitlines()]
    assert [Path(j["config"]).stem for j in jobs] == ["it1", "it2", "it3", "gspo", "at"]
    first = jobs[0]["argv"]
    assert f"train.pretrained_checkpoint={tmp_path / 'runs' / 'm2omni_9b' / 'pt3' / 'checkpoints'}" in first
    assert _run("m2omni_stages.sh", tmp_path, "13b").returncode == 2
    assert _run("m2omni_stages.sh", tmp_path, "9b", FROM_STAGE="pt9").returncode == 2


def test_single_node_chain_continues_where_it_stopped(tmp_path):
    (tmp_path / "bin").mkdir()
    log = tmp_path / "torchrun.log"
    # a fake trainer: records its config, "finishes" unless STOP_AT names the stage
    _fake(tmp_path / "bin", "torchrun", f"""echo "$@" >> {log}
out=""; cfg=""
for a in "$@"; do case $a in train.output_dir=*) out=${{a#*=}};; esac; done
prev=""; for a in "$@"; do [[ $prev == --config ]] && cfg=$a; prev=$a; done
stage=$(basename "$cfg" .yaml)
mkdir -p "$out"
[[ $stage == "${{STOP_AT:-}}" ]] || echo '{{"step": 1}}' > "$out/training_complete.json"
""")
    stopped = _run("single_node_m2omni_9b_stages.sh", tmp_path, STOP_AT="it1")
    assert stopped.returncode == 1 and "rerun this command" in stopped.stderr
    calls = log.read_text().splitlines()
    assert [c.split("stages/")[1].split(".yaml")[0] for c in calls] == ["pt1", "pt2", "pt3", "it1"]
    assert "--nproc_per_node 8" in calls[0] and "train.pretrained_checkpoint" not in calls[0]
    assert f"train.pretrained_checkpoint={tmp_path / 'runs' / 'm2omni_9b' / 'pt3' / 'checkpoints'}" in calls[3]
    log.unlink()
    done = _run("single_node_m2omni_9b_stages.sh", tmp_path)
    assert done.returncode == 0
    calls = log.read_text().splitlines()
    assert [c.split("stages/")[1].split(".yaml")[0] for c in calls] == ["it1", "it2", "it3", "gspo", "at"]
    assert done.stdout.count("skipping") == 3
