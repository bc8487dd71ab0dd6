"""Serving across processes, GPUs and hosts: DéjàVu's prompt/token disaggregation and its tools.

* :mod:`.worker` — ``kvstream serve``: a prompt worker (prefill, KV streamed layer by layer to a token
  worker), a token worker (load the streamed KV, decode), or a colocated worker (the baseline);
* :mod:`.disagg` — ``kvstream disagg``: start the workers, run a load, check every output against
  single-process ``generate``, report throughput and normalized latency;
* :mod:`.loadgen` — Poisson arrivals, prompt/output lengths, the metrics;
* :mod:`.planner` — ``kvstream plan``: DéjàVu's split of D machines into prompt and token workers
  (``--swap``: the largest microbatch with and without microbatch swapping);
* :mod:`.pipeline` — ``kvstream pipeline``: a pipeline-parallel decoding engine (one process per stage)
  with DéjàVu's microbatch swapping; ``kvstream disagg --stages D`` runs disaggregation on it;
* :mod:`.launch` — what the launchers share (stopping the processes).

The KV moves through point-to-point transports (:class:`~kvstream.transports.remote.RemoteHostTransport`,
:class:`~kvstream.transports.nccl.NcclTransport`); :mod:`kvstream.streaming.placement` maps regions between
different pipeline/tensor-parallel layouts.
"""

from .loadgen import Completion, Request, make_requests, microbatches, poisson_arrivals, summarize
from .planner import MemoryModel, Plan, PlanInputs, plan

__all__ = ["Request", "Completion", "make_requests", "microbatches", "poisson_arrivals", "summarize", "PlanInputs",
           "MemoryModel", "Plan", "plan"]
