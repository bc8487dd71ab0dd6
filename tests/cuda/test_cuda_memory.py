import pytest
import torch

from kvstream.cuda import Event, Stream, memcpy_2d_async, memcpy_async
from kvstream.cuda.memory import PinnedAllocator, host_empty, size_class


def test_size_classes():
    assert size_class(1) == 4096
    assert size_class(4097) == 8192
    assert size_class((2 << 20) - 1) == 2 << 20
    assert size_class((2 << 20) + 1) == 4 << 20
    assert size_class(5 << 20) == 6 << 20


def test_host_empty_cpu_fallback_shapes():
    t = host_empty(1000)
    assert t.dtype == torch.uint8 and t.numel() == 1000
    x = host_empty((3, 5), torch.bfloat16)
    assert x.shape == (3, 5) and x.dtype == torch.bfloat16
    assert host_empty((2, 0, 4), torch.float16, pin=True).shape == (2, 0, 4)
    with pytest.raises(ValueError):
        host_empty(-1)
    with pytest.raises(ValueError):
        host_empty((3, -2), pin=False)


def test_memcpy_async_and_2d_cpu(seed):
    src = torch.randn(4, 6, generator=seed)
    dst = torch.full((4, 6), -7.0)
    memcpy_async(dst, src)
    assert torch.equal(dst, src)
    big = torch.full((5, 10), -1.0)
    memcpy_2d_async(big[:, 2:8], src[:, :6].repeat(2, 1)[:5])
    assert torch.equal(big[:, 2:8], src.repeat(2, 1)[:5])
    assert (big[:, :2] == -1).all() and (big[:, 8:] == -1).all()
    with pytest.raises(ValueError):
        memcpy_async(torch.empty(3), src)
    with pytest.raises(ValueError):
        memcpy_2d_async(torch.empty(6, 4).t(), src)


def test_stream_event_inert_on_cpu():
    s = Stream("cpu")
    with s:
        y = torch.ones(3) * 2
    e = s.record_event()
    assert e.query() and not s.is_cuda
    e.synchronize()
    s.wait_event(Event("cpu"))
    s.close()
    assert torch.equal(y, torch.full((3,), 2.0))


@pytest.mark.gpu
def test_pinned_allocator_caches_and_pins():
    torch.empty(1, device="cuda")  # torch answers is_pinned() only once it has a CUDA context of its own
    alloc = PinnedAllocator(max_cached_bytes=64 << 20)
    a = alloc.empty(10_000)
    assert a.is_pinned() and a.data_ptr() % 4096 == 0
    ptr = a.data_ptr()
    del a
    import gc

    gc.collect()
    assert alloc.cached_bytes == size_class(10_000)
    b = alloc.empty(9_000)  # same size class: the cached block comes back
    assert b.data_ptr() == ptr and alloc.cached_bytes == 0
    del b
    gc.collect()
    assert alloc.trim() == size_class(10_000)


@pytest.mark.gpu
def test_stream_event_memcpy_gpu(seed):
    src = torch.randn(1 << 20, generator=seed).cuda()
    host = host_empty((1 << 20,), torch.float32, pin=True)
    host.fill_(-1)
    s = Stream()
    s.wait_stream()
    with s:
        memcpy_async(host, src, s)
    ev = s.record_event()
    ev.synchronize()
    assert ev.query()
    assert torch.equal(host, src.cpu())
    back = torch.full_like(src, -3)
    memcpy_2d_async(back.view(1024, 1024)[:, :512], host.view(1024, 1024)[:, :512])
    torch.cuda.synchronize()
    assert torch.equal(back.view(1024, 1024)[:, :512], src.view(1024, 1024)[:, :512])
    assert (back.view(1024, 1024)[:, 512:] == -3).all()
    t0, t1 = Event(timing=True), Event(timing=True)
    t0.record()
    src.mul_(1.0)
    t1.record()
    t1.synchronize()
    assert t0.elapsed_ms(t1) >= 0
    s.close()
