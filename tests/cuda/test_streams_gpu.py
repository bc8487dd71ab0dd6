"""The stream context and raw stream handles against torch's own view of the current stream (GPU only)."""

import pytest
import torch

from kvstream.cuda import Event, Stream, current_stream_handle, memcpy_async, side_stream

pytestmark = pytest.mark.gpu


def test_stream_context_sets_and_restores_torch_current_stream():
    outer = torch.cuda.Stream()
    s = side_stream("cuda", "test-ctx")
    with torch.cuda.stream(outer):
        assert current_stream_handle() == outer.cuda_stream
        with s:
            assert torch.cuda.current_stream().cuda_stream == s.handle == current_stream_handle()
            with s:  # re-entered: each exit restores what its own enter replaced
                assert current_stream_handle() == s.handle
            assert current_stream_handle() == s.handle
        assert torch.cuda.current_stream().cuda_stream == outer.cuda_stream
    assert torch.cuda.current_stream() == torch.cuda.default_stream()


def test_raw_handle_copies_and_events_order_work():
    src = torch.arange(1 << 20, device="cuda", dtype=torch.int32)
    dst = torch.empty(1 << 20, dtype=torch.int32, pin_memory=True)
    s = Stream("cuda")
    produced = Event(torch.device("cuda", torch.cuda.current_device())).record()  # after src, on the current stream
    s.wait_event(produced)
    memcpy_async(dst, src, s.handle)
    done = Event("cuda").record(s.handle)
    done.synchronize()
    assert done.query() and torch.equal(dst, src.cpu())
