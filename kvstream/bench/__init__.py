"""kvstream's benchmark suite: one module per topic and a shared harness.

Run as modules or through the console script::

    python -m kvstream.bench.run_all            # every topic, results under bench/results/
    python -m kvstream.bench.kernels --quick    # one topic, tiny shapes on the CPU, results in a temp dir
    kvstream bench all --quick                  # the same through the console script
    python -m kvstream.bench.plot               # CSVs -> PNGs

Topics: ``kernels`` (pack/unpack vs a device-to-device copy and the torch reference; the decode step),
``transfers`` (chunks to/from pinned host vs cudaMemcpyAsync), ``disk`` (DiskTransport vs raw O_DIRECT I/O),
``generate`` (HF generate with and without streaming/offload; the paper's Fig. 2 and Fig. 25),
``levels`` (DéjàVuLib levels 0-3, the paper's Fig. 7), and ``prefix``, ``nccl_handoff``, ``disagg``,
``kernels_tune``. Shared by all: :mod:`~kvstream.bench.harness` (a topic's run: options, device, rows),
:mod:`~kvstream.bench.timing`, :mod:`~kvstream.bench.ceilings` (measured in the same run),
:mod:`~kvstream.bench.inputs` and :mod:`~kvstream.bench.records` (one long CSV row per measurement,
``summary.json``, markdown tables). Results and the notes on them stay in the repository's
``bench/results/`` and ``bench/NOTES.md``.
"""
