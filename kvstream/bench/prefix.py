"""Prefix reuse: time to first token with a stored 90% prefix over full prefill, and the stores' throughput
against the raw disk and pinned memcpy of the same bytes, in the same run.

Model: the Llama-3-8B shape, bf16, ``--layers`` decoder layers (:func:`kvstream.bench.inputs.shared_model`); prompt:
``--prompt-tokens`` (8192) tokens of the shipped text. The first ``--stored-fraction`` (90%) of the
prompt is prefilled once and stored in a :class:`~kvstream.RadixStore` (pinned host memory) and a
:class:`~kvstream.ChunkFileStore` (``--chunk-tokens`` per file, on ``--disk-dir``; the file store keeps
whole chunks only, so it matches the largest multiple of the chunk size).

Rows (``<out>/prefix.csv``), host clock between synchronizations, every provider alike:

* ``prefix.ttft`` (x = prompt tokens, ms): ``full-prefill`` (``generate(max_new_tokens=1)`` from an empty
  cache), ``RadixStore`` / ``ChunkFileStore cold`` / ``ChunkFileStore warm`` (lookup + load onto the GPU
  with :func:`~kvstream.stores.reuse.load_prefix_into`, then ``generate`` of the rest; *cold* drops the
  chunk files from the page cache first); ``RadixStore layerwise``
  (``StreamingCache.from_prefix(..., layerwise=True)``: each layer's host-to-device copy overlaps the
  prefill of the layers before it, as in LMCache's layer-wise mode; measured when the installed
  ``from_prefix`` takes ``layerwise``); and the floor ``suffix-prefill (prefix on GPU)``: ``generate`` of the
  same suffix from a cache that already holds the prefix on the GPU (a device-to-device copy of it);
* ``prefix.store.write`` / ``prefix.store.read`` (x = chunk MiB): ``ChunkFileStore`` (buffered I/O) and
  ``ChunkFileStore(direct)`` (O_DIRECT, where the filesystem has it) update of the stored prefix from the
  GPU cache until durable (fsync of every file), and lookup + load of it onto the GPU from a cold page
  cache; time, GB/s and tokens/s; against ``raw-odirect`` (or ``raw-buffered``) writes
  and reads of as many files of the same size, 16 MiB blocks (:func:`kvstream.bench.ceilings.ceiling_disk`);
* ``prefix.radix.update`` / ``prefix.radix.load``: ``RadixStore`` update from the GPU and load to the GPU,
  against pinned ``memcpy`` of the same bytes.

Summary keys: ``prefix_ttft_speedup`` (full prefill over the radix store's TTFT, layer-wise where
available; target >= 5, LMCache claims 3-10x), ``file_store_read_vs_raw`` and ``file_store_write_vs_raw``
(the better configuration's GB/s over raw; Vineyard reached about 100% of its SSD). The TTFT of the file
store uses the configuration that read fastest. Whether the first token equals full prefill's is kept in
the detail (bf16 prefill in two pieces may round differently from one piece: a difference is reported, not hidden).
"""

from __future__ import annotations

import argparse
import inspect
import shutil
from typing import Sequence

import torch

from . import ceilings, harness, inputs, timing
from ..integrations.hf.keywords import cache_kwargs
from .harness import Run
from .records import MiB


def add_args(p: argparse.ArgumentParser) -> None:
    """The topic's own options."""
    p.add_argument("--prompt-tokens", type=int, default=8192, help="prompt length in tokens (default 8192)")
    p.add_argument("--stored-fraction", type=float, default=0.9, help="share of the prompt already stored (0.9)")
    p.add_argument("--chunk-tokens", type=int, default=256, help="tokens per file-store chunk (LMCache: 256)")
    p.add_argument("--reps", type=int, default=5, help="repetitions of each timed step")


def _generate_one(model, ids: torch.Tensor, cache) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(ids, **cache_kwargs(cache), max_new_tokens=1, do_sample=False,
                              attention_mask=torch.ones_like(ids), pad_token_id=0)


def _prefix_kv(model, ids: torch.Tensor):
    """Prefill ``ids`` once; the per-layer keys and values of its cache."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(ids, **cache_kwargs(cache), use_cache=True)
    return [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]


def _has_layerwise() -> bool:
    """Whether ``StreamingCache.from_prefix`` takes ``layerwise`` (the layer-wise prefix load is wired)."""
    from kvstream.integrations.hf import StreamingCache

    return "layerwise" in inspect.signature(StreamingCache.from_prefix).parameters


def _resident_cache(model, keys, values):
    """A fresh cache holding ``keys``/``values`` (already on the model's device): one device-to-device copy."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for i, (k, v) in enumerate(zip(keys, values)):
        cache.update(k, v, i)
    return cache


def main(argv: Sequence[str] | None = None) -> int:
    """Run the prefix topic; returns the exit code."""
    from transformers import DynamicCache

    from kvstream.chunk import HEADER_BYTES
    from kvstream.models import batch_of_prompts
    from kvstream.integrations.hf.prefix import load_prefix_into
    from kvstream.stores import ChunkFileStore, RadixStore

    run = Run.from_argv("prefix", argv, add_args, __doc__)
    a = run.args
    total, chunk, reps = (256, 16, 1) if run.quick else (a.prompt_tokens, a.chunk_tokens, a.reps)
    stored = int(total * a.stored_fraction)
    device = run.device
    model = inputs.shared_model(run)
    ids = batch_of_prompts(1, total, device=device)
    keys, values = _prefix_kv(model, ids[:, :stored])
    per_token = inputs.tensor_nbytes(keys + values) // stored
    timing.progress(f"prefix: {total}-token prompt, {stored} stored ({per_token / MiB:.3f} MiB of KV per token)")
    root = run.disk_dir()
    try:
        radix = RadixStore(capacity_bytes=2 * stored * per_token)

        # -- the stores' own throughput ----------------------------------------------------------------
        radix_bytes = stored * per_token
        ms = run.time_host(lambda: (RadixStore(capacity_bytes=2 * radix_bytes).update_kv(ids[0, :stored], keys, values)),
                           reps=reps)
        run.add_time_and_bandwidth("prefix.radix.update", "RadixStore(from-cuda)" if run.is_cuda else "RadixStore",
                                   stored, ms, radix_bytes)
        radix.update_kv(ids[0, :stored], keys, values)

        def radix_load() -> None:
            with radix.fetch_prefix(ids, device=device):
                pass

        ms = run.time_host(radix_load, reps=reps)
        run.add_time_and_bandwidth("prefix.radix.load", "RadixStore(to-cuda)" if run.is_cuda else "RadixStore",
                                   stored, ms, radix_bytes)
        if run.is_cuda:
            layer_bytes = radix_bytes // len(keys)
            ceilings.ceiling_memcpy(run, layer_bytes, len(keys), direction="d2h", bench="prefix.radix.update", x=stored)
            ceilings.ceiling_memcpy(run, layer_bytes, len(keys), direction="h2d", bench="prefix.radix.load", x=stored)

        n_files = stored // chunk
        file_tokens = n_files * chunk
        file_bytes = HEADER_BYTES + chunk * per_token
        store_bytes = n_files * file_bytes
        x = round(file_bytes / MiB, 3)
        configs = {"ChunkFileStore": {}}
        if ceilings.supports_direct_io(root):
            configs["ChunkFileStore(direct)"] = {"direct": True}
        figures: dict[str, dict] = {}
        for label, kw in configs.items():
            store = ChunkFileStore(root / label.replace("(", "-").replace(")", ""), chunk_tokens=chunk,
                                   namespace="bench-prefix", **kw)

            def write_all() -> None:
                store.update_kv(ids[0, :stored], keys, values, overwrite=True)
                ceilings.evict_tree(store.root)  # durable, as the raw writes (fsync), and out of the page cache

            def read_all() -> None:
                with store.fetch_prefix(ids, device=device) as m:
                    if m.matched_tokens != file_tokens:
                        raise RuntimeError(f"{label} matched {m.matched_tokens} tokens, expected {file_tokens}")

            w_ms = run.time_host(write_all, reps=reps, warmup=1)
            w = run.add_time_and_bandwidth("prefix.store.write", label, x, w_ms, store_bytes, time_unit="s")
            run.add("prefix.store.write", label, x, "throughput", "tokens/s", w_ms.rate(file_tokens * 1e3))
            r_ms = run.time_host(read_all, reps=reps, warmup=1, setup=lambda: ceilings.evict_tree(store.root))
            r = run.add_time_and_bandwidth("prefix.store.read", label, x, r_ms, store_bytes, time_unit="s")
            run.add("prefix.store.read", label, x, "throughput", "tokens/s", r_ms.rate(file_tokens * 1e3))
            with store.fetch_prefix(ids, device=device) as m:  # what is read back is what was written
                for i in range(len(keys)):
                    if not (torch.equal(m.keys[i], keys[i][:, :, :file_tokens])
                            and torch.equal(m.values[i], values[i][:, :, :file_tokens])):
                        raise RuntimeError(f"{label}: layer {i} read back differs from what was written")
            figures[label] = {"write_GBps": w.p50, "read_GBps": r.p50, "options": kw, "store": store,
                              "write_tokens_per_s": file_tokens / (w_ms.p50 / 1e3),
                              "read_tokens_per_s": file_tokens / (r_ms.p50 / 1e3)}
        best_w = max(figures, key=lambda k: figures[k]["write_GBps"])
        best_r = max(figures, key=lambda k: figures[k]["read_GBps"])
        files = figures[best_r]["store"]

        raw_dir = root / "raw"
        raw_dir.mkdir()
        raw_file_bytes = -(-file_bytes // ceilings.DIRECT_ALIGN_BYTES) * ceilings.DIRECT_ALIGN_BYTES
        raw_w, raw_r, raw_label = ceilings.ceiling_disk(run, raw_dir, raw_file_bytes, n_files, bench="prefix.store",
                                                        x=x, reps=reps)

        # -- time to first token -------------------------------------------------------------------------
        def full() -> torch.Tensor:
            return _generate_one(model, ids, DynamicCache(config=model.config))

        def reuse(store) -> torch.Tensor:
            cache = DynamicCache(config=model.config)
            load_prefix_into(cache, store, ids, device=device)
            return _generate_one(model, ids, cache)

        def reuse_layerwise(store) -> torch.Tensor:
            from kvstream import StreamingCache

            cache = StreamingCache.from_prefix(store, ids, config=model.config, device=device, layerwise=True)
            return _generate_one(model, ids, cache)

        ref = full()
        t_full = run.time_host(full, reps=reps)
        run.add("prefix.ttft", "full-prefill", total, "time", "ms", t_full)
        t_resident = run.time_host(lambda: _generate_one(model, ids, _resident_cache(model, keys, values)), reps=reps)
        run.add("prefix.ttft", "suffix-prefill (prefix on GPU)", total, "time", "ms", t_resident)
        t_radix = run.time_host(lambda: reuse(radix), reps=reps)
        run.add("prefix.ttft", "RadixStore", total, "time", "ms", t_radix)
        t_layerwise = None
        if _has_layerwise():
            t_layerwise = run.time_host(lambda: reuse_layerwise(radix), reps=reps)
            run.add("prefix.ttft", "RadixStore layerwise", total, "time", "ms", t_layerwise)
        else:
            timing.progress("prefix: StreamingCache.from_prefix takes no layerwise=; layer-wise TTFT not measured")
        t_best, best_radix = ((t_layerwise, "RadixStore layerwise") if t_layerwise is not None
                              else (t_radix, "RadixStore"))
        t_cold = run.time_host(lambda: reuse(files), reps=reps, setup=lambda: ceilings.evict_tree(files.root))
        run.add("prefix.ttft", f"{best_r} cold", total, "time", "ms", t_cold)
        t_warm = run.time_host(lambda: reuse(files), reps=reps)
        run.add("prefix.ttft", f"{best_r} warm", total, "time", "ms", t_warm)
        same = {"RadixStore": bool(torch.equal(reuse(radix), ref)), best_r: bool(torch.equal(reuse(files), ref)),
                "suffix-prefill (prefix on GPU)": bool(torch.equal(
                    _generate_one(model, ids, _resident_cache(model, keys, values)), ref))}
        if t_layerwise is not None:
            same["RadixStore layerwise"] = bool(torch.equal(reuse_layerwise(radix), ref))
            if radix.pinned() != 0:
                timing.progress(f"prefix: {radix.pinned()} RadixStore pins left after a layer-wise generate")

        detail = {"prompt_tokens": total, "stored_tokens": stored, "file_store_tokens": file_tokens,
                  "kv_bytes_per_token": per_token, "full_prefill_ms": t_full.p50, "radix_ttft_ms": t_radix.p50,
                  "radix_layerwise_ttft_ms": None if t_layerwise is None else t_layerwise.p50,
                  "radix_speedup": t_full.p50 / t_radix.p50,
                  "radix_layerwise_speedup": None if t_layerwise is None else t_full.p50 / t_layerwise.p50,
                  "suffix_prefill_prefix_on_gpu_ms": t_resident.p50, "radix_pins_left": radix.pinned(),
                  "speedup_ceiling": t_full.p50 / t_resident.p50,  # prefix already on the GPU: the most reuse gives
                  "file_cold_ttft_ms": t_cold.p50, "file_warm_ttft_ms": t_warm.p50,
                  "file_cold_speedup": t_full.p50 / t_cold.p50, "file_warm_speedup": t_full.p50 / t_warm.p50,
                  "first_token_identical": same, "layers": len(keys)}
        run.summary("prefix_ttft_speedup", value=t_full.p50 / t_best.p50, unit="x", ceiling=None,
                    ceiling_of=f"full prefill of the same {total}-token prompt, same run", target=">= 5",
                    target_of="value", provider=best_radix, detail=detail)
        fs = ceilings.fs_type(root)
        providers = {k: {f: v for f, v in d.items() if f != "store"} for k, d in figures.items()}
        disk_detail = {"filesystem": fs, "raw": raw_label, "chunk_tokens": chunk, "file_bytes": file_bytes,
                       "files": n_files, "raw_write_GBps": raw_w.p50, "raw_read_GBps": raw_r.p50,
                       "raw_write_tokens_per_s": file_tokens * raw_w.p50 * 1e9 / store_bytes,
                       "raw_read_tokens_per_s": file_tokens * raw_r.p50 * 1e9 / store_bytes, "providers": providers}
        run.summary("file_store_read_vs_raw", value=figures[best_r]["read_GBps"], unit="GB/s", ceiling=raw_r.p50,
                    ceiling_of=f"{raw_label} reads of as many files of the same size, 16 MiB blocks, same disk ({fs}), "
                               "same run; the store's reads land on the GPU", target=">= 0.90", target_of="ratio",
                    provider=best_r, detail=disk_detail)
        run.summary("file_store_write_vs_raw", value=figures[best_w]["write_GBps"], unit="GB/s", ceiling=raw_w.p50,
                    ceiling_of=f"{raw_label} writes (fsync) of as many files of the same size, same disk ({fs}), "
                               "same run; the store's writes start from the GPU", target=">= 0.90", target_of="ratio",
                    provider=best_w, detail=disk_detail)
        radix.close()
        for d in figures.values():
            d["store"].close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return run.finish()


if __name__ == "__main__":
    harness.module_main(main)
