"""The controller's side of an epoch on its own (no workers): whose reports a plan waits for.

A phase's first plan waits for every started holder and standby too (found as a rare failure of
``test_replica_holder_killed_host`` on a loaded CI machine: the holder applied the phase's plan only after
its primary had served the whole phase, so ``r0@5`` never fired)."""
import json
import subprocess
import sys

import pytest

from kvstream.serving.failover.cluster import Cluster, Failed, Proc
from kvstream.serving.failover.config import FailoverConfig
from kvstream.serving.failover.epoch import state_key


@pytest.fixture
def cluster():
    c = Cluster(FailoverConfig(device="cpu", stages=2, replica="host", exit_watch=False, recovery_timeout_s=5.0))
    sleepers = []
    for inc, holder_of in ((1, None), (2, None), (3, 0), (4, 1)):
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        sleepers.append(p)
        c.procs[inc] = Proc(inc, p, None, 0.0, ready=inc != 4, holder_of=holder_of)  # holder 4 still starting
    c.roles.stages, c.roles.holders = [1, 2], {0: 3, 1: 4}
    yield c
    for p in sleepers:
        p.kill()
        p.wait()


def test_a_phases_first_plan_waits_for_the_started_holders(cluster):
    plan = cluster.publish(groups=[], restore={}, rebuild=[], reset=[], floors={}, kills={}, dead=[])
    assert plan["holders"] == [3, None]
    for inc in (1, 2):
        cluster.store.set(state_key(plan["epoch"], inc), json.dumps({"stage": inc - 1}))
    assert sorted(cluster.collect(plan, 1.0)) == [1, 2]  # a reconfiguration waits for the stages only
    with pytest.raises(Failed) as e:  # the ready holder 3 has not reported: it is late, and fenced
        cluster.collect(plan, 0.3, everyone=True)
    assert [d[:2] for d in e.value.dead] == [(3, "timeout")] and not cluster.procs[3].alive
    cluster.procs[3].alive = True  # (a fresh one, for the second half)
    cluster.store.set(state_key(plan["epoch"], 3), json.dumps({"stage": None}))
    assert sorted(cluster.collect(plan, 1.0, everyone=True)) == [1, 2, 3]  # 4 is not started yet: not waited for
