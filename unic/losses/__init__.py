"""Losses: UNIC distillation (and UDON terms)."""

from unic.losses.distill import distillation_loss

__all__ = ["distillation_loss"]
