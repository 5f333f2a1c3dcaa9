"""Throughput of every cache policy across shared-prefix ratios and batch sizes.

    python benchmarks/throughput.py --scale cpu --plot     # minutes on 2 CPU cores
    python benchmarks/throughput.py --scale gpu --plot     # LLaDA-8B shape, random bf16

Same as `bicache-jax bench`; see bicache_jax/bench.py for what is measured.
"""

import sys

from bicache_jax.bench import main

if __name__ == "__main__":
    sys.exit(main())
