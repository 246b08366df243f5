"""UNIC: universal image encoders by multi-teacher distillation and margin-loss domain heads."""

__version__ = "0.1.0"


def load_student(path: str, adaptor: str | None = None, device="cpu"):
    """The student of a UNIC file (training checkpoint, ``student.pth`` or ``universal.pth``), in eval mode: the
    timm ViT backbone, or with ``adaptor="<teacher>"`` its adaptor to that teacher (a module returning the
    teacher-space ``{"cls": (B, D_t), "patch": (B, N, D_t)}``; :mod:`unic.models.adaptor`)."""
    from unic.models.export import load_student as _load  # lazy: `import unic` stays light

    return _load(path, adaptor, device)


__all__ = ["load_student", "__version__"]
