"""Chaos suite: proves that interrupted, hostile or malformed runs lose nothing. CPU only, a few minutes.

    python scripts/chaos.py [--scenarios preempt_kill,hostile_data,...] [--trials 2] [--seed 0] [--keep DIR]

Prints a table (scenario, trials, outcome, details), writes ``chaos_results.json`` in the work folder and
exits non-zero when any scenario loses something. Faults are injected with ``UNIC_FAULTS``
(``unic/train/faults.py``) or by the harness itself (hostile files, malformed invocations, payloads).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

TINY = {
    "data.global_batch": "null",  # the demo preset fixes its global batch; these runs size theirs per process
    "data.domains": "[shapes,gratings]",
    "data.num_workers": 0,
    "student.img_size": 32,
    "student.kwargs": "{patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}",
    "student.drop_path": 0.1,
    "ladder.hidden_dim": 32,
    "ladder.last_hidden_dim": 64,
    "optim.epochs": 1,
    "optim.warmup_epochs": 0.5,
    "train.log_every": 2,
    "train.validate": False,
    "udon.update_every": 4,
    "train.collective_timeout_s": 60,  # a failed rendezvous or dead peer surfaces in a minute, not 30
}


@dataclass
class Outcome:
    scenario: str
    trials: int = 0
    passed: int = 0
    details: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.trials > 0 and self.passed == self.trials

    def check(self, ok: bool, detail: str) -> bool:
        self.trials += 1
        self.passed += int(ok)
        if not ok or len(self.details) < 3:
            self.details.append(("ok: " if ok else "LOST: ") + detail)
        return ok


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(root: str, out: str, **extra) -> list[str]:
    values = {**TINY, "data.root": root, "run.output_dir": out, **extra}
    return [f"{k}={v}" for k, v in values.items()]


def train(root: str, out: str, nproc: int = 1, max_restarts: int = 0, faults: str = "", timeout: float = 600,
          **extra) -> subprocess.CompletedProcess:
    """main_unic.py as a user runs it: plain python, or torchrun (gloo) with restarts for nproc > 1."""
    args = ["main_unic.py", *_overrides(root, out, **extra)]
    if nproc == 1 and max_restarts == 0:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--max-restarts={max_restarts}", f"--master_port={_free_port()}", *args]
    markers = os.path.join(out + ".faults")
    os.makedirs(markers, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "UNIC_FAULTS": faults,
           "UNIC_FAULTS_DIR": markers}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def final_weights(out: str) -> dict:
    return torch.load(os.path.join(out, "checkpoint.pth"), map_location="cpu", weights_only=True)["model"]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _reference(ctx, nproc: int) -> dict:
    key = f"reference{nproc}"
    if key not in ctx.cache:
        out = os.path.join(ctx.work, key)
        result = train(ctx.root, out, nproc=nproc, **{"data.batch_size_per_gpu": 16 // nproc, "train.save_every": 2})
        if result.returncode:
            raise RuntimeError(f"reference run failed:\n{result.stderr[-3000:]}")
        ctx.cache[key] = final_weights(out)
    return ctx.cache[key]


# ---------------------------------------------------------------------------------------------- scenarios
def preempt(ctx, kind: str) -> Outcome:
    """Kill (SIGKILL) or preempt (SIGTERM) random ranks at random steps, twice in one torchrun job with
    --max-restarts 3; the job resumes by itself and must end bit-identical to an uninterrupted run.
    Restarts that fail to reconnect (stale addresses of a previous attempt) are counted and reported."""
    outcome = Outcome(f"preempt_{kind}")
    reference = _reference(ctx, 2)
    for trial in range(ctx.trials):
        steps = sorted(ctx.rng.sample(range(1, 17), 2))
        plan = ";".join(f"{kind}:rank={ctx.rng.randint(0, 1)}:step={s}" for s in steps)
        out = os.path.join(ctx.work, f"preempt_{kind}{trial}")
        result = train(ctx.root, out, nproc=2, max_restarts=3, faults=plan,
                       **{"data.batch_size_per_gpu": 8, "train.save_every": 2})
        log = result.stdout + result.stderr
        resumed = log.count("resumed from")
        flakes = log.count("RuntimeError: Gloo connectFullMesh failed")
        ok = result.returncode == 0 and resumed >= len(steps) and same_weights(reference, final_weights(out))
        if ok and kind == "term":  # SIGTERM: every interruption saved a checkpoint at the step it stopped
            ok = all(f"stopped by SIGTERM at step {s + 1}" in log for s in steps)
        outcome.check(ok, f"{plan} -> rc {result.returncode}, {resumed} resumes ({flakes} gloo reconnect "
                          f"failures), {'identical' if ok else 'DIFFERENT or failed'} final weights")
        if not ok:
            outcome.details.append(log[-1500:])
    return outcome


# multi-node: torchrun agents with c10d rendezvous, one per "node", all on this machine
NODE_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # what the documented multi-node command sets (README)


def node_command(node: int, port: int, run_id: str, nnodes: int = 2, nproc: int = 1,
                 max_restarts: int = 3) -> list[str]:
    """torchrun for node ``node`` of a multi-node job, as README's "Scaling out" runs it (c10d rendezvous,
    restarts on), on this machine: every node gets its own loopback address (127.0.0.<node + 1>, so the ranks
    follow the node numbers) and node 0 hosts the rendezvous store (on real nodes, the one named in
    --rdzv-endpoint does). Dead nodes are noticed after 3 missed keep-alives of 1 s (default 5 s)."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc_per_node={nproc}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={run_id}",
            f"--max-restarts={max_restarts}", f"--local-addr=127.0.0.{node + 1}",
            f"--rdzv-conf=is_host={int(node == 0)},keep_alive_interval=1,keep_alive_max_attempt=3"]


def start_node(node: int, port: int, run_id: str, args: list[str], log: str, env: dict | None = None,
               **kwargs) -> subprocess.Popen:
    """Start node ``node``'s torchrun agent running ``main_unic.py args``; its output goes to ``log``."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **NODE_ENV, **(env or {})}
    with open(log, "w") as f:
        return subprocess.Popen([*node_command(node, port, run_id, **kwargs), "main_unic.py", *args], cwd=REPO,
                                env=full_env, stdout=f, stderr=subprocess.STDOUT)


def _descendants(pid: int) -> list[int]:
    children = []
    for task in os.listdir(f"/proc/{pid}/task") if os.path.isdir(f"/proc/{pid}/task") else []:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children += [int(c) for c in f.read().split()]
        except OSError:  # the thread ended meanwhile
            pass
    return [d for c in children for d in (c, *_descendants(c))]


def kill_node(proc: subprocess.Popen) -> None:
    """SIGKILL a node: its torchrun agent and the workers. Killing the agent alone is not enough: torchrun
    starts its workers in sessions of their own, so they would live on as orphans."""
    for pid in [proc.pid, *_descendants(proc.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


def wait_nodes(procs: list[subprocess.Popen], timeout: float) -> list[int | None]:
    """Exit codes of the agents (None: still running at the deadline, then killed with its workers)."""
    deadline, codes = time.time() + timeout, []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(deadline - time.time(), 1)))
        except subprocess.TimeoutExpired:
            kill_node(proc)
            codes.append(None)
    return codes


def _read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def multinode_preempt(ctx) -> Outcome:
    """Two torchrun agents ("nodes", 1 rank each, c10d rendezvous, restarts on), faults at a random step:
    - ``node1``: node 1 is SIGKILLed (agent and worker) and relaunched, as a requeue of that node would. The
      survivor's worker fails at once (gloo: connection closed); its agent restarts it and re-rendezvouses,
      waiting for the relaunched node; the job resumes from the last checkpoint.
    - ``node0``: the same for node 0, which hosts the rendezvous store: node 1's agent cannot re-rendezvous and
      exits by itself; both nodes are relaunched (a requeue of the whole job).
    - ``worker``: rank 1's worker is SIGKILLed, the agents live: both restart their workers (--max-restarts).
    Each must end bit-identical to an uninterrupted single-node run."""
    outcome = Outcome("multinode_preempt")
    reference = _reference(ctx, 2)
    for trial in range(ctx.trials):
        step = ctx.rng.randint(3, 15)
        for case in ("node1", "node0", "worker"):
            out = os.path.join(ctx.work, f"multinode{trial}_{case}")
            markers = out + ".faults"
            os.makedirs(markers, exist_ok=True)
            victim = 0 if case == "node0" else 1
            # a killed node's rank first stalls at `step` (once: marker file), so that it dies there and not later
            fault = f"{'kill' if case == 'worker' else 'hang'}:rank={victim}:step={step}"
            env = {"UNIC_FAULTS": fault, "UNIC_FAULTS_DIR": markers}
            args = _overrides(ctx.root, out, **{"data.batch_size_per_gpu": 8, "train.save_every": 2})
            port, run_id, start = _free_port(), f"chaos{trial}{case}", time.time()
            logs = [f"{out}.node{n}.log" for n in (0, 1)]
            procs = [start_node(n, port, run_id, args, logs[n], env) for n in (0, 1)]
            marker = os.path.join(markers, f"{fault.split(':')[0]}-rank{victim}-step{step}")
            while not os.path.exists(marker) and all(p.poll() is None for p in procs) and time.time() - start < 300:
                time.sleep(0.05)
            fired = os.path.exists(marker)
            survivor_code, relaunch = None, ()
            if case != "worker":
                kill_node(procs[victim])
                relaunch = (victim,)
            if case == "node0":  # the rendezvous store died with node 0: node 1's agent gives up by itself
                survivor_code = wait_nodes([procs[1]], 120)[0]
                relaunch = (0, 1)
            for n in relaunch:
                logs[n] = f"{out}.node{n}.relaunched.log"
                procs[n] = start_node(n, port, run_id, args, logs[n], env)
            codes = wait_nodes(procs, 400)
            text = "".join(_read(p) for p in logs)
            resumed_at = step - step % 2
            resumed = f"resumed from {os.path.join(out, 'checkpoint.pth')} at step {resumed_at}" in text
            same = codes == [0, 0] and same_weights(reference, final_weights(out))
            ok = fired and resumed and same and (case != "node0" or survivor_code not in (0, None))
            how = {"node1": "SIGKILL node 1; relaunched, the survivor re-rendezvoused",
                   "node0": f"SIGKILL node 0; node 1's agent exited {survivor_code}, both relaunched",
                   "worker": "SIGKILL rank 1's worker; both agents restarted theirs"}[case]
            outcome.check(ok, f"{how} (step {step}): exit codes {codes}, resumed at step "
                              f"{resumed_at if resumed else '?'}, {'identical' if same else 'DIFFERENT or failed'} "
                              f"final weights, {time.time() - start:.0f} s")
            if not ok:
                outcome.details.append(text[-2000:])
    return outcome


def checkpoint_crash(ctx) -> Outcome:
    """Die half-way through a checkpoint write, or hit a full disk: the previous checkpoint stays loadable,
    the partial file is never loaded, periodic files are pruned only after a complete write."""
    outcome = Outcome("checkpoint_crash")
    reference = _reference(ctx, 2)
    for trial in range(ctx.trials):
        step = ctx.rng.choice([4, 6, 8, 10, 12])
        for kind in ("save_crash", "save_enospc"):
            out = os.path.join(ctx.work, f"{kind}{trial}")
            # first attempt: the write at `step` fails; inspect what is on disk, then let the job resume
            result = train(ctx.root, out, nproc=2, faults=f"{kind}:rank=0:step={step}",
                           **{"data.batch_size_per_gpu": 8, "train.save_every": 2, "train.keep_checkpoints": 2})
            state = torch.load(os.path.join(out, "checkpoint.pth"), map_location="cpu", weights_only=True)
            periodic = sorted(f for f in os.listdir(out) if f.startswith("checkpoint_step"))
            # the two newest complete periodic files survive (only one exists when the crash is at step 4)
            expected = [f"checkpoint_step{s:08d}.pth" for s in (step - 4, step - 2) if s > 0]
            kept = state["step"] == step - 2 and periodic == expected
            message_ok = kind == "save_crash" or "previous checkpoint is intact" in result.stdout + result.stderr
            resumed = train(ctx.root, out, nproc=2, **{"data.batch_size_per_gpu": 8, "train.save_every": 2,
                                                       "train.keep_checkpoints": 2})
            same = resumed.returncode == 0 and same_weights(reference, final_weights(out))
            leftovers = [f for f in os.listdir(out) if ".tmp" in f]
            outcome.check(result.returncode != 0 and kept and message_ok and same and not leftovers,
                          f"{kind} at step {step}: previous checkpoint step {state['step']}, periodic {periodic}, "
                          f"resumed run {'identical' if same else 'DIFFERENT'}, leftovers {leftovers}")
    return outcome


def _png_header_only(path: str, width: int, height: int) -> None:
    """A PNG whose header claims width x height (a decompression bomb as far as the decoder can tell)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def make_hostile_domain(root: str, domain: str, num_good: int, num_hostile: int = 100, seed: int = 0) -> set[str]:
    """A UnED-layout domain whose train and val splits mix good images with hostile files.

    Returns the paths that must be reported as unreadable. Odd-but-valid images (CMYK, 16-bit, palette,
    alpha, 1x1) must load and are not in the set."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = os.path.join(root, "images", domain)
    os.makedirs(images, exist_ok=True)
    entries, bad = [], set()

    def add(name: str, label: int, is_bad: bool) -> None:
        entries.append({"path": f"{domain}/{name}", "class_id": label})
        if is_bad:
            bad.add(os.path.realpath(os.path.join(images, name)) if not os.path.islink(os.path.join(images, name))
                    else os.path.join(os.path.realpath(images), name))

    for i in range(num_good):
        label = i % 4
        color = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)][label]
        noise = rng.integers(-20, 20, (40, 40, 3))
        Image.fromarray(np.clip(np.array(color) + noise, 0, 255).astype(np.uint8)).save(os.path.join(images, f"good{i}.jpg"))
        add(f"good{i}.jpg", label, False)
    good_jpeg = open(os.path.join(images, "good0.jpg"), "rb").read()
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (9, 9, 9)).save(buf, format="PNG")
    good_png = buf.getvalue()
    kinds = ["zero", "trunc_jpg", "trunc_png", "text", "loop", "fifo", "bomb", "dir", "garbage", "html"]
    for i in range(num_hostile):
        kind = kinds[i % len(kinds)]
        name = f"hostile{i}_{kind}.jpg" if kind not in ("trunc_png", "bomb") else f"hostile{i}_{kind}.png"
        path = os.path.join(images, name)
        if kind == "zero":
            open(path, "wb").close()
        elif kind == "trunc_jpg":
            open(path, "wb").write(good_jpeg[: len(good_jpeg) // 3])
        elif kind == "trunc_png":
            open(path, "wb").write(good_png[: len(good_png) // 2])
        elif kind == "text":
            open(path, "w").write("this is a text file renamed to .jpg\n" * 20)
        elif kind == "loop":
            os.symlink(name, path)  # a symlink pointing at itself
        elif kind == "fifo":
            os.mkfifo(path)  # opening it would block a reader forever
        elif kind == "bomb":
            _png_header_only(path, 20000, 20000)
        elif kind == "dir":
            os.makedirs(path)
        elif kind == "garbage":
            open(path, "wb").write(bytes(rng.integers(0, 256, 5000, dtype=np.uint8)))
        else:
            open(path, "w").write("<html><body>404 not found</body></html>")
        add(name, i % 4, True)
    # odd but valid: must load
    odd = {
        "cmyk.jpg": Image.new("CMYK", (30, 30), (0, 120, 255, 0)),
        "gray16.png": Image.fromarray((rng.integers(0, 65535, (30, 30))).astype(np.uint16)),
        "palette.png": Image.new("RGB", (30, 30), (10, 200, 10)).convert("P"),
        "alpha.png": Image.new("RGBA", (30, 30), (10, 10, 200, 100)),
        "tiny.png": Image.new("RGB", (1, 1), (255, 0, 0)),
        "wide.jpg": Image.new("RGB", (600, 20), (100, 100, 100)),
    }
    for j, (name, img) in enumerate(odd.items()):
        img.save(os.path.join(images, name))
        add(name, j % 4, False)
    if os.geteuid() != 0:  # permission bits do not stop root, so this case only exists for other users
        name = "noperm.jpg"
        shutil.copy(os.path.join(images, "good1.jpg"), os.path.join(images, name))
        os.chmod(os.path.join(images, name), 0)
        add(name, 1, True)
    os.makedirs(os.path.join(root, "info_files", domain), exist_ok=True)
    order = rng.permutation(len(entries)).tolist()
    for split in ("train", "val"):
        with open(os.path.join(root, "info_files", domain, f"{split}.json"), "w") as f:
            json.dump([entries[k] for k in order], f)
    return bad


def hostile_data(ctx) -> Outcome:
    """Training and evaluation over folders with 100 hostile files mixed in: both complete, every bad file
    is skipped and listed, no worker hangs, the decompression bomb is refused."""
    outcome = Outcome("hostile_data")
    root = os.path.join(ctx.work, "hostile")
    num_good = 122  # 122 good + 100 hostile + 6 odd-but-valid = 228 images: divisible by the batch (12)
    bad = make_hostile_domain(root, "hostile", num_good)
    total = num_good + 100 + 6 + (0 if os.geteuid() == 0 else 1)
    batch = 12 if total % 12 == 0 else total
    out = os.path.join(ctx.work, "hostile_train")
    start = time.time()
    result = train(root, out, timeout=600, **{"data.dataset": "uned", "data.domains": "[hostile]", "data.batch_size_per_gpu": batch,
                                               "data.num_workers": 2, "data.worker_timeout_s": 120,
                                               "udon.enabled": False, "train.validate": True})
    report = {}
    path = os.path.join(out, "bad_images.json")
    if os.path.isfile(path):
        report = {item["path"]: item["reason"] for item in json.load(open(path))["files"]}
    bombs = [r for p, r in report.items() if "bomb" in p]
    outcome.check(result.returncode == 0 and set(report) == bad,
                  f"training: rc {result.returncode} in {time.time() - start:.0f} s, {len(report)}/{len(bad)} bad "
                  f"files reported, {len(set(report) - bad)} wrongly")
    outcome.check(bool(bombs) and all("DecompressionBomb" in r for r in bombs),
                  f"decompression bombs refused: {len(bombs)} ({bombs[0][:80] if bombs else 'none reported'})")
    if result.returncode:
        outcome.details.append(result.stderr[-1500:])
    ev = os.path.join(ctx.work, "hostile_eval")
    cmd = [sys.executable, "main_retrieval.py", f"model.source={os.path.join(out, 'checkpoint.pth')}", "data.dataset=uned",
           f"data.root={root}", "data.split=val", "data.domains=[hostile]", "data.num_workers=2", f"run.output_dir={ev}"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    listed = set()
    if os.path.isfile(os.path.join(ev, "bad_images.json")):
        listed = {os.path.realpath(p) if not os.path.islink(p) else p
                  for p in json.load(open(os.path.join(ev, "bad_images.json")))["files"]}
    outcome.check(res.returncode == 0 and listed == bad,
                  f"evaluation: rc {res.returncode}, {len(listed)}/{len(bad)} bad files listed")
    if res.returncode:
        outcome.details.append(res.stderr[-1500:])
    return outcome


def numerics(ctx) -> Outcome:
    """A NaN loss on one rank skips the step on every rank and is counted; a run of NaN steps stops with a
    clear message and leaves its last good checkpoint."""
    outcome = Outcome("numerics")
    step = ctx.rng.randint(3, 12)
    out = os.path.join(ctx.work, "nan_once")
    result = train(ctx.root, out, nproc=2, faults=f"nan:rank=1:step={step}",
                   **{"data.batch_size_per_gpu": 8, "train.log_every": 1})
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))] if result.returncode == 0 else []
    skipped = max((r.get("skipped_steps", 0) for r in records), default=-1)
    warned = f"non-finite loss or gradient at step {step}" in result.stdout + result.stderr
    outcome.check(result.returncode == 0 and skipped == 1 and warned,
                  f"NaN on rank 1 at step {step}: rc {result.returncode}, skipped steps {skipped}, both ranks went on")
    out = os.path.join(ctx.work, "nan_run")
    plan = ";".join(f"nan:rank=0:step={s}" for s in range(6, 12))
    result = train(ctx.root, out, nproc=2, faults=plan,
                   **{"data.batch_size_per_gpu": 8, "train.save_every": 4, "train.max_bad_steps": 3})
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    last = torch.load(os.path.join(out, "checkpoint.pth"), map_location="cpu", weights_only=True)["step"] \
        if os.path.isfile(os.path.join(out, "checkpoint.pth")) else None
    outcome.check(result.returncode == 1 and len(lines) >= 1 and "3 consecutive non-finite steps" in lines[0]
                  and last == 4 and "checkpoint.pth" in lines[0],
                  f"NaN from step 6: rc {result.returncode}, message {lines[:1]}, last good checkpoint step {last}")
    return outcome


def _call(entry: str, argv: list[str]) -> tuple[int, str]:
    """Run an entry point's main() in-process, capturing stderr (no torch import cost per case)."""
    module = __import__(entry)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = module.main(argv)
        except SystemExit as exit_:
            code = exit_.code
    return code, err.getvalue()


def malformed_invocations(ctx) -> Outcome:
    """30+ malformed invocations: each ends in exactly one error line and exit code 2, before any output
    folder is created."""
    import timm

    outcome = Outcome("malformed_invocations")
    root, work = ctx.root, ctx.work
    files = os.path.join(work, "malformed_files")
    os.makedirs(files, exist_ok=True)
    wrong_arch = os.path.join(files, "wrong_arch.pth")
    torch.save(timm.create_model("vit_small_patch16_224", num_classes=0, img_size=32, patch_size=8, embed_dim=48,
                                 depth=1, num_heads=2).state_dict(), wrong_arch)
    garbage = os.path.join(files, "garbage.pth")
    open(garbage, "wb").write(b"\x00\x01not a checkpoint")
    bad_yaml = os.path.join(files, "bad.yaml")
    open(bad_yaml, "w").write("optim: [unclosed\n")
    unknown_yaml = os.path.join(files, "unknown.yaml")
    open(unknown_yaml, "w").write("trian:\n  seed: 1\n")
    python_yaml = os.path.join(files, "python.yaml")
    open(python_yaml, "w").write("optim: !!python/object/apply:os.system ['echo owned']\n")
    bad_npz = os.path.join(files, "bad.npz")
    import numpy as np

    np.savez(bad_npz, **{"cars:test:x": np.zeros((5, 4), np.float32), "cars:test:y": np.zeros(4, np.int64)})
    escape_root = os.path.join(files, "escape")
    os.makedirs(os.path.join(escape_root, "info_files", "x"))
    os.makedirs(os.path.join(escape_root, "images"))
    json.dump([{"path": "../../../etc/passwd", "class_id": 0}], open(os.path.join(escape_root, "info_files", "x", "train.json"), "w"))

    cases = [
        (["optim.lrr=1"], "unknown config key"),
        (["trian.seed=1"], "unknown config key"),
        (["optim.lr=fast"], "invalid value"),
        (["data.batch_size_per_gpu=1.5"], "invalid value"),
        (["data.batch_size_per_gpu=-1"], "must be > 0"),
        (["optim.epochs=0"], "must be > 0"),
        (["loss.drop_prob=2"], "[0, 1]"),
        (["data.dataset=coco"], "choose one of"),
        (["run.precision=fp8"], "choose one of"),
        (["udon.sampling=random"], "choose one of"),
        (["heads.name=softmax"], "heads.name"),
        (["heads.name=arcface", "heads.h=0.3"], "does not apply"),
        (["optim.betas=[0.9]"], "two numbers"),
        (["teachers.names=[]"], "at least one teacher"),
        (["teachers.names=[dino_vitb61]"], "unknown teacher"),
        (["student.arch=vit_tiny_patch99"], "student.arch"),
        (["loss.w_distill=0", "udon.enabled=false"], "nothing to train"),
        (["train.max_bad_steps=0"], "must be > 0"),
        (["novalue"], "key=value"),
        (["--config", os.path.join(files, "missing.yaml")], "not found"),
        (["--config", bad_yaml], "cannot parse"),
        (["--config", unknown_yaml], "unknown config key"),
        (["--config", python_yaml], "cannot parse"),
        (["data.root=/does/not/exist", "data.dataset=uned"], "not found"),
        (["data.domains=[nosuchdomain]"], "missing split"),
        (["teachers.names=[dino_vitb16]", "teachers.weights_dir=/nowhere"], "dino_vitbase16_pretrain.pth"),
        (["teachers.weights.toy_vit_p16_d96=/nowhere/t.pth"], "not found"),
        ([f"teachers.weights.toy_vit_p16_d96={wrong_arch}"], "does not match"),
        ([f"teachers.weights.toy_vit_p16_d96={garbage}"], "checkpoint"),
        ([f"student.pretrained={wrong_arch}"], "does not match"),
        (["student.pretrained=/nowhere/s.pth"], "not found"),
        (["student.img_size=30"], "multiple of the patch size"),
        (["data.global_batch=0"], "must be > 0"),
        (["ladder.last_tap=final"], "choose one of"),
        (["optim.clip_mode=norm"], "choose one of"),
        (["heads.init=zeros"], "heads.init"),
        (["data.batch_size_per_gpu=500"], "fewer than one global batch"),
        ([f"data.root={escape_root}", "data.dataset=uned", "data.domains=[x]", "udon.enabled=false"], "escapes"),
    ]
    for i, (args, expected) in enumerate(cases):
        out = os.path.join(work, f"malformed{i}")
        code, err = _call("main_unic", [*(a for a in args if a.startswith("--") or a.endswith(".yaml")),
                                        *_overrides(root, out), *(a for a in args if not (a.startswith("--") or a.endswith(".yaml")))])
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        ok = code == 2 and len(lines) == 1 and expected in lines[0] and not os.path.exists(out)
        outcome.check(ok, f"main_unic {' '.join(args)[:60]} -> exit {code}: {lines[0][:110] if lines else err[-200:]}")
    retrieval_cases = [
        ([f"model.descriptors={bad_npz}"], "rows"),
        (["model.source=/nowhere/ckpt.pth", f"data.root={root}"], "not found"),
        ([f"model.source={garbage}", f"data.root={root}"], "checkpoint"),
        ([f"model.source={wrong_arch}", f"data.root={root}"], "unic checkpoint"),
    ]
    for i, (args, expected) in enumerate(retrieval_cases):
        out = os.path.join(work, f"malformed_retrieval{i}")
        code, err = _call("main_retrieval", [*args, f"run.output_dir={out}"])
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        ok = code == 2 and len(lines) == 1 and expected in lines[0].lower() and not os.path.exists(out)
        outcome.check(ok, f"main_retrieval {' '.join(args)[:50]} -> exit {code}: {lines[0][:110] if lines else err[-200:]}")
    return outcome


class _Payload:
    """Unpickling this runs code: it creates a marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def untrusted_files(ctx) -> Outcome:
    """Checkpoints carrying pickled code are refused everywhere they are read; configs are never evaluated;
    info-file paths cannot leave the data root."""
    outcome = Outcome("untrusted_files")
    marker = os.path.join(ctx.work, "PWNED")
    evil = os.path.join(ctx.work, "evil.pth")
    torch.save({"format": "unic-train", "model": _Payload(marker)}, evil)
    # resume from a poisoned checkpoint.pth in the output folder
    out = os.path.join(ctx.work, "poisoned_run")
    os.makedirs(out)
    shutil.copy(evil, os.path.join(out, "checkpoint.pth"))
    code, err = _call("main_unic", _overrides(ctx.root, out))
    outcome.check(code == 2 and "weights-only" in err and not os.path.exists(marker),
                  f"resume from a pickled payload -> exit {code}, payload ran: {os.path.exists(marker)}")
    from unic.eval.encoders import load_encoder
    import unic

    for name, load in (("unic.load_student", lambda: unic.load_student(evil)),
                       ("load_encoder", lambda: load_encoder(evil)),
                       ("teacher weights", lambda: _call("main_unic", [*_overrides(ctx.root, os.path.join(ctx.work, "t")),
                                                                      f"teachers.weights.toy_vit_p16_d96={evil}"]))):
        try:
            result = load()
            refused = isinstance(result, tuple) and result[0] == 2
        except Exception as err:  # noqa: BLE001
            refused = "weights-only" in str(err)
        outcome.check(refused and not os.path.exists(marker), f"{name} on a pickled payload: refused={refused}")
    import numpy as np

    npz = os.path.join(ctx.work, "evil.npz")
    np.savez(npz, **{"cars:test:x": np.zeros((2, 2), np.float32), "cars:test:y": np.array([_Payload(marker)] * 2, dtype=object)})
    code, err = _call("main_retrieval", [f"model.descriptors={npz}", f"run.output_dir={os.path.join(ctx.work, 'evil_eval')}"])
    outcome.check(code == 2 and not os.path.exists(marker), f"descriptor file with pickled objects -> exit {code}")
    return outcome


def hung_collective(ctx) -> Outcome:
    """One rank stalls: the job ends with a timeout error naming the rank instead of hanging forever."""
    outcome = Outcome("hung_collective")
    step = ctx.rng.randint(2, 8)
    out = os.path.join(ctx.work, "hang")
    start = time.time()
    result = train(ctx.root, out, nproc=2, faults=f"hang:rank=1:step={step}", timeout=300,
                   **{"data.batch_size_per_gpu": 8, "train.collective_timeout_s": 15})
    elapsed = time.time() - start
    lines = [line for line in result.stderr.splitlines() if "error:" in line and "timed out" in line]
    named = bool(lines) and f"rank 1 at step {step - 1} (stalled" in lines[0]
    outcome.check(result.returncode != 0 and named and elapsed < 240,
                  f"rank 1 stalls at step {step}: rc {result.returncode} after {elapsed:.0f} s: "
                  f"{lines[0].split('error:')[-1][:160] if lines else result.stderr[-300:]}")
    return outcome


SCENARIOS = {
    "preempt_kill": lambda ctx: preempt(ctx, "kill"),
    "preempt_term": lambda ctx: preempt(ctx, "term"),
    "multinode_preempt": multinode_preempt,
    "checkpoint_crash": checkpoint_crash,
    "hostile_data": hostile_data,
    "numerics": numerics,
    "malformed_invocations": malformed_invocations,
    "untrusted_files": untrusted_files,
    "hung_collective": hung_collective,
}


@dataclass
class Context:
    work: str
    root: str
    trials: int
    rng: random.Random
    cache: dict = field(default_factory=dict)


def make_context(work: str, trials: int = 1, seed: int = 0) -> Context:
    from unic.data.demo import ensure_demo_data

    os.makedirs(work, exist_ok=True)
    return Context(work, ensure_demo_data(os.path.join(work, "demo")), trials, random.Random(seed))


def format_table(outcomes: list[Outcome]) -> str:
    rows = [("scenario", "trials", "outcome")] + [
        (o.scenario, str(o.trials), "nothing lost" if o.ok else f"LOST ({o.trials - o.passed} failed)") for o in outcomes
    ]
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, width)) for r in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset")
    parser.add_argument("--trials", type=int, default=1, help="random trials per scenario")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", default=None, help="work folder to keep (default: a temporary one)")
    args = parser.parse_args()
    names = [n for n in args.scenarios.split(",") if n]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"error: unknown scenarios {unknown}; choose from {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    work = args.keep or tempfile.mkdtemp(prefix="unic-chaos-")
    ctx = make_context(work, args.trials, args.seed)
    outcomes = []
    for name in names:
        start = time.time()
        try:
            outcome = SCENARIOS[name](ctx)
        except Exception as err:  # noqa: BLE001 - a crashing scenario is a failed scenario
            outcome = Outcome(name, trials=1, passed=0, details=[f"LOST: scenario crashed: {type(err).__name__}: {err}"])
        outcomes.append(outcome)
        print(f"[{time.time() - start:5.0f} s] {name}: {'nothing lost' if outcome.ok else 'LOST'}", flush=True)
        for detail in outcome.details:
            print("    " + detail.replace("\n", "\n    "), flush=True)
    print()
    print(format_table(outcomes))
    with open(os.path.join(work, "chaos_results.json"), "w") as f:
        json.dump([{"scenario": o.scenario, "trials": o.trials, "passed": o.passed, "details": o.details}
                   for o in outcomes], f, indent=1)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
