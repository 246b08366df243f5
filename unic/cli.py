"""The one command-line style of every entry point: ``[--config F] [key=value ...]`` over a dataclass schema.

Each entry point (``main_unic.py``, ``main_retrieval.py``, ``main_zeroshot.py``, ``eval_transfer/main_ft_extract.py``,
``eval_transfer/main_clf.py``, ``eval_dense/eval_semseg.py``, ``unic/train/bench.py``, ``python -m unic.export``) declares an OmegaConf
dataclass schema made of the shared groups of :mod:`unic.config` (``run``, ``model``, ``data``) and its own,
and calls :func:`parse`. The merge, the validation with closest-key hints and the resolved-config file are
those of :func:`unic.config.load_config`; ``--help`` lists every key with its default and comment.
A few flags that are actions, not settings (``main_unic.py --plan``), are declared by the entry point.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from unic.config import (CONFIG_DIR, ConfigError, closest_key, config_keys, load_config, packaged_presets,
                         save_config)

_FIELD = re.compile(r"^\s+(?P<name>\w+)\s*:[^#]*?(#\s*(?P<comment>.+))?$")


def _field_comments(cls: type) -> dict[str, str]:
    """``{field: its comment}`` read from the schema's source: the trailing ``# comment`` of the field's
    line, else the comment lines right above it (empty when the source cannot be read)."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        above: list[str] = []
        for line in lines[1:]:
            stripped = line.strip()
            if stripped.startswith("#"):
                above.append(stripped.lstrip("#").strip())
                continue
            match = _FIELD.match(line)
            if match and not stripped.startswith(("def ", "@", "return")):
                comment = match.group("comment") or " ".join(above)
                if comment:
                    comments[match.group("name")] = comment.strip()
            above = []
    return comments


def _summary(cls: type) -> str:
    """The first paragraph of a group's own docstring (not the signature dataclasses make up)."""
    doc = cls.__dict__.get("__doc__") or ""
    if doc.startswith(f"{cls.__name__}("):
        return ""
    return inspect.cleandoc(doc).split("\n\n")[0].replace("\n", " ")


def format_value(value: Any) -> str:
    """A setting's value as it is written on the command line and in logs (``null``, ``[1, 2]``, text as is)."""
    if isinstance(value, str):
        return repr(value) if value == "" else value
    return "null" if value is None else json.dumps(value)


def describe(schema: type, values: DictConfig | None = None, prefix: str = "") -> list[str]:
    """``key = value  # comment`` for every setting of ``schema``, group by group; the values are those of
    ``values`` (the default config of the entry point) or else the schema's defaults."""
    if values is None:
        values = OmegaConf.structured(schema)
    lines: list[str] = []
    comments = _field_comments(schema)
    instance = schema()  # field types are strings (postponed annotations): read them off an instance
    for f in dataclasses.fields(schema):
        node = values._get_node(f.name)
        group = type(getattr(instance, f.name))
        if dataclasses.is_dataclass(group):
            summary = _summary(group)
            lines += ["", f"  {prefix}{f.name}:" + (f"  {summary}" if summary else "")]
            lines += describe(group, values[f.name], f"{prefix}{f.name}.")
            continue
        value = OmegaConf.to_container(node) if isinstance(node, (DictConfig, ListConfig)) else node._value()
        text = f"    {prefix}{f.name} = {format_value(value)}"
        if f.name in comments:
            text = f"{text:<46} # {comments[f.name]}"
        lines.append(text)
    return lines


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose key listing is written only when the help is shown (a run never pays for it)."""

    def __init__(self, *args, help_texts: Callable[[], tuple[str, str]], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._help_texts = help_texts

    def format_help(self) -> str:
        self.epilog, config_help = self._help_texts()
        next(a for a in self._actions if a.dest == "config").help = config_help
        return super().format_help()


def build_parser(schema: type, doc: str, example: str, default_config: str | None = None,
                 flags: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.ArgumentParser:
    def help_texts() -> tuple[str, str]:
        defaults = load_config(default_config, [], schema) if default_config else None
        where = f" (values of {os.path.basename(default_config)})" if default_config else " and their defaults"
        epilog = "\n".join([
            f"configuration keys{where}; set any as key=value, lists as key=[a,b], unset as key=null:",
            *describe(schema, defaults), "", "example:", f"  {example}",
        ])
        shown = f"default: {default_config}" if default_config else "default: none, the keys' defaults below"
        presets = _presets_for(schema)
        named = f" or packaged preset name ({', '.join(presets)})" if presets else ""
        return epilog, f"YAML file{named}; {shown}"

    parser = _Parser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter, help_texts=help_texts)
    parser.add_argument("--config", default=default_config, metavar="F")
    if flags is not None:
        flags(parser)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="settings over the config file's")
    return parser


def _presets_for(schema: type) -> list[str]:
    """The packaged presets whose groups all belong to ``schema`` (the training presets for training)."""
    groups = {f.name for f in dataclasses.fields(schema)}
    return [name for name in packaged_presets()
            if set(OmegaConf.load(os.path.join(CONFIG_DIR, f"{name}.yaml")).keys()) <= groups]


def parse(argv: Sequence[str] | None, schema: type, doc: str, example: str, default_config: str | None = None,
          flags: Callable[[argparse.ArgumentParser], None] | None = None,
          renamed: dict[str, str] | None = None) -> tuple[DictConfig, argparse.Namespace]:
    """Parse ``[--config F] [flags] [key=value ...]`` into the read-only, validated config of ``schema``;
    user errors raise :class:`unic.config.ConfigError`. Returns the config and the parsed flags.
    ``renamed``: the entry point's own former flags (``{"batch_size": "data.global_batch"}``), for the hint
    that answers them (besides :data:`OLD_FLAGS`)."""
    parser = build_parser(schema, doc, example, default_config, flags)
    args, unknown = parser.parse_known_intermixed_args(argv)
    if unknown:
        raise ConfigError(_flag_hint(unknown[0], schema, {**OLD_FLAGS, **(renamed or {})}))
    return load_config(args.config, args.overrides, schema), args


# flags of the entry points before they took key=value settings, and the keys that replaced them
OLD_FLAGS = {"checkpoint": "model.source", "pretrained": "model.source", "data_dir": "data.root",
             "data": "data.dataset", "image_size": "data.img_size", "output": "run.output_dir",
             "batch_size": "data.batch_size_per_gpu"}


def _flag_hint(flag: str, schema: type, renamed: dict[str, str]) -> str:
    """The one-line answer to an unknown ``--flag``: settings are ``key=value``, and which key it means."""
    if not flag.startswith("-"):
        return f"unexpected argument {flag!r}: settings are key=value"
    name = flag.lstrip("-").split("=", 1)[0].replace("-", "_")
    keys = config_keys(OmegaConf.structured(schema))
    key = renamed.get(name) if renamed.get(name) in keys else closest_key(name, keys)
    hint = f"; did you mean {key}=<value>?" if key else ""
    return f"unknown flag {flag}: settings are given as key=value{hint} (see --help)"


def write_resolved_config(cfg: DictConfig, output_dir: str, name: str = "config.yaml") -> str:
    """Write the resolved configuration next to the results (``<output_dir>/config.yaml``); returns the path."""
    path = os.path.join(output_dir, name)
    os.makedirs(output_dir, exist_ok=True)
    save_config(cfg, path)
    return path
