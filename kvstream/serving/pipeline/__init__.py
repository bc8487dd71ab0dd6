"""A pipeline-parallel decoding engine on ``torch.distributed``, with DéjàVu's microbatch swapping.

By job, along one microbatch step:

* :mod:`.stages` — a stage of a Hugging Face decoder (layers by
  :func:`~kvstream.streaming.placement.split_layers`; embeddings on the first, norm and LM head on the
  last), run through the model's own forward; :class:`~.stages.StageCache`, its per-microbatch cache;
* :mod:`.swap` — a stage's KV residency: the budget, the window of resident microbatches, layer-by-layer
  swap-in with one event per layer, newest tokens out, the per-step ratio and stall log;
* :mod:`.engine` — one microbatch step on a stage, and the loop of the stages after the first;
* :mod:`.links` — process groups from torchrun's environment and the step messages between stages;
* :mod:`.scheduler` — stage 0: admission, round-robin microbatches, requests joining and leaving;
* :mod:`.run` — a stage process from start to end, and the check against single-process ``generate``;
* :mod:`.disagg` — prompt/token disaggregation on pipelines (``kvstream disagg --stages D``): prompt
  stages stream each layer's KV to the token stage owning it, microbatches join the token pipeline;
* :mod:`.cli` and :mod:`.report` — ``kvstream pipeline`` and ``python -m kvstream.serving.pipeline``.

Example (one stage, in this process)::

    from kvstream.serving.pipeline import Env, RunConfig, run_stage
    doc = run_stage(RunConfig(stages=1, requests=4, swap="on", kv_budget_mb=0.1), Env(0, 1, 0))
    assert doc["identical"] == 4
"""

from .links import Env
from .run import RunConfig, run_stage
from .stages import StageCache, StageModel
from .swap import SwapManager

__all__ = ["RunConfig", "run_stage", "Env", "StageModel", "StageCache", "SwapManager"]
