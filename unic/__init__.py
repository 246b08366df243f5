"""UNIC: universal image encoders by multi-teacher distillation and margin-loss domain heads."""

__version__ = "0.1.0"


def load_student(path: str, device: str = "cpu"):
    """The timm ViT backbone of a UNIC checkpoint (training checkpoint or exported ``student.pth``), in eval mode."""
    from unic.models.export import load_student as _load

    return _load(path, device)


__all__ = ["load_student", "__version__"]
