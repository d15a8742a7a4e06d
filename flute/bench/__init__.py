"""The flute benchmark suite (``flute bench``), one module per concept:

=============  ====================================================================================
``cli``        the command line: the GPU sweep (--quick / --full), --e2e, and dispatch to ``cpu``
``cpu``        the CPU benchmark: flute vs torch fp32/bf16/int4 and llama.cpp, cache-cold, 1-2 threads
``cpu_cli``    its command line, ``flute bench --device cpu``, and its result file
``shapes``     the shape grids (model layers for the GPU, the CPU benchmark's N x K list)
``roofline``   bytes per kernel, rotation through the caches, measured copy / read bandwidth
``timing``     host-clock and CUDA-event timing (median after warm-up)
``weights``    random benchmark weights (one kernel-layout generator) and the reference check
``baselines``  GPU baselines: tinygemm and Marlin
``peers``      CPU peers from torch: dense fp32/bf16 and the int4 CPU kernel
``llamacpp``   llama.cpp's CPU kernels: build once into a cache, run ``native/ggml_matmul.cpp``
``toolchain``  compiling the small native helpers (``native/*.c*``) into the cache
``sweep``      the GPU sweep over (shape, dtype, bits, group, M) and its speedups
``report``     result paths, JSON writing, schema checks, text tables, the targets hook
``plots``      PNGs (GPU sweep, end to end, CPU benchmark)
``e2e``        end-to-end generate throughput with Hugging Face transformers
``env``        host, CPU/GPU, versions, git commit
=============  ====================================================================================

Acceptance targets are not part of the library: they live in ``benchmarks/targets.py``.
"""
from .cli import main

__all__ = ["main"]
