"""Shared fixtures: a generated demo data set and tiny-config overrides for fast CPU runs."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests are tiny; one intra-op thread keeps them fast and deterministic on 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _restore_logging():
    """Entry points reconfigure the root logger (as a run should); give pytest its handlers back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> str:
    from unic.data.demo import ensure_demo_data

    return ensure_demo_data(str(tmp_path_factory.mktemp("data") / "demo"))


def tiny_overrides(demo_root: str, output_dir: str, **extra) -> list[str]:
    """A run of a few seconds: depth-2 student at 32 px, small ladder, 2 teachers, small batches."""
    values = {
        "data.root": demo_root,
        "data.domains": "[shapes,gratings]",
        "data.global_batch": "null",  # the demo preset fixes the global batch; tiny runs set it per process
        "data.batch_size_per_gpu": 16,
        "data.num_workers": 0,
        "student.img_size": 32,
        "student.kwargs": "{patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}",
        "student.drop_path": 0.0,
        "ladder.hidden_dim": 32,
        "ladder.last_hidden_dim": 64,
        "optim.epochs": 1,
        "optim.warmup_epochs": 0.5,
        "run.output_dir": output_dir,
        "train.log_every": 2,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def final_weights(out_dir) -> dict:
    """The model state of a run's ``checkpoint.pth``."""
    from unic.io import load_checkpoint

    return load_checkpoint(os.path.join(str(out_dir), "checkpoint.pth"))["model"]


def randomise_adaptors(ladder, standardizer) -> None:
    """Ladder weights N(0, 0.3) and teacher statistics away from (0, 1), so that adaptor tests see every
    term of the de-standardised prediction."""
    with torch.no_grad():
        for p in ladder.parameters():
            p.normal_(0, 0.3)
        for name, buf in standardizer.named_buffers():
            if name.endswith("__mean"):
                buf.normal_(0, 2.0)
            elif name.endswith("__std"):
                buf.uniform_(0.5, 3.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_entry(args: list[str], nproc: int = 1, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run an entry point as a user would: plain python for 1 process, torchrun (gloo) for more."""
    if nproc == 1:
        cmd = [sys.executable] + args
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}"] + args
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env)
