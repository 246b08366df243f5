"""Dense evaluation: ``eval_semseg.py``, the command line of the ADE20K linear probe (DINOv2 protocol, plain
PyTorch); the probe itself is :mod:`unic.eval.semseg` (parts) and :mod:`unic.eval.semseg_run` (the run)."""
