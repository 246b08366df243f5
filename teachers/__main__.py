"""``python -m teachers`` (or ``unic-teachers``): the teacher registry as a table.

    python -m teachers [--weights_dir DIR] [--json]

One row per registry teacher: architecture, feature dim and patch size (read off the model built on the meta
device, so nothing is allocated or downloaded), resolution, the file looked up in ``teachers.weights_dir``
(and whether it is there), and where the official file comes from. Generic teachers need no entry:
``timm:<model>[.<tag>]`` and ``open_clip:<model>:<tag>``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from teachers.registry import TEACHERS, TeacherSpec


def _dims(spec: TeacherSpec) -> tuple[int, int]:
    """(feature dim, patch size) of a registry teacher, built on the meta device."""
    import torch

    from teachers.build import build_teacher_model

    with torch.device("meta"):
        tokens, _ = build_teacher_model(spec, "random", "")
    return tokens.embed_dim, tokens.patch_size


def rows(weights_dir: str) -> list[dict]:
    out = []
    for spec in TEACHERS.values():
        dim, patch = _dims(spec)
        path = os.path.join(os.path.expanduser(weights_dir), spec.filename) if spec.filename else None
        out.append({
            "name": spec.name, "arch": spec.arch, "dim": dim, "patch": patch, "resolution": spec.resolution,
            "file": spec.filename or f"({spec.default_weights})", "present": bool(path and os.path.isfile(path)),
            "url": spec.url or "", "hub": spec.hub or "",
        })
    return out


def format_rows(table: list[dict]) -> str:
    columns = ("name", "arch", "dim", "patch", "resolution", "file", "present", "url")
    cells = [[str(row[c]) if c != "present" else ("yes" if row[c] else "-") for c in columns] for row in table]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights_dir", default="~/.cache/unic/teachers",
                        help="where the files are looked up (teachers.weights_dir; default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    import logging

    logging.getLogger("teachers.build").setLevel(logging.ERROR)  # the meta builds are not "random teachers"
    table = rows(args.weights_dir)
    print(json.dumps(table, indent=1) if args.json else format_rows(table))
    if not args.json:
        print(f"\nfiles are looked up in {os.path.expanduser(args.weights_dir)} (teachers.weights_dir); set one "
              "with teachers.weights.<name>=/path, =hub (online) or =random (smoke tests)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
