"""A replacement's restore keeps the outputs of the steps before the one it restored, so that a next stage that
was replaced too and whose replica is behind can be replayed (found as a rare failure of
``test_second_failure_during_recovery_disk`` on a loaded 2-core machine: slot restarted, 32-63 tokens recomputed)."""
import torch

from kvstream.serving.failover.controller import Controller, FtMicrobatch
from kvstream.serving.failover.replicator import output_key
from kvstream.serving.failover.restore import _with_output
from kvstream.streaming.segments import Prefill, Step
from kvstream.streaming.session import Manifest
from kvstream.transports.host import HostTransport


def _replica(steps_with_output, last_step=8, width=4, name="ft/p0/s0/g1"):
    """A manifest of a prefill of ``width`` tokens and decode steps 1..``last_step``, and a store holding the
    outputs of ``steps_with_output`` (the output of step k is a tensor full of k)."""
    segs = [Prefill(0, width, 1, {0: f"{name}/prefill"})]
    segs += [Step(width + k - 1, 1, 1, f"{name}/step{k}", (0,)) for k in range(1, last_step + 1)]
    m = Manifest(session=name, num_layers=1, kv_layers=[0], kv_heads=1, head_dim=4, dtype=torch.float32, batch=1,
                 seq_length=width + last_step, segments=segs)
    store = HostTransport(capacity_bytes=1 << 20)
    for k in steps_with_output:
        store.flush(output_key(name, k), torch.full((1, 1, 2), float(k))).wait()
    return m, store, name, width


def test_with_output_cuts_at_the_newest_output_and_brings_the_earlier_ones_oldest_first():
    m, store, name, width = _replica([2, 3, 4, 5, 6, 7])
    cut, step, out, before = _with_output(store, m, name, width, earlier=3)
    assert step == 7 and cut.seq_length == width + 7 and len(cut.segments) == 1 + 7
    assert float(out.flatten()[0]) == 7.0
    assert [k for k, _ in before] == [4, 5, 6] and all(float(t.flatten()[0]) == k for k, t in before)
    assert _with_output(store, m, name, width)[3] == []  # none asked for: none fetched
    m2, empty, name2, _ = _replica([], name="ft/p0/s0/g2")
    assert _with_output(empty, m2, name2, width, earlier=3) == (None, -1, None, [])
    store.close()
    empty.close()


def _plan_and_reports(reached, oldest):
    """Two stages; stage s reached ``reached[s]`` of slot 0 and kept outputs back to ``oldest[s]``."""
    plan = {"stages": [10, 11]}
    reports = {10 + s: {"groups": {"0": reached[s]}, "log": {"0": oldest[s]}} for s in range(2)}
    return plan, reports


def test_a_next_stage_behind_by_several_steps_replays_when_the_earlier_outputs_were_kept():
    mb = FtMicrobatch.__new__(FtMicrobatch)
    mb.done_step, mb.history = 8, {k: None for k in range(10)}  # the inputs of steps 0..9 at the controller
    c = Controller.__new__(Controller)  # the check reads only the plan and the reports
    # both stages replaced: stage 0 restored step 7, stage 1 only step 4 (its replica lagged)
    plan, reports = _plan_and_reports([7, 4], [7, 4])
    assert c._unreplayable(plan, reports, {0: mb}) == {0}  # stage 0 kept step 7's output only: steps 5, 6 lost
    plan, reports = _plan_and_reports([7, 4], [4, 4])
    assert c._unreplayable(plan, reports, {0: mb}) == set()  # with steps 4..6 kept, stage 1 is replayed
