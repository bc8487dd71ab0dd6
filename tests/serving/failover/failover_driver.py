"""Run failover phases in one session of processes and print one JSON line per phase (the tests run this in a
subprocess with a timeout: nothing outlives its deadline; the workers exit on their own once the controller
is gone)."""

from __future__ import annotations

import json
import os
import sys

from kvstream.serving.failover.cli import summarize
from kvstream.serving.failover.config import FailoverConfig, validate
from kvstream.serving.failover.run import FailoverSession, checks, per_phase
from kvstream.serving.pipeline.run import workload


def main() -> None:
    spec = json.loads(sys.argv[1])
    cfg = FailoverConfig(**spec["config"])
    validate(cfg)
    groups = workload(cfg)
    phases = []
    with FailoverSession(cfg) as session:
        for ph in spec["phases"]:
            doc = session.run_phase(groups, kills=ph.get("kills", []), mode=ph.get("mode", "restore"),
                                    name=ph.get("name", ""))
            phases.append(doc)
    if cfg.replica == "disk":  # once every process has finished: its last releases are done
        phases[-1]["disk_files"] = sorted(os.path.join(d, f) for d, _, fs in os.walk(cfg.replica_dir) for f in fs)
    for doc in phases:
        doc["recomputed_tokens"] = per_phase(session.docs, doc["phase"], "recomputed_tokens")
        rec = {"config": cfg.to_json(), "failover": doc, "checks": checks(cfg, groups, doc["outputs"])}
        out = summarize(rec)
        out.update(name=doc["name"], events=doc["events"], disk_files=doc.get("disk_files"),
                   replicas=doc.get("replicas"))
        print(json.dumps(out), flush=True)
    print(json.dumps({"workers": {str(k): v for k, v in session.docs.items()}}), flush=True)


if __name__ == "__main__":
    main()
