"""kvstream's benchmark suite: one module per topic and a shared harness.

Run from the repository root as modules (``bench/`` itself must stay off ``sys.path``: ``bench/kernels.py``
would otherwise shadow the ``kernels`` package that transformers probes for)::

    python -m bench.run_all                 # every topic, results under bench/results/
    python -m bench.kernels --quick         # one topic, tiny shapes on the CPU, results in a temp dir
    kvstream bench all --quick              # the same through the console script
    python -m bench.plot                    # CSVs -> PNGs

Topics: ``kernels`` (pack/unpack vs a device-to-device copy and the torch reference; the decode step),
``transfers`` (chunks to/from pinned host vs cudaMemcpyAsync), ``disk`` (DiskTransport vs raw O_DIRECT I/O),
``generate`` (HF generate with and without streaming/offload; the paper's Fig. 2 and Fig. 25),
``levels`` (DéjàVuLib levels 0-3, the paper's Fig. 7). The harness (:mod:`bench.harness`) writes one
long CSV row per measurement and merges headline figures into ``summary.json``.
"""
