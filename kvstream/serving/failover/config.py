"""What a failover run is: the pipeline's :class:`~kvstream.serving.pipeline.run.RunConfig` plus where the
replicas go, the heartbeat deadline, the replacement policy, and the failures to inject (:class:`KillSpec`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

from ...errors import ConfigError
from ..pipeline.run import RunConfig, validate as validate_pipeline

#: Where each stage's KV is replicated (``nccl`` is not built: see the package docstring).
REPLICAS = ("ring", "host", "disk")
#: How a failed stage is replaced.
REPLACEMENTS = ("standby", "restart")
_KILL = re.compile(r"(r?)(\d+)@(\d+|p\d+|recover)(?::(kill|stop))?")


@dataclass(frozen=True)
class KillSpec:
    """One failure to inject: ``[r]STAGE@WHEN[:kill|stop]``.

    * ``S@N`` — the process serving stage ``S`` dies in decode step ``N`` of a microbatch (the first that
      reaches it): after the step's forward and its replication were started, before its output is sent;
    * ``S@pN`` — it dies during the ``N``-th prompt it prefills (1-based), after its first layer's KV was
      streamed out: a replica holding part of a prefill;
    * ``S@recover`` — it dies in the middle of the next recovery (a survivor before it reports, a
      replacement after its first restored microbatch): a second failure during recovery;
    * ``rS@N`` — (``--replica host``) the replica holder of stage ``S`` dies once it holds decode step ``N``.

    ``:stop`` sends ``SIGSTOP`` instead of ``SIGKILL`` (a hung process: found by its missing heartbeats). Each
    spec fires once, in whichever incarnation of its target reaches it first.
    """

    text: str
    holder: bool
    stage: int
    when: str  # "decode", "prefill" or "recover"
    step: int
    signal: str  # "kill" or "stop"

    @classmethod
    def parse(cls, text: str, stages: int) -> "KillSpec":
        """Parse one ``--kill`` value.

        Raises
        ------
        ConfigError
            Bad syntax or a stage outside ``[0, stages)``.
        """
        m = _KILL.fullmatch(text.strip())
        if m is None:
            raise ConfigError(f"--kill {text!r}: expected STAGE@STEP, STAGE@pN, STAGE@recover or rSTAGE@STEP, "
                              "optionally with :stop")
        holder, stage, when, sig = m.group(1) == "r", int(m.group(2)), m.group(3), m.group(4) or "kill"
        if not 0 <= stage < stages:
            raise ConfigError(f"--kill {text!r}: stage {stage} outside the {stages} stages")
        if when == "recover":
            kind, step = "recover", 0
        elif when.startswith("p"):
            kind, step = "prefill", int(when[1:])
        else:
            kind, step = "decode", int(when)
        if kind == "prefill" and step < 1:
            raise ConfigError(f"--kill {text!r}: prompts are counted from 1")
        if kind == "decode" and step < 1:
            raise ConfigError(f"--kill {text!r}: decode steps are counted from 1 (use pN for a prompt)")
        if holder and kind != "decode":
            raise ConfigError(f"--kill {text!r}: a replica holder dies at a decode step it holds (rS@N)")
        return cls(text.strip(), holder, stage, kind, step, sig)


@dataclass
class FailoverConfig(RunConfig):
    """A pipeline run with KV replication and failure recovery (every process gets the same one).

    On top of :class:`~kvstream.serving.pipeline.run.RunConfig`: ``replica`` (``ring``: the next stage's
    host memory, DéjàVu's choice; ``host``: a standby process per stage, which holds that stage's replica
    in its host memory and takes its place on a failure; ``disk``: a :class:`~kvstream.DiskTransport`
    under ``replica_dir``), ``replacement`` (``standby``: a process started in advance, weights loaded;
    ``restart``: a process started after the failure), ``standbys`` (how many idle standbys are kept
    with ``ring``/``disk``), ``heartbeat_s``/``deadline_s`` (a process that sent no heartbeat for
    ``deadline_s`` is dead; DéjàVu's 1 s / 3 s), ``exit_watch`` (also notice at once a child process that
    exited), ``window`` (decode steps a stage may run ahead of its acknowledged replica; each stage keeps
    its last ``window + 3`` outputs for the replay), ``recovery_timeout_s`` (bound on one recovery
    attempt), ``kills`` (:class:`KillSpec` texts) and ``replicate``.
    """

    replica: str = "ring"
    replica_dir: str | None = None
    replacement: str = "standby"
    standbys: int = 1
    heartbeat_s: float = 1.0
    deadline_s: float = 3.0
    exit_watch: bool = True
    window: int = 4
    recovery_timeout_s: float = 120.0
    kills: list = field(default_factory=list)
    replicate: bool = True

    def kill_specs(self) -> list[KillSpec]:
        """The parsed ``kills``."""
        return [KillSpec.parse(k, self.stages) for k in self.kills]

    @property
    def log_steps(self) -> int:
        """Outputs a stage keeps per microbatch for a replay (and inputs the controller keeps)."""
        return self.window + 3

    @classmethod
    def from_json(cls, text: str) -> "FailoverConfig":
        """Inverse of ``json.dumps(cfg.to_json())``."""
        doc = json.loads(text)
        doc["rate"] = float(doc["rate"])
        return cls(**doc)


def validate(cfg: FailoverConfig) -> None:
    """Check a failover run before any process starts (the CLI's one-line errors).

    Raises
    ------
    ConfigError
        What :func:`~kvstream.serving.pipeline.run.validate` refuses, and: an unknown replica or
        replacement, ``ring`` with one stage, swapping or a KV budget (not combined with failover), a bad
        heartbeat or deadline, a bad kill, a holder kill without ``--replica host``, ``--device cuda``
        without a GPU.
    """
    if cfg.replica not in REPLICAS:
        raise ConfigError(f"--replica must be one of {', '.join(REPLICAS)} (nccl is not built), got {cfg.replica!r}")
    if cfg.replacement not in REPLACEMENTS:
        raise ConfigError(f"--replacement must be standby or restart, got {cfg.replacement!r}")
    if cfg.replica == "ring" and cfg.stages < 2:
        raise ConfigError("--replica ring needs at least 2 stages (each replicates to the next); use host or disk")
    if cfg.swap != "off" or cfg.kv_budget_mb is not None or cfg.prompt_stages:
        raise ConfigError("kvstream failover runs without --swap, --kv-budget-mb and --prompt-stages")
    if not (0 < cfg.heartbeat_s < cfg.deadline_s) or not math.isfinite(cfg.deadline_s):
        raise ConfigError(f"need 0 < --heartbeat-s < --deadline-s, got {cfg.heartbeat_s} and {cfg.deadline_s}")
    if cfg.window < 0 or cfg.standbys < 0 or cfg.recovery_timeout_s <= 0:
        raise ConfigError("--window and --standbys must be >= 0, --recovery-timeout-s > 0")
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device cuda but torch sees no CUDA GPU")
    for spec in cfg.kill_specs():
        if spec.holder and cfg.replica != "host":
            raise ConfigError(f"--kill {spec.text}: replica holders are processes of their own only with --replica host")
    validate_pipeline(_pipeline_part(cfg))


def _pipeline_part(cfg: FailoverConfig) -> RunConfig:
    """The :class:`RunConfig` fields of ``cfg`` (for the pipeline's own checks, device count aside: the
    stage processes of a failover run may share one GPU)."""
    doc = {k: getattr(cfg, k) for k in RunConfig.__dataclass_fields__}
    doc["device"] = "cpu"
    return RunConfig(**doc)


__all__ = ["REPLICAS", "REPLACEMENTS", "KillSpec", "FailoverConfig", "validate"]
