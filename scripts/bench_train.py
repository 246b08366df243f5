"""Training throughput benchmark (``unic.train.bench``; also installed as ``unic-bench-train``).

    python scripts/bench_train.py [--config F] [--warmup 5] [--steps 20] [--peak_tflops T] [key=value ...]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from unic.train.bench import cli  # noqa: E402

if __name__ == "__main__":
    cli()
