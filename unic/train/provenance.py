"""What each segment of a run was trained with, never overwritten.

``config.yaml`` is the configuration the run started with; a resume whose settings differ adds
``config.resume-N.yaml`` (N = 1, 2, ...) and logs the difference. The checkpoint keeps the same history: its
``config`` is the first segment's, ``config_history`` lists each later segment that changed a setting
(the step it started at, its full config and the changes).
"""

from __future__ import annotations

import glob
import os
import re
from typing import Any

from omegaconf import OmegaConf

from unic.cli import format_value

RESUME_CONFIG = re.compile(r"config\.resume-(\d+)\.yaml$")
_UNSET = "<unset>"


def _leaves(config: dict, prefix: str = "") -> dict[str, Any]:
    """``{dotted key: value}`` of every leaf setting (lists are leaves)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_leaves(value, path + "."))
        else:
            out[path] = value
    return out


def config_changes(old: dict, new: dict) -> dict[str, list]:
    """``{key: [old, new]}`` for every setting that differs between two plain configs."""
    before, after = _leaves(old), _leaves(new)
    return {key: [before.get(key, _UNSET), after.get(key, _UNSET)]
            for key in sorted(set(before) | set(after)) if before.get(key, _UNSET) != after.get(key, _UNSET)}


def format_changes(changes: dict[str, list]) -> str:
    """``optim.lr 0.002 -> 0.0001; train.max_steps 0 -> 20``."""
    return "; ".join(f"{key} {format_value(old)} -> {format_value(new)}" for key, (old, new) in changes.items())


def latest_config(state: dict) -> dict:
    """The config the newest segment of a checkpoint's run trained with."""
    history = state.get("config_history") or []
    return history[-1]["config"] if history else (state.get("config") or {})


def resume_configs(output_dir: str) -> list[str]:
    """The ``config.resume-N.yaml`` files of a run folder, in order."""
    files = [p for p in glob.glob(os.path.join(output_dir, "config.resume-*.yaml")) if RESUME_CONFIG.search(p)]
    return sorted(files, key=lambda p: int(RESUME_CONFIG.search(p).group(1)))


def next_resume_config(output_dir: str) -> str:
    existing = [int(RESUME_CONFIG.search(p).group(1)) for p in resume_configs(output_dir)]
    return os.path.join(output_dir, f"config.resume-{max(existing, default=0) + 1}.yaml")


def write_plain_config(config: dict, path: str, header: str = "") -> None:
    """A plain config dict as YAML (atomically), with an optional ``# comment`` header."""
    from unic.io import write_text

    text = OmegaConf.to_yaml(OmegaConf.create(config))
    write_text(path, "".join(f"# {line}\n" for line in header.splitlines()) + text)
