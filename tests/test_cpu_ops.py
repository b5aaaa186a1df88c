"""CPU ops of the Mamba2 path (sglang_marconi.kernels.cpu_ops).

Each op is compared with its float64 ``*_ref`` twin on random inputs of awkward
shapes (odd lengths, batch 1 and 3, varlen packing as SGLang passes it,
initial states present/absent, chunk boundaries not aligned), and - where the
Triton interpreter can run it in reasonable time - with SGLang 0.5.23's own
Triton kernel on tiny shapes (TRITON_INTERPRET=1, set before triton is
imported). Running SGLang's Triton code on CPU needs three test-only patches,
applied with ``monkeypatch`` in the ``sglang_triton`` fixture: ``torch.cpu``
has no ``device()`` context manager, Triton's autotuner cannot benchmark
without a GPU driver (every config is scored equal, so the first is used), and
``rms_norm_gated`` asks CUDA for an SM count.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from sglang_marconi.kernels import cpu_ops as K  # noqa: E402

TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
    torch.float64: dict(atol=1e-10, rtol=1e-10),
}


def close(a, b, dtype=torch.float32, scale=1.0):
    tol = TOL[dtype]
    torch.testing.assert_close(
        a.double(), b.double(), atol=tol["atol"] * scale, rtol=tol["rtol"] * scale
    )


def cu_of(lens):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32)


# --------------------------------------------------------------------------- SGLang Triton (interpreted)


def _triton_interpreting() -> bool:
    try:
        import triton
        import triton.language as tl
    except Exception:
        return False

    @triton.jit
    def _probe(p):
        tl.store(p, tl.load(p) + 1)

    try:
        t = torch.zeros(1)
        _probe[(1,)](t)
        return float(t[0]) == 1.0
    except Exception:
        return False


@pytest.fixture(scope="module")
def triton_ok():
    if not _triton_interpreting():
        pytest.skip("Triton interpreter unavailable (TRITON_INTERPRET=1 must be set before triton is imported)")


_SGLANG_TRITON = {
    "conv": ("sglang.kernels.ops.mamba.causal_conv1d_triton", None),
    "ssu": ("sglang.kernels.ops.mamba.triton_ops.mamba_ssm", "selective_state_update"),
    "scan": ("sglang.kernels.ops.mamba.triton_ops.ssd_combined", "mamba_chunk_scan_combined"),
}


_SUBPROCESS_ENV = "SGLANG_MARCONI_CPU_OPS_TRITON_SUBPROCESS"


def _uninterpreted_kernels(prefixes) -> list:
    """Triton kernels in already-imported modules that were built without the interpreter.

    ``@triton.jit`` reads TRITON_INTERPRET when a module is imported; in a full
    test run another test module may import triton / SGLang's kernels before
    this one sets it. Those kernels cannot run on a CPU.
    """
    import sys

    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    bad = []
    for name, mod in list(sys.modules.items()):
        if mod is None or not name.startswith(tuple(prefixes)):
            continue
        for attr, obj in list(vars(mod).items()):
            while hasattr(obj, "fn") and not isinstance(obj, (JITFunction, InterpretedFunction)):
                obj = obj.fn  # Autotuner / Heuristics wrappers
            if isinstance(obj, JITFunction) and not isinstance(obj, InterpretedFunction):
                bad.append(f"{name}.{attr}")
    return bad


def _require_interpreted(prefixes):
    # triton.language's own @jit helpers (tl.zeros, tl.cumsum, ...) count too
    bad = _uninterpreted_kernels(["triton.language", *prefixes])
    if bad:
        pytest.skip(
            f"SGLang's Triton kernels were imported before TRITON_INTERPRET=1 in this process "
            f"({bad[0]}, ...); test_sglang_triton_comparisons_in_fresh_process runs them"
        )


@pytest.fixture
def sglang_triton(triton_ok, monkeypatch):
    """``sglang_triton(name)``: SGLang's Triton op, with the CPU test patches applied."""
    import importlib

    import triton.runtime.autotuner as at

    if not hasattr(torch.cpu, "device"):
        monkeypatch.setattr(torch.cpu, "device", lambda idx=None: contextlib.nullcontext(), raising=False)
    monkeypatch.setattr(at.Autotuner, "_bench", lambda self, *a, config=None, **k: [0.0, 0.0, 0.0])

    def load(name):
        mod_name, attr = _SGLANG_TRITON[name]
        try:
            mod = importlib.import_module(mod_name)
        except Exception as e:  # e.g. einops missing in the cache-only venv
            pytest.skip(f"SGLang's {mod_name} cannot be imported here: {type(e).__name__}: {e}")
        _require_interpreted(["sglang.kernels.ops.mamba", "sglang.kernels.jit"])
        return getattr(mod, attr) if attr else mod

    return load


# --------------------------------------------------------------------------- causal conv1d: prefill


def _conv_case(seed, lens, dim, width, dtype, init_mode, n_slots=9, pad_one=False, bias=True):
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    x = torch.randn(dim, T, generator=g).to(dtype)
    w = (torch.randn(dim, width, generator=g) * 0.5).to(dtype)
    b = torch.randn(dim, generator=g).to(dtype) if bias else None
    states = torch.randn(n_slots, dim, width - 1, generator=g).to(dtype)
    slots = torch.randperm(n_slots, generator=g)[: len(lens)].to(torch.int32)
    if pad_one:
        slots[len(lens) // 2] = K.PAD_SLOT_ID
    if init_mode == "none":
        hi = None
    elif init_mode == "all":
        hi = torch.ones(len(lens), dtype=torch.bool)
    else:
        hi = torch.tensor([i % 2 == 0 for i in range(len(lens))])
    return x, w, b, states, cu_of(lens), slots, hi


CONV_CASES = [
    # (lens, dim, width, init)
    ([1], 5, 4, "none"),
    ([13], 7, 4, "all"),
    ([2], 3, 4, "all"),  # shorter than the window, with history
    ([2, 1, 9], 6, 4, "mixed"),
    ([5, 17, 3], 11, 3, "mixed"),
    ([1, 1, 1], 4, 2, "all"),
    ([31, 2, 8], 9, 4, "none"),
]


@pytest.mark.parametrize("lens,dim,width,init", CONV_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["silu", None])
def test_causal_conv1d_fn_matches_ref(lens, dim, width, init, dtype, activation):
    x, w, b, states, cu, slots, hi = _conv_case(hash((tuple(lens), dim, width)) % 1000, lens, dim, width, dtype, init)
    st = states.clone()
    out = K.causal_conv1d_fn(
        x, w, b, conv_states=st, query_start_loc=cu, cache_indices=slots,
        has_initial_state=hi, activation=activation,
    )
    ref_out, ref_st = K.causal_conv1d_fn_ref(x, w, b, states, cu, slots, hi, activation)
    assert out.shape == x.shape and out.dtype == x.dtype
    close(out, ref_out, dtype)
    close(st, ref_st, dtype, scale=0.0 if dtype == torch.float32 else 1.0)  # states are copies
    untouched = [s for s in range(states.shape[0]) if s not in slots.tolist()]
    assert torch.equal(st[untouched], states[untouched])


def test_causal_conv1d_fn_pad_slot_and_no_bias():
    x, w, _, states, cu, slots, hi = _conv_case(3, [4, 6, 2], 5, 4, torch.float32, "all", pad_one=True, bias=False)
    st = states.clone()
    out = K.causal_conv1d_fn(x, w, None, conv_states=st, query_start_loc=cu, cache_indices=slots,
                             has_initial_state=hi, activation="silu")
    ref_out, ref_st = K.causal_conv1d_fn_ref(x, w, None, states, cu, slots, hi, "silu")
    close(out, ref_out)
    close(st, ref_st)
    assert torch.equal(out[:, 4:10], torch.zeros(5, 6))  # the padded sequence
    assert torch.equal(st, states.index_copy(0, slots[[0, 2]].long(), ref_st[slots[[0, 2]].long()].float()))


def test_causal_conv1d_fn_without_cache_and_weight_3d():
    x, w, b, _, cu, _, _ = _conv_case(4, [7, 3], 6, 4, torch.float32, "none")
    out = K.causal_conv1d_fn(x, w.unsqueeze(1), b, query_start_loc=cu, activation="silu")
    ref_out, _ = K.causal_conv1d_fn_ref(x, w, b, None, cu, None, None, "silu")
    close(out, ref_out)


def test_causal_conv1d_fn_split_equals_whole():
    """Prefill in two chunks (the second with initial state) == one prefill."""
    x, w, b, states, _, _, _ = _conv_case(5, [23], 7, 4, torch.float32, "none")
    slot = torch.tensor([2], dtype=torch.int32)
    whole_st = states.clone()
    whole = K.causal_conv1d_fn(x, w, b, conv_states=whole_st, query_start_loc=cu_of([23]),
                               cache_indices=slot, has_initial_state=torch.tensor([False]))
    st = states.clone()
    a = K.causal_conv1d_fn(x[:, :10], w, b, conv_states=st, query_start_loc=cu_of([10]),
                           cache_indices=slot, has_initial_state=torch.tensor([False]))
    c = K.causal_conv1d_fn(x[:, 10:], w, b, conv_states=st, query_start_loc=cu_of([13]),
                           cache_indices=slot, has_initial_state=torch.tensor([True]))
    close(torch.cat([a, c], 1), whole)
    close(st, whole_st)


@pytest.mark.parametrize("lens,dim,width,init", [c for c in CONV_CASES if c[2] >= 2])
def test_causal_conv1d_fn_matches_sglang_triton(sglang_triton, lens, dim, width, init):
    x, w, b, states, cu, slots, hi = _conv_case(7, lens, dim, width, torch.float32, init)
    st_t, st_c = states.clone(), states.clone()
    out_t = sglang_triton("conv").causal_conv1d_fn(
        x, w, b, conv_states=st_t, query_start_loc=cu, seq_lens_cpu=lens,
        cache_indices=slots, has_initial_state=hi, activation="silu",
    )
    out_c = K.causal_conv1d_fn(x, w, b, conv_states=st_c, query_start_loc=cu, cache_indices=slots,
                               has_initial_state=hi, activation="silu")
    close(out_c, out_t)
    close(st_c, st_t)


# --------------------------------------------------------------------------- causal conv1d: decode


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("seqlen", [None, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["silu", None])
def test_causal_conv1d_update_matches_ref(batch, seqlen, dtype, activation):
    g = torch.Generator().manual_seed(batch * 10 + (seqlen or 0))
    dim, width = 7, 4
    x = torch.randn(batch, dim, *([] if seqlen is None else [seqlen]), generator=g).to(dtype)
    w = torch.randn(dim, width, generator=g).to(dtype)
    b = torch.randn(dim, generator=g).to(dtype)
    states = torch.randn(6, dim, width - 1, generator=g).to(dtype)
    idx = torch.tensor([4, 0, 2][:batch], dtype=torch.int32)
    st = states.clone()
    out = K.causal_conv1d_update(x, st, w, b, activation, conv_state_indices=idx)
    ref_out, ref_st = K.causal_conv1d_update_ref(x, states, w, b, activation, idx)
    assert out.shape == x.shape and out.dtype == x.dtype
    close(out, ref_out, dtype)
    close(st, ref_st, dtype)


def test_causal_conv1d_update_pad_slot_untouched():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, generator=g)
    w = torch.randn(5, 3, generator=g)
    states = torch.randn(4, 5, 2, generator=g)
    idx = torch.tensor([1, K.PAD_SLOT_ID, 3])
    st = states.clone()
    out = K.causal_conv1d_update(x, st, w, None, "silu", conv_state_indices=idx)
    ref_out, ref_st = K.causal_conv1d_update_ref(x, states, w, None, "silu", idx)
    close(out, ref_out)
    close(st, ref_st)
    assert torch.equal(st[[0, 2]], states[[0, 2]])
    assert torch.equal(out[1], torch.zeros(5))


def test_causal_conv1d_update_continues_prefill():
    """Prefill of L tokens then one decode step == prefill of L + 1 tokens."""
    g = torch.Generator().manual_seed(2)
    dim, width, L = 6, 4, 9
    x = torch.randn(dim, L + 1, generator=g)
    w = torch.randn(dim, width, generator=g)
    b = torch.randn(dim, generator=g)
    st = torch.zeros(2, dim, width - 1)
    K.causal_conv1d_fn(x[:, :L], w, b, conv_states=st, query_start_loc=cu_of([L]),
                       cache_indices=torch.tensor([1]), activation="silu")
    step = K.causal_conv1d_update(x[:, L][None], st, w, b, "silu", conv_state_indices=torch.tensor([1]))
    whole = K.causal_conv1d_fn(x, w, b, query_start_loc=cu_of([L + 1]), activation="silu")
    close(step[0], whole[:, L])


def test_causal_conv1d_update_rejects_speculative_args():
    with pytest.raises(NotImplementedError, match="intermediate_conv_window"):
        K.causal_conv1d_update(torch.zeros(1, 2), torch.zeros(1, 2, 3), torch.zeros(2, 4),
                               intermediate_conv_window=torch.zeros(1))


@pytest.mark.parametrize("batch,seqlen", [(1, None), (3, None), (3, 2)])
def test_causal_conv1d_update_matches_sglang_triton(sglang_triton, batch, seqlen):
    g = torch.Generator().manual_seed(batch)
    dim, width = 12, 4
    x = torch.randn(batch, dim, *([] if seqlen is None else [seqlen]), generator=g)
    w = torch.randn(dim, width, generator=g)
    b = torch.randn(dim, generator=g)
    states = torch.randn(6, dim, width - 1, generator=g)
    idx = torch.tensor([5, 0, 3][:batch], dtype=torch.int32)
    st_t, st_c = states.clone(), states.clone()
    out_t = sglang_triton("conv").causal_conv1d_update(x, st_t, w, b, "silu", conv_state_indices=idx)
    out_c = K.causal_conv1d_update(x, st_c, w, b, "silu", conv_state_indices=idx)
    close(out_c, out_t)
    close(st_c, st_t)


# --------------------------------------------------------------------------- conv state mid-sequence


def test_causal_conv1d_states_at_matches_prefix_runs():
    x, w, b, states, cu, slots, hi = _conv_case(11, [9, 2, 14], 5, 4, torch.float32, "mixed")
    offsets = [0, 1, 2, 9, 13, 14]
    seq_ids = [0, 1, 1, 0, 2, 2]
    got = K.causal_conv1d_states_at(x, 4, cu, offsets, conv_states=states, cache_indices=slots,
                                    has_initial_state=hi, seq_ids=seq_ids)
    for k, (i, off) in enumerate(zip(seq_ids, offsets)):
        st = states.clone()
        s = int(cu[i])
        if off:
            K.causal_conv1d_fn(x[:, s:s + off], w, b, conv_states=st, query_start_loc=cu_of([off]),
                               cache_indices=slots[i:i + 1], has_initial_state=hi[i:i + 1])
            expect = st[int(slots[i])]
        else:
            expect = states[int(slots[i])] if bool(hi[i]) else torch.zeros(5, 3)
        close(got[k], expect)
    ref = K.causal_conv1d_states_at_ref(x, 4, cu, offsets, states, slots, hi, seq_ids)
    close(got, ref)


# --------------------------------------------------------------------------- chunked scan


def _scan_case(seed, lens, H, P, N, G, dtype=torch.float32, init=True, D_shape="h", z=False):
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    x = torch.randn(1, T, H, P, generator=g).to(dtype)
    dt = (torch.randn(1, T, H, generator=g) * 0.7).to(dtype)
    A = -(torch.rand(H, generator=g) * 1.5 + 0.1)
    B = torch.randn(1, T, G, N, generator=g).to(dtype)
    C = torch.randn(1, T, G, N, generator=g).to(dtype)
    D = torch.randn(H, generator=g) if D_shape == "h" else (torch.randn(H, P, generator=g) if D_shape == "hp" else None)
    dt_bias = torch.randn(H, generator=g) * 0.3
    zz = torch.randn(1, T, H, P, generator=g).to(dtype) if z else None
    h0 = None
    if init:
        has = torch.tensor([i % 2 == 1 for i in range(len(lens))])
        h0 = torch.where(has[:, None, None, None], torch.randn(len(lens), H, P, N, generator=g), 0.0)
    return dict(x=x, dt=dt, A=A, B=B, C=C, D=D, z=zz, dt_bias=dt_bias, initial_states=h0, cu=cu_of(lens))


SCAN_CASES = [
    # (lens, chunk, H, P, N, G, init, D, z, softplus, limit)
    ([1], 8, 2, 3, 4, 1, False, "h", False, True, (0.0, math.inf)),
    ([37], 8, 4, 3, 5, 2, True, "h", False, True, (0.0, math.inf)),
    ([16], 16, 2, 4, 4, 2, True, "hp", True, True, (0.0, math.inf)),
    ([5, 1, 19], 8, 4, 3, 4, 4, True, "h", False, True, (0.0, math.inf)),
    ([13, 29, 3], 16, 6, 5, 3, 3, False, None, True, False, (0.0, math.inf)),
    ([7, 8, 9], 4, 2, 2, 6, 1, True, "hp", False, True, (0.05, 0.9)),
]


@pytest.mark.parametrize("lens,chunk,H,P,N,G,init,D,z,softplus,limit", SCAN_CASES)
def test_scan_matches_ref(lens, chunk, H, P, N, G, init, D, z, softplus, limit):
    c = _scan_case(len(lens) * 100 + chunk, lens, H, P, N, G, init=init, D_shape=D, z=z)
    res = K.ssd_scan(c["x"], c["dt"], c["A"], c["B"], c["C"], chunk, D=c["D"], z=c["z"],
                     dt_bias=c["dt_bias"], initial_states=c["initial_states"], cu_seqlens=c["cu"],
                     dt_softplus=softplus, dt_limit=limit, want_chunk_states=True,
                     state_dtype=torch.float32)
    out, final, hist = K.ssd_scan_ref(c["x"], c["dt"], c["A"], c["B"], c["C"], c["cu"], D=c["D"], z=c["z"],
                                      dt_bias=c["dt_bias"], initial_states=c["initial_states"],
                                      dt_softplus=softplus, dt_limit=limit)
    close(res.out, out, scale=20)
    close(res.varlen_states, final, scale=20)
    # chunk states on the packed stream: [0] = sequence 0's initial state,
    # [c] = state after packed token c*chunk - 1, of the sequence holding it
    cu = c["cu"].tolist()
    for ci in range(res.chunk_states.shape[1]):
        if ci == 0:
            expect = hist[0][0]
        else:
            t = ci * chunk - 1
            s = max(i for i in range(len(lens)) if cu[i] <= t < cu[i + 1])
            expect = hist[s][t - cu[s] + 1]
        close(res.chunk_states[0, ci], expect, scale=20)


@pytest.mark.parametrize("ngroups", [1, 2])
def test_scan_bf16_inputs(ngroups):
    c = _scan_case(9, [11, 20], 4, 8, 8, ngroups, dtype=torch.bfloat16)
    out = torch.empty_like(c["x"])
    _, varlen, _ = K.mamba_chunk_scan_combined(
        c["x"], c["dt"], c["A"], c["B"], c["C"], chunk_size=8, D=c["D"], dt_bias=c["dt_bias"],
        initial_states=c["initial_states"], cu_seqlens=c["cu"], return_varlen_states=True,
        return_track_states=True, dt_softplus=True, out=out, state_dtype=torch.float32,
    )
    ref_out, ref_final, _ = K.ssd_scan_ref(c["x"], c["dt"], c["A"], c["B"], c["C"], c["cu"], D=c["D"],
                                           dt_bias=c["dt_bias"], initial_states=c["initial_states"],
                                           dt_softplus=True)
    assert out.dtype == torch.bfloat16 and varlen.dtype == torch.float32
    close(out, ref_out, torch.bfloat16)
    close(varlen, ref_final, torch.bfloat16)


def test_scan_batch_rows_without_cu_seqlens():
    g = torch.Generator().manual_seed(3)
    b, T, H, P, N = 3, 13, 2, 3, 4
    x, dt = torch.randn(b, T, H, P, generator=g), torch.randn(b, T, H, generator=g)
    A, B, C = -torch.rand(H, generator=g) - 0.1, torch.randn(b, T, 1, N, generator=g), torch.randn(b, T, 1, N, generator=g)
    h0 = torch.randn(b, H, P, N, generator=g)
    out = torch.empty_like(x)
    final = K.mamba_chunk_scan_combined(x, dt, A, B, C, 4, initial_states=h0, dt_softplus=True,
                                        out=out, return_final_states=True)
    ref_out, ref_final, _ = K.ssd_scan_ref(x, dt, A, B, C, None, initial_states=h0, dt_softplus=True)
    close(out, ref_out, scale=20)
    close(final, ref_final, scale=20)


def test_scan_track_states_are_prefix_states():
    """SGLang's track_seq_idx / track_end_locs (absolute packed end positions)."""
    lens = [10, 3, 21]
    c = _scan_case(21, lens, 4, 3, 4, 2)
    cu = c["cu"]
    track_seq = torch.tensor([0, 2, 2, 1])
    track_end = torch.tensor([int(cu[0]) + 7, int(cu[2]) + 8, int(cu[2]) + 21, int(cu[1]) + 3])
    out = torch.empty_like(c["x"])
    states, varlen, track = K.mamba_chunk_scan_combined(
        c["x"], c["dt"], c["A"], c["B"], c["C"], chunk_size=8, D=c["D"], dt_bias=c["dt_bias"],
        initial_states=c["initial_states"], cu_seqlens=cu, return_varlen_states=True,
        return_track_states=True, track_seq_idx=track_seq, track_end_locs=track_end,
        dt_softplus=True, out=out, state_dtype=torch.float32,
    )
    _, _, hist = K.ssd_scan_ref(c["x"], c["dt"], c["A"], c["B"], c["C"], cu, D=c["D"], dt_bias=c["dt_bias"],
                                initial_states=c["initial_states"], dt_softplus=True)
    assert track.shape == (1, 4, 4, 3, 4)
    for k in range(4):
        s = int(track_seq[k])
        close(track[0, k], hist[s][int(track_end[k]) - int(cu[s])], scale=20)


@pytest.mark.parametrize("lens,chunk", [([1], 4), ([17], 8), ([9, 1, 30], 8), ([16, 16], 16)])
def test_snapshots_equal_scan_of_prefix(lens, chunk):
    """State after token k (mid-prefill) == final state of the scan run on [0, k) alone."""
    c = _scan_case(31 + len(lens), lens, 4, 3, 5, 2, init=True)
    cu = c["cu"].tolist()
    seqs, offs = [], []
    for i, L in enumerate(lens):
        for k in sorted({0, 1, L // 2, max(L - 1, 0), L}):
            seqs.append(i)
            offs.append(k)
    out, final, snaps = K.mamba_chunk_scan_with_snapshots(
        c["x"], c["dt"], c["A"], c["B"], c["C"], c["cu"], offs, chunk_size=chunk, D=c["D"],
        dt_bias=c["dt_bias"], initial_states=c["initial_states"], dt_softplus=True, snapshot_seq=seqs,
        state_dtype=torch.float32,
    )
    for k, (i, off) in enumerate(zip(seqs, offs)):
        h0 = c["initial_states"][i : i + 1]
        if off == 0:
            expect = h0[0]
        else:
            s = cu[i]
            sl = slice(s, s + off)
            _, fin, _ = K.mamba_chunk_scan_with_snapshots(
                c["x"][:, sl], c["dt"][:, sl], c["A"], c["B"][:, sl], c["C"][:, sl], cu_of([off]), [off],
                chunk_size=chunk, dt_bias=c["dt_bias"], initial_states=h0, dt_softplus=True,
                state_dtype=torch.float32,
            )
            expect = fin[0]
        close(snaps[k], expect, scale=20)
    for i, L in enumerate(lens):  # offset L is the final state
        k = [j for j, (s, o) in enumerate(zip(seqs, offs)) if s == i and o == L][0]
        close(snaps[k], final[i], scale=5)


def test_scan_prefill_then_decode_consistent():
    """Scan of L tokens + one selective_state_update == scan of L + 1 tokens (last output)."""
    L, H, P, N, G = 12, 4, 3, 4, 2
    c = _scan_case(41, [L + 1], H, P, N, G, init=False)
    out_full = torch.empty_like(c["x"])
    K.ssd_scan(c["x"], c["dt"], c["A"], c["B"], c["C"], 8, D=c["D"], dt_bias=c["dt_bias"],
               cu_seqlens=c["cu"], dt_softplus=True, out=out_full)
    pre = K.ssd_scan(c["x"][:, :L], c["dt"][:, :L], c["A"], c["B"][:, :L], c["C"][:, :L], 8, D=c["D"],
                     dt_bias=c["dt_bias"], cu_seqlens=cu_of([L]), dt_softplus=True,
                     state_dtype=torch.float32)
    state = pre.varlen_states.clone()
    y = torch.empty(1, H, P)
    K.selective_state_update(
        state, c["x"][0, L][None], c["dt"][0, L][None, :, None].expand(1, H, P),
        c["A"][:, None, None].expand(H, P, N), c["B"][0, L][None], c["C"][0, L][None],
        D=c["D"][:, None].expand(H, P), dt_bias=c["dt_bias"][:, None].expand(H, P), dt_softplus=True,
        state_batch_indices=torch.tensor([0]), out=y,
    )
    close(y[0], out_full[0, L], scale=20)


def _sglang_scan_args(c, chunk):
    from sglang.srt.layers.attention.mamba.mamba2_metadata import Mamba2Metadata

    cu = c["cu"]
    T = int(cu[-1])
    seq_idx = torch.repeat_interleave(torch.arange(len(cu) - 1, dtype=torch.int32), cu.diff()).unsqueeze(0)
    ci, co = Mamba2Metadata._query_start_loc_to_chunk_indices_offsets(cu, chunk, T)
    return seq_idx, ci, co


@pytest.mark.parametrize("lens,chunk", [([37, 1, 20], 16), ([5, 12], 8), ([16], 16)])
def test_scan_matches_sglang_triton(sglang_triton, lens, chunk):
    c = _scan_case(51, lens, 4, 8, 16, 2)
    try:
        seq_idx, ci, co = _sglang_scan_args(c, chunk)
    except Exception as e:
        pytest.skip(f"SGLang's Mamba2Metadata cannot be imported here: {e}")
    cu = c["cu"]
    track_seq = torch.tensor([0, len(lens) - 1])
    track_end = torch.tensor([int(cu[0]) + lens[0] // 2, int(cu[-1]) - 1])
    outs = []
    for scan in (sglang_triton("scan"), K.mamba_chunk_scan_combined):
        out = torch.zeros_like(c["x"])
        res = scan(
            c["x"], c["dt"], c["A"], c["B"], c["C"], chunk_size=chunk, D=c["D"], z=None,
            dt_bias=c["dt_bias"], seq_idx=seq_idx, chunk_indices=ci, chunk_offsets=co, cu_seqlens=cu,
            initial_states=c["initial_states"], return_varlen_states=True, return_final_states=False,
            return_track_states=True, track_seq_idx=track_seq, track_end_locs=track_end,
            dt_softplus=True, dt_limit=(0.0, float("inf")), out=out, state_dtype=torch.float32,
        )
        outs.append((out, *res))
    (o_t, st_t, v_t, tr_t), (o_c, st_c, v_c, tr_c) = outs
    close(o_c, o_t, scale=20)
    close(v_c, v_t, scale=20)
    close(st_c, st_t, scale=20)
    close(tr_c, tr_t, scale=20)


# --------------------------------------------------------------------------- decode step


def _ssu_case(seed, batch, H, P, N, G, state_dtype=torch.float32, z=False):
    g = torch.Generator().manual_seed(seed)
    state = torch.randn(7, H, P, N, generator=g).to(state_dtype)
    x = torch.randn(batch, H, P, generator=g)
    dt = torch.randn(batch, H, generator=g)[:, :, None].expand(-1, -1, P)
    A = (-(torch.rand(H, generator=g) + 0.1))[:, None, None].expand(-1, P, N)
    B, C = torch.randn(batch, G, N, generator=g), torch.randn(batch, G, N, generator=g)
    D = torch.randn(H, generator=g)[:, None].expand(-1, P)
    dt_bias = torch.randn(H, generator=g)[:, None].expand(-1, P)
    zz = torch.randn(batch, H, P, generator=g) if z else None
    idx = torch.tensor([5, K.PAD_SLOT_ID, 2][:batch], dtype=torch.int32) if batch > 1 else torch.tensor([3], dtype=torch.int32)
    return state, x, dt, A, B, C, D, dt_bias, zz, idx


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("G", [1, 2])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("z", [False, True])
def test_selective_state_update_matches_ref(batch, G, state_dtype, z):
    state, x, dt, A, B, C, D, dt_bias, zz, idx = _ssu_case(batch * 7 + G, batch, 4, 3, 5, G, state_dtype, z)
    st = state.clone()
    out = torch.empty(batch, 4, 3)
    K.selective_state_update(st, x, dt, A, B, C, D, z=zz, dt_bias=dt_bias, dt_softplus=True,
                             state_batch_indices=idx, out=out)
    ref_out, ref_st = K.selective_state_update_ref(state, x, dt, A, B, C, D, zz, dt_bias, True, idx)
    close(out, ref_out, state_dtype)
    close(st, ref_st, state_dtype)
    if batch > 1:  # the padded row's slot is untouched
        assert torch.equal(st[[0, 1, 3, 4, 6]], state[[0, 1, 3, 4, 6]])


def test_selective_state_update_multi_step_and_buffers():
    state, x, dt, A, B, C, D, dt_bias, _, idx = _ssu_case(3, 3, 4, 3, 5, 2)
    idx = torch.tensor([5, 1, 2], dtype=torch.int32)
    T = 3
    g = torch.Generator().manual_seed(9)
    xs = torch.randn(3, T, 4, 3, generator=g)
    dts = torch.randn(3, T, 4, generator=g)[..., None].expand(-1, -1, -1, 3)
    Bs, Cs = torch.randn(3, T, 2, 5, generator=g), torch.randn(3, T, 2, 5, generator=g)
    # T steps at once, state kept (disable_state_update) and cached per step
    st = state.clone()
    out = torch.empty(3, T, 4, 3)
    buf = torch.zeros(3, T, 4, 3, 5)
    K.selective_state_update(st, xs, dts, A, Bs, Cs, D, dt_bias=dt_bias, dt_softplus=True,
                             state_batch_indices=idx, out=out, disable_state_update=True,
                             intermediate_states_buffer=buf, cache_steps=T,
                             intermediate_state_indices=torch.arange(3))
    assert torch.equal(st, state)
    # step by step
    st2 = state.clone()
    for t in range(T):
        o = torch.empty(3, 4, 3)
        K.selective_state_update(st2, xs[:, t], dts[:, t], A, Bs[:, t], Cs[:, t], D, dt_bias=dt_bias,
                                 dt_softplus=True, state_batch_indices=idx, out=o)
        close(out[:, t], o)
        close(buf[:, t], st2[idx.long()])


@pytest.mark.parametrize("batch", [1, 3])
def test_selective_state_update_matches_sglang_triton(sglang_triton, batch):
    state, x, dt, A, B, C, D, dt_bias, _, idx = _ssu_case(11, batch, 4, 6, 16, 2)
    st_t, st_c = state.clone(), state.clone()
    o_t, o_c = torch.zeros(batch, 4, 6), torch.zeros(batch, 4, 6)
    sglang_triton("ssu")(st_t, x, dt, A, B, C, D, z=None, dt_bias=dt_bias, dt_softplus=True,
                         state_batch_indices=idx, out=o_t)
    K.selective_state_update(st_c, x, dt, A, B, C, D, z=None, dt_bias=dt_bias, dt_softplus=True,
                             state_batch_indices=idx, out=o_c)
    valid = idx != K.PAD_SLOT_ID  # the kernel computes padded rows from a zero state too
    close(o_c[valid], o_t[valid])
    close(st_c, st_t)


# --------------------------------------------------------------------------- gated RMSNorm


@pytest.mark.parametrize("rows,hidden,group", [(1, 24, 8), (5, 24, None), (3, 30, 5), (7, 64, 16)])
@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_gated_matches_ref(rows, hidden, group, norm_before_gate, dtype):
    g = torch.Generator().manual_seed(rows + hidden)
    x = torch.randn(rows, hidden, generator=g).to(dtype)
    z = torch.randn(rows, hidden, generator=g).to(dtype)
    w = torch.randn(hidden, generator=g)
    out = K.rms_norm_gated(x=x, weight=w, bias=None, z=z, eps=1e-5, group_size=group,
                           norm_before_gate=norm_before_gate, is_rms_norm=True)
    ref = K.rms_norm_gated_ref(x, w, z, 1e-5, group, norm_before_gate)
    assert out.dtype == dtype
    close(out, ref, dtype)


def test_rms_norm_gated_layernorm_and_bias_without_gate():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(4, 12, generator=g), torch.randn(12, generator=g), torch.randn(12, generator=g)
    out = K.rms_norm_gated(x=x, weight=w, bias=b, z=None, eps=1e-6, group_size=4, is_rms_norm=False)
    close(out, K.rms_norm_gated_ref(x, w, None, 1e-6, 4, False, bias=b, is_rms_norm=False))


def test_rms_norm_gated_matches_sglang_native_and_triton(triton_ok, monkeypatch):
    try:
        import sglang.kernels.ops.attention.fla.layernorm_gated as LG
    except Exception as e:
        pytest.skip(f"SGLang's layernorm_gated cannot be imported here: {e}")
    _require_interpreted(["sglang.kernels.ops.attention.fla.layernorm_gated"])
    monkeypatch.setattr(LG, "_get_sm_count", lambda device: 4)
    if not hasattr(torch.cpu, "device"):
        monkeypatch.setattr(torch.cpu, "device", lambda idx=None: contextlib.nullcontext(), raising=False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 32, generator=g).to(torch.bfloat16)
    z = torch.randn(5, 32, generator=g).to(torch.bfloat16)
    w = torch.randn(32, generator=g).to(torch.bfloat16)
    kw = dict(x=x, weight=w, bias=None, z=z, eps=1e-5, group_size=8, norm_before_gate=False, is_rms_norm=True)
    ours = K.rms_norm_gated(**kw)
    close(ours, LG.rms_norm_ref(x, w, None, z=z, eps=1e-5, group_size=8, norm_before_gate=False), torch.bfloat16)
    close(ours, LG.rms_norm_gated(**kw), torch.bfloat16)


# --------------------------------------------------------------------------- sgl_kernel pool ops


def _buffers():
    g = torch.Generator().manual_seed(0)
    # per-layer K and V buffers of different row sizes and dtypes, as a KV pool holds them
    return [
        torch.randn(20, 2, 8, generator=g).to(torch.bfloat16),
        torch.randn(20, 2, 8, generator=g).to(torch.bfloat16),
        torch.randn(20, 3, generator=g),
        torch.randint(0, 255, (20, 5), generator=g, dtype=torch.uint8),
    ]


def _ptrs(bufs):
    return (
        torch.tensor([b.data_ptr() for b in bufs], dtype=torch.uint64),
        torch.tensor([b.stride(0) * b.element_size() for b in bufs]),
    )


@pytest.mark.parametrize(
    "tgt,src",
    [([], []), ([0], [0]), ([3], [7]), ([1, 2, 3], [2, 3, 4]), ([4, 2], [2, 4]), ([10, 11, 12], [19, 19, 0])],
    ids=["empty", "self", "one", "chain", "swap", "fan-out"],
)
def test_copy_all_layer_kv_cache_cpu(tgt, src):
    bufs = _buffers()
    expect = [b.clone() for b in bufs]
    for e in expect:
        if tgt:
            e[torch.tensor(tgt)] = e[torch.tensor(src)].clone()
    ptrs, strides = _ptrs(bufs)
    K.copy_all_layer_kv_cache_cpu(ptrs, strides, torch.tensor(tgt, dtype=torch.int64), torch.tensor(src, dtype=torch.int64))
    for b, e in zip(bufs, expect):
        assert torch.equal(b.view(torch.uint8), e.view(torch.uint8))
    ref = _buffers()
    rp, rs = _ptrs(ref)
    K.copy_all_layer_kv_cache_cpu_ref(rp, rs, torch.tensor(tgt, dtype=torch.int64), torch.tensor(src, dtype=torch.int64))
    for b, r in zip(bufs, ref):
        assert torch.equal(b.view(torch.uint8), r.view(torch.uint8))


def test_copy_all_layer_kv_cache_cpu_validates():
    bufs = _buffers()
    ptrs, strides = _ptrs(bufs)
    with pytest.raises(ValueError, match="negative"):
        K.copy_all_layer_kv_cache_cpu(ptrs, strides, torch.tensor([-1]), torch.tensor([0]))
    with pytest.raises(ValueError, match="entries"):
        K.copy_all_layer_kv_cache_cpu(ptrs, strides, torch.tensor([1, 2]), torch.tensor([0]))


@pytest.mark.parametrize("lens", [[0], [5], [3, 0, 7], [1, 1, 1, 1]])
def test_assign_req_to_token_pool_cpu(lens):
    g = torch.Generator().manual_seed(len(lens))
    pool = torch.zeros(6, 16, dtype=torch.int32)
    rows = torch.randperm(6, generator=g)[: len(lens)]
    starts = torch.tensor([int(torch.randint(0, 16 - L + 1, (1,), generator=g)) for L in lens])
    ends = starts + torch.tensor(lens)
    locs = torch.randint(0, 1000, (sum(lens),), generator=g)
    got, ref = pool.clone(), pool.clone()
    K.assign_req_to_token_pool_cpu(rows, got, starts, ends, locs, 16)
    K.assign_req_to_token_pool_cpu_ref(rows, ref, starts, ends, locs, 16)
    assert torch.equal(got, ref)
    assert int((got != 0).sum()) <= sum(lens)


def test_assign_req_to_token_pool_matches_sglang_triton(triton_ok):
    try:
        from sglang.srt.mem_cache import allocation
    except Exception as e:
        pytest.skip(f"sglang.srt.mem_cache.allocation cannot be imported here: {e}")
    if allocation._is_cpu:
        pytest.skip("SGLANG_USE_CPU_ENGINE=1 in this process: allocation dispatches to sgl_kernel")
    _require_interpreted(["sglang.srt.mem_cache.allocation"])
    rows = torch.tensor([4, 0, 2])
    starts = torch.tensor([3, 0, 5])
    ends = torch.tensor([9, 2, 6])
    locs = torch.arange(100, 109)
    pool_t = torch.zeros(5, 12, dtype=torch.int64)
    pool_c = pool_t.clone()
    allocation.assign_req_to_token_pool_func(rows, pool_t, starts, ends, locs, 3)
    K.assign_req_to_token_pool_cpu(rows, pool_c, starts, ends, locs, 12)
    assert torch.equal(pool_c, pool_t)


def test_cpu_ops_import_without_triton_or_sglang():
    import subprocess
    import sys

    code = (
        "import sys; import sglang_marconi.kernels.cpu_ops as K; "
        "bad = [m for m in ('triton', 'sglang') if m in sys.modules]; "
        "assert not bad, bad; print('ok')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_kv_pointer_view_is_zero_copy():
    t = torch.arange(12, dtype=torch.int32).reshape(4, 3)
    from sglang_marconi.kernels.cpu_ops.kv_cache import _row_view

    v = _row_view(t.data_ptr(), 12, 4)
    v[0] = v[3]
    assert t[0].tolist() == [9, 10, 11]
    assert ctypes.sizeof(ctypes.c_uint8) == 1


def test_sglang_triton_comparisons_in_fresh_process(triton_ok):
    """Re-run the SGLang-Triton comparisons in a process where TRITON_INTERPRET=1 comes first."""
    import subprocess
    import sys

    if os.environ.get(_SUBPROCESS_ENV):
        pytest.skip("already the fresh process")
    prefixes = ["triton.language", "sglang.kernels.ops.mamba",
                "sglang.kernels.ops.attention.fla.layernorm_gated", "sglang.srt.mem_cache.allocation"]
    if not _uninterpreted_kernels(prefixes):
        pytest.skip("SGLang's kernels are interpreted in this process: the comparisons ran here")
    env = dict(os.environ, TRITON_INTERPRET="1", **{_SUBPROCESS_ENV: "1"})
    r = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k", "sglang", "-rs"],
        capture_output=True, text=True, timeout=600, env=env, cwd=os.path.dirname(__file__),
    )
    tail = r.stdout[-3000:] + r.stderr[-2000:]
    assert r.returncode == 0, tail
    assert " passed" in r.stdout and "imported before TRITON_INTERPRET" not in r.stdout, tail
