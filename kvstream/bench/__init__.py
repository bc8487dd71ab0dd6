"""kvstream's benchmark suite: one module per topic and a shared harness.

Run as modules or through the console script::

    python -m kvstream.bench.run_all            # every topic, results under bench/results/
    python -m kvstream.bench.kernels --quick    # one topic, tiny shapes on the CPU, results in a temp dir
    kvstream bench all --quick                  # the same through the console script
    python -m kvstream.bench.plot               # CSVs -> PNGs

Topics: ``kernels`` (pack/unpack vs a device-to-device copy and the torch reference; the decode step),
``transfers`` (chunks to/from pinned host vs cudaMemcpyAsync), ``disk`` (DiskTransport vs raw O_DIRECT I/O),
``generate`` (HF generate with and without streaming/offload; the paper's Fig. 2 and Fig. 25),
``levels`` (DéjàVuLib levels 0-3, the paper's Fig. 7). The harness (:mod:`kvstream.bench.harness`) writes one
long CSV row per measurement and merges headline figures into ``summary.json``. Results and the notes on
them stay in the repository's ``bench/results/`` and ``bench/NOTES.md``.
"""
