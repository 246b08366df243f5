"""Dense evaluation: ``eval_semseg.py``, the ADE20K linear probe (DINOv2 protocol, plain PyTorch)."""
