"""Benchmark the SSM-state copy paths.

    python -m sglang_marconi.kernels.bench_state_copy            # GPU (CUDA) mode
    python -m sglang_marconi.kernels.bench_state_copy --cpu-ref  # CPU mode

GPU mode times, on one Mamba pool with SGLang's layout:
  * triton   -- the single-launch Triton kernel (pre-validated plan) and the
                full ``copy_states`` call (validation incl. one D2H sync),
  * sglang   -- SGLang's unfused ``MambaPool.copy_from`` path: one
                ``t[:, dst] = t[:, src]`` per conv tensor plus one for temporal,
  * sglang-fused -- SGLang's fused conv kernel + indexed temporal copy, when
                importable and the conv dtype is bf16 (what ``copy_from`` runs
                by default on CUDA),
  * d2d      -- one contiguous device-to-device copy of the same number of bytes
                (the bandwidth ceiling),
and prints GB/s (payload bytes copied / time) and ratios.

Without a GPU it prints one line saying so and exits 0. ``--cpu-ref`` instead
times, on CPU, the torch reference (the CPU path of ``copy_states``) against
SGLang-style per-tensor index copies and a flat memcpy of the same bytes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable, List, Tuple

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-ref", action="store_true",
                   help="time the CPU path (torch reference) vs SGLang-style per-tensor copies on CPU")
    p.add_argument("--layers", type=int, default=None, help="Mamba layers")
    p.add_argument("--pairs", type=int, default=None, help="(src, dst) slot pairs per call")
    p.add_argument("--conv-dim", type=int, default=None)
    p.add_argument("--conv-width", type=int, default=3, help="conv_kernel - 1")
    p.add_argument("--num-conv", type=int, default=1, help="number of conv tensors")
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--state", type=int, default=None)
    p.add_argument("--conv-dtype", choices=sorted(_DTYPES), default="bf16")
    p.add_argument("--temporal-dtype", choices=sorted(_DTYPES), default="fp32")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=3)
    return p.parse_args(argv)


def _defaults(a: argparse.Namespace, gpu: bool) -> None:
    # GPU: roughly a 4B-8B Mamba2 hybrid at TP1 (~2 MiB temporal state per slot-layer).
    # CPU: scaled down so a run takes seconds.
    d = dict(layers=24, pairs=16, conv_dim=6144, heads=64, state=128, iters=50) if gpu else \
        dict(layers=8, pairs=8, conv_dim=1024, heads=16, state=64, iters=20)
    for k, v in d.items():
        if getattr(a, k) is None:
            setattr(a, k, v)


def _make_pool(a, device) -> Tuple[List[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    slots = 2 * a.pairs + 2  # room for disjoint src and dst slots
    g = torch.Generator(device="cpu").manual_seed(0)
    conv = [
        torch.randn((a.layers, slots, a.conv_dim, a.conv_width), generator=g)
        .to(_DTYPES[a.conv_dtype]).to(device)
        for _ in range(a.num_conv)
    ]
    temporal = (
        torch.randn((a.layers, slots, a.heads, a.head_dim, a.state), generator=g)
        .to(_DTYPES[a.temporal_dtype]).to(device)
    )
    perm = torch.randperm(slots, generator=g)
    src = perm[: a.pairs].to(device)
    dst = perm[a.pairs: 2 * a.pairs].to(device)
    return conv, temporal, src, dst


def _payload_bytes(conv, temporal, n_pairs: int) -> int:
    per_slot = sum(t[:, 0].numel() * t.element_size() for t in (*conv, temporal))
    return per_slot * n_pairs


def _sglang_per_tensor(conv, temporal, src, dst) -> None:
    # MambaPool.copy_from, unfused branch (sglang 0.5.23 memory_pool.py)
    for c in conv:
        c[:, dst] = c[:, src]
    temporal[:, dst] = temporal[:, src]


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    iview = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.view(iview), b.view(iview))


def _same(xs, ys) -> bool:
    return all(_bits_equal(x, y) for x, y in zip(xs, ys))


def _fmt(name: str, sec: float, nbytes: int) -> str:
    return f"  {name:<38s} {sec * 1e6:10.1f} us   {nbytes / sec / 1e9:8.2f} GB/s"


def _time_cpu_interleaved(fns: List[Callable[[], None]], iters: int, warmup: int) -> List[float]:
    """Median wall time of each fn; the candidates alternate every round so
    cache / frequency drift hits them equally."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    ts: List[List[float]] = [[] for _ in fns]
    for _ in range(iters):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in ts]


def _time_cuda(fn: Callable[[], None], iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        ts.append(start.elapsed_time(end) / 1e3)
    return statistics.median(ts)


def run_cpu(a: argparse.Namespace) -> int:
    from . import copy_states, copy_states_ref

    _defaults(a, gpu=False)
    conv, temporal, src, dst = _make_pool(a, "cpu")
    nbytes = _payload_bytes(conv, temporal, a.pairs)

    # correctness first: reference == SGLang-style on a copy of the pool
    c1, t1 = [c.clone() for c in conv], temporal.clone()
    c2, t2 = [c.clone() for c in conv], temporal.clone()
    copy_states_ref(c1, t1, src, dst)
    _sglang_per_tensor(c2, t2, src, dst)
    if not (_same(c1, c2) and _bits_equal(t1, t2)):
        print("ERROR: reference and SGLang-style copies disagree", file=sys.stderr)
        return 1
    del c1, t1, c2, t2

    flat_src = torch.empty(nbytes, dtype=torch.uint8)
    flat_dst = torch.empty_like(flat_src)
    t_ref, t_disp, t_sgl, t_cpy = _time_cpu_interleaved(
        [
            lambda: copy_states_ref(conv, temporal, src, dst),
            lambda: copy_states(conv, temporal, src, dst),
            lambda: _sglang_per_tensor(conv, temporal, src, dst),
            lambda: flat_dst.copy_(flat_src),
        ],
        a.iters,
        a.warmup,
    )

    print(
        f"CPU measurement ({torch.get_num_threads()} torch threads): layers={a.layers} pairs={a.pairs} "
        f"conv={a.num_conv}x[{a.conv_dim},{a.conv_width}] {a.conv_dtype} "
        f"temporal=[{a.heads},{a.head_dim},{a.state}] {a.temporal_dtype}  "
        f"payload={nbytes / 2**20:.2f} MiB per call, median of {a.iters}"
    )
    print(_fmt("CPU ref (index_select/copy_)", t_ref, nbytes))
    print(_fmt("CPU copy_states (validate+ref)", t_disp, nbytes))
    print(_fmt("CPU SGLang per-tensor t[:,d]=t[:,s]", t_sgl, nbytes))
    print(_fmt("CPU flat memcpy same bytes", t_cpy, nbytes))
    print(
        f"  CPU ratios: ref/SGLang speed = {t_sgl / t_ref:.2f}x, "
        f"copy_states/SGLang = {t_sgl / t_disp:.2f}x, ref/memcpy = {t_cpy / t_ref:.2f}x"
    )
    return 0


def run_gpu(a: argparse.Namespace) -> int:
    from . import copy_states, validate_copy_args
    from .state_copy_triton import _run_plan

    _defaults(a, gpu=True)
    dev = torch.device("cuda")
    conv, temporal, src, dst = _make_pool(a, dev)
    nbytes = _payload_bytes(conv, temporal, a.pairs)

    # correctness first
    c1, t1 = [c.clone() for c in conv], temporal.clone()
    c2, t2 = [c.clone() for c in conv], temporal.clone()
    launches = _run_plan(validate_copy_args(c1, t1, src, dst))
    _sglang_per_tensor(c2, t2, src, dst)
    torch.cuda.synchronize()
    if not (_same(c1, c2) and _bits_equal(t1, t2)):
        print("ERROR: Triton kernel and SGLang-style copies disagree", file=sys.stderr)
        return 1
    del c1, t1, c2, t2

    plan = validate_copy_args(conv, temporal, src, dst)
    flat_src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    flat_dst = torch.empty_like(flat_src)
    t_tri = _time_cuda(lambda: _run_plan(plan), a.iters, a.warmup)
    t_disp = _time_cuda(lambda: copy_states(conv, temporal, src, dst), a.iters, a.warmup)
    t_sgl = _time_cuda(lambda: _sglang_per_tensor(conv, temporal, src, dst), a.iters, a.warmup)
    t_d2d = _time_cuda(lambda: flat_dst.copy_(flat_src), a.iters, a.warmup)

    t_fused = None
    if all(c.dtype == torch.bfloat16 for c in conv):
        try:
            from sglang.srt.mem_cache.mamba_slot_fused import (
                build_conv_slot_descriptor,
                fused_copy_conv_slots,
            )

            desc = build_conv_slot_descriptor(conv)

            def _fused():
                fused_copy_conv_slots(desc, src, dst)
                temporal[:, dst] = temporal[:, src]

            t_fused = _time_cuda(_fused, a.iters, a.warmup)
        except Exception as e:  # sglang/sgl_kernel not importable here
            print(f"  (SGLang fused path not timed: {type(e).__name__}: {e})")

    print(
        f"GPU {torch.cuda.get_device_name(dev)}: layers={a.layers} pairs={a.pairs} "
        f"conv={a.num_conv}x[{a.conv_dim},{a.conv_width}] {a.conv_dtype} "
        f"temporal=[{a.heads},{a.head_dim},{a.state}] {a.temporal_dtype}  "
        f"payload={nbytes / 2**20:.2f} MiB per call, {launches} Triton launch(es), median of {a.iters}"
    )
    print(_fmt("triton kernel (validated plan)", t_tri, nbytes))
    print(_fmt("triton copy_states (+validate)", t_disp, nbytes))
    print(_fmt("SGLang per-tensor index copy", t_sgl, nbytes))
    if t_fused is not None:
        print(_fmt("SGLang fused conv + temporal", t_fused, nbytes))
    print(_fmt("device-to-device copy", t_d2d, nbytes))
    msg = (
        f"  ratios: triton/SGLang-per-tensor = {t_sgl / t_tri:.2f}x, "
        f"triton/d2d = {t_d2d / t_tri:.2f} of ceiling, "
        f"copy_states/SGLang-per-tensor = {t_sgl / t_disp:.2f}x"
    )
    if t_fused is not None:
        msg += f", triton/SGLang-fused = {t_fused / t_tri:.2f}x"
    print(msg)
    return 0


def main(argv=None) -> int:
    a = _parse(argv)
    if a.cpu_ref:
        return run_cpu(a)
    if not torch.cuda.is_available():
        print(
            "No GPU available (torch.cuda.is_available() is False): GPU numbers are "
            "unmeasured; run with --cpu-ref for a CPU measurement."
        )
        return 0
    return run_gpu(a)


if __name__ == "__main__":
    sys.exit(main())
