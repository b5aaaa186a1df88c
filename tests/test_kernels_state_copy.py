"""Tests for the SSM-state gather/scatter kernels (sglang_marconi.kernels).

The Triton kernel runs in the Triton interpreter on CPU: TRITON_INTERPRET must
be set before triton (and the kernel module) is imported.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import sglang_marconi.kernels as K  # noqa: E402
from sglang_marconi.kernels import (  # noqa: E402
    StateCopyError,
    copy_states,
    copy_states_ref,
)
from sglang_marconi.kernels import state_copy_triton as T  # noqa: E402

if not (T._interpreting() or torch.cuda.is_available()):
    pytest.skip(
        "Triton kernel needs TRITON_INTERPRET=1 (set before import) or a GPU",
        allow_module_level=True,
    )

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DT_IDS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


# --------------------------------------------------------------------------- helpers


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view: comparisons are bit-exact (NaN payloads, -0.0)."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def rand_state(shape, dtype, gen) -> torch.Tensor:
    x = torch.randn(shape, generator=gen) * 3 + 0.25
    x[x == 0] = 1.5  # never zeros
    x = x.to(dtype)
    assert (x != 0).all()
    return x


def make_pool(layers, slots, conv_shapes, temporal_shape, conv_dtype, temporal_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    conv = [rand_state((layers, slots, *cs), conv_dtype, g) for cs in conv_shapes]
    temporal = rand_state((layers, slots, *temporal_shape), temporal_dtype, g)
    return conv, temporal


def clone_pool(conv, temporal):
    return [c.clone() for c in conv], temporal.clone()


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor, what: str):
    assert a.shape == b.shape and a.dtype == b.dtype, what
    assert torch.equal(bits(a), bits(b)), what


def assert_pool_equal(pa, pb, what=""):
    (ca, ta), (cb, tb) = pa, pb
    assert len(ca) == len(cb)
    for i, (x, y) in enumerate(zip(ca, cb)):
        assert_bits_equal(x, y, f"{what} conv[{i}]")
    assert_bits_equal(ta, tb, f"{what} temporal")


def assert_copied(before, after, src, dst):
    """Oracle independent of both implementations: a per-pair loop over the
    snapshot; every slot that is not a destination keeps its old bits."""
    src, dst = [int(s) for s in src], [int(d) for d in dst]
    for name, b, a in zip(
        [f"conv[{i}]" for i in range(len(before[0]))] + ["temporal"],
        [*before[0], before[1]],
        [*after[0], after[1]],
    ):
        for s, d in zip(src, dst):
            assert torch.equal(bits(a[:, d]), bits(b[:, s])), f"{name}: slot {d} != old slot {s}"
        for k in range(b.shape[1]):
            if k not in dst:
                assert torch.equal(bits(a[:, k]), bits(b[:, k])), f"{name}: untouched slot {k} changed"


def run_both(conv, temporal, src, dst, max_block=None):
    """Run ref and Triton on identical copies; check both against the oracle
    and against each other bit for bit. Returns the Triton launch count."""
    before = clone_pool(conv, temporal)
    ref = clone_pool(conv, temporal)
    copy_states_ref(ref[0], ref[1], src, dst)
    launches = T.copy_states_triton(conv, temporal, src, dst, max_block=max_block)
    assert_copied(before, ref, src, dst)
    assert_copied(before, (conv, temporal), src, dst)
    assert_pool_equal((conv, temporal), ref, "triton vs ref")
    return launches


# --------------------------------------------------------------------------- Triton == ref

# name -> (layers, slots, conv_shapes, temporal_shape, src, dst, max_block, expected_launches)
CASES = {
    "one_layer": (1, 6, [(5, 3)], (3, 5, 7), [4, 0, 2], [1, 3, 5], None, 1),
    "odd_dims_two_convs": (2, 8, [(3, 3), (7, 1)], (5, 3, 7), [0, 6, 2, 7], [1, 3, 4, 5], None, 1),
    "zero_pairs": (2, 5, [(5, 3)], (3, 5, 7), [], [], None, 0),
    "src_eq_dst": (2, 6, [(5, 3)], (3, 5, 7), [2, 4, 5], [2, 4, 5], None, 0),
    "one_src_many_dst": (2, 7, [(5, 3)], (7, 3, 5), [4, 4, 4], [0, 1, 6], None, 1),
    "chain_overlap": (2, 6, [(5, 3)], (3, 5, 7), [1, 2, 3], [2, 3, 4], None, 2),
    "swap_and_cycle": (2, 9, [(3, 5)], (3, 7, 5), [1, 2, 5, 6, 7], [2, 1, 6, 7, 5], None, 2),
    "identity_plus_swap": (1, 5, [(5, 3)], (3, 5, 7), [3, 1, 2], [3, 2, 1], None, 2),
    "multi_chunk_rows": (2, 6, [(5, 3), (2, 2)], (3, 5, 7), [0, 5], [3, 1], 8, 1),
}


@pytest.mark.parametrize("temporal_dtype", DTYPES, ids=lambda d: "t_" + DT_IDS[d])
@pytest.mark.parametrize("conv_dtype", DTYPES, ids=lambda d: "c_" + DT_IDS[d])
@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_ref(case, conv_dtype, temporal_dtype):
    layers, slots, conv_shapes, tshape, src, dst, max_block, want_launches = CASES[case]
    conv, temporal = make_pool(layers, slots, conv_shapes, tshape, conv_dtype, temporal_dtype,
                               seed=list(CASES).index(case))
    src_t = torch.tensor(src, dtype=torch.int64)
    dst_t = torch.tensor(dst, dtype=torch.int64)
    assert run_both(conv, temporal, src_t, dst_t, max_block=max_block) == want_launches


@pytest.mark.parametrize("conv_dtype,temporal_dtype", [
    (torch.bfloat16, torch.float32), (torch.float16, torch.float16), (torch.float32, torch.bfloat16),
], ids=["bf16_fp32", "fp16_fp16", "fp32_bf16"])
def test_many_pairs(conv_dtype, temporal_dtype):
    g = torch.Generator().manual_seed(7)
    slots = 80
    perm = torch.randperm(slots, generator=g)
    src, dst = perm[:37], perm[37:74]  # 37 disjoint pairs
    conv, temporal = make_pool(2, slots, [(5, 3), (3, 1)], (3, 5, 7), conv_dtype, temporal_dtype, seed=3)
    assert run_both(conv, temporal, src, dst) == 1


def test_many_pairs_with_overlap_and_int32_indices():
    g = torch.Generator().manual_seed(11)
    slots = 50
    src = torch.randint(0, slots, (37,), generator=g).to(torch.int32)  # repeats allowed in src
    dst = torch.randperm(slots, generator=g)[:37].to(torch.int32)
    assert bool(torch.isin(dst, src).any())  # exercises the staged path
    conv, temporal = make_pool(1, slots, [(7, 3)], (5, 3, 3), torch.bfloat16, torch.float32, seed=5)
    assert run_both(conv, temporal, src, dst) == 2


def test_nan_payload_and_negative_zero_preserved():
    conv, temporal = make_pool(2, 4, [(5, 3)], (3, 5, 7), torch.bfloat16, torch.float32)
    bits(conv[0])[:, 1] = 0x7FC5  # NaN with a payload
    bits(temporal)[:, 1, 0] = -0x80000000  # -0.0
    bits(temporal)[:, 1, 1] = 0x7FA00001  # signalling-NaN pattern
    run_both(conv, temporal, torch.tensor([1]), torch.tensor([3]))
    assert int(bits(conv[0])[0, 3, 0, 0]) == 0x7FC5
    assert int(bits(temporal)[1, 3, 1, 0, 0]) == 0x7FA00001


def test_poisoned_untouched_slots_keep_their_value():
    """Every slot holds its own distinctive constant; only dst slots change."""
    layers, slots = 2, 10
    conv, temporal = make_pool(layers, slots, [(5, 3), (3, 3)], (3, 5, 7), torch.float16, torch.bfloat16)
    for t in (*conv, temporal):
        for s in range(slots):
            t[:, s] = -(s + 1) * 1.25  # exactly representable in bf16/fp16
    src, dst = torch.tensor([9, 0, 4]), torch.tensor([2, 7, 5])
    T.copy_states_triton(conv, temporal, src, dst)
    for t in (*conv, temporal):
        for s in range(slots):
            want = -(int(src[(dst == s).nonzero()[0, 0]]) + 1) * 1.25 if s in dst.tolist() else -(s + 1) * 1.25
            assert bool((t[:, s] == want).all()), (s, want)


# --------------------------------------------------------------------------- layouts / word width


def test_word_width_selection():
    a = torch.zeros(2, 4, 4, 2, dtype=torch.float32)  # 32-byte rows
    b = torch.zeros(2, 4, 5, 3, dtype=torch.bfloat16)  # 30-byte rows
    plan = K.validate_copy_args([a], torch.zeros(2, 4, 2, 2, 2), torch.tensor([0]), torch.tensor([1]))
    jobs = [T._Job(t.data_ptr(), t.data_ptr(), rb, ls, ss, ls, ss) for _, t, rb, ls, ss in T._pool_geometry(plan)]
    assert T._word_bytes(jobs) == 8
    plan = K.validate_copy_args([b], torch.zeros(2, 4, 2, 2, 2), torch.tensor([0]), torch.tensor([1]))
    jobs = [T._Job(t.data_ptr(), t.data_ptr(), rb, ls, ss, ls, ss) for _, t, rb, ls, ss in T._pool_geometry(plan)]
    assert T._word_bytes(jobs) == 2


def test_misaligned_base_and_padded_slot_stride():
    """Envelope-like layout: each slot row sits in a larger padded record that
    starts at an odd element offset; padding must stay untouched."""
    layers, slots, row, pad = 2, 6, 15, 3
    g = torch.Generator().manual_seed(1)
    raw = rand_state((layers * slots * (row + pad) + 1,), torch.bfloat16, g)
    conv0 = raw[1:].view(layers, slots, row + pad)[..., :row].unflatten(2, (5, 3))
    assert conv0.data_ptr() % 8 == 2 and not conv0.is_contiguous()
    temporal = rand_state((layers, slots, 3, 5, 7), torch.float32, g)
    raw_before = raw.clone()
    pad_view = raw[1:].view(layers, slots, row + pad)[..., row:]
    pad_before = pad_view.clone()
    run_both([conv0], temporal, torch.tensor([0, 5, 2]), torch.tensor([4, 1, 3]))
    assert torch.equal(bits(pad_view), bits(pad_before))
    assert int(bits(raw)[0]) == int(bits(raw_before)[0])


def test_multiple_blocks_large_row_default_block():
    # 2 * 3 * 40 * 20 * 4 B = 19200 B per row -> 2400 int64 words -> 3 chunks of 1024
    conv, temporal = make_pool(1, 4, [(40, 3)], (3, 40, 20), torch.bfloat16, torch.float32)
    assert run_both(conv, temporal, torch.tensor([2]), torch.tensor([0])) == 1


@pytest.mark.parametrize("overlap", [False, True])
def test_grid_limit_splits_pairs_into_several_launches(overlap, monkeypatch):
    # per pair: 2 layers * (1 + 1) jobs*chunks = 4 programs; limit 10 -> 2 pairs per launch
    monkeypatch.setattr(T, "_MAX_GRID", 10)
    conv, temporal = make_pool(2, 12, [(5, 3)], (3, 5, 7), torch.float16, torch.float32)
    src = torch.tensor([0, 1, 2, 3, 4]) + (5 if overlap else 0)
    dst = torch.tensor([5, 6, 7, 8, 9]) + (1 if overlap else 0)
    assert bool(torch.isin(dst, src).any()) == overlap
    assert run_both(conv, temporal, src, dst) == (6 if overlap else 3)


def test_noncontiguous_slot_block_rejected_by_triton_but_ref_path_works():
    conv, temporal = make_pool(2, 5, [(3, 5)], (3, 5, 7), torch.bfloat16, torch.float32)
    conv_t = [conv[0].transpose(2, 3)]  # per-slot block not contiguous
    before = clone_pool(conv_t, temporal)
    with pytest.raises(StateCopyError, match=r"conv\[0\] per-slot block is not contiguous"):
        T.copy_states_triton(conv_t, temporal, torch.tensor([0]), torch.tensor([1]))
    assert_pool_equal((conv_t, temporal), before, "after rejected call")
    copy_states(conv_t, temporal, torch.tensor([0]), torch.tensor([1]))  # CPU -> ref
    assert_copied(before, (conv_t, temporal), [0], [1])


def test_empty_conv_list_and_empty_temporal():
    _, temporal = make_pool(2, 5, [], (3, 5, 7), torch.bfloat16, torch.float16)
    assert run_both([], temporal, torch.tensor([0, 1]), torch.tensor([3, 4])) == 1
    conv, _ = make_pool(2, 5, [(5, 3)], (3, 5, 7), torch.float32, torch.float32)
    empty_t = torch.empty(2, 5, 0, 5, 7)
    assert run_both(conv, empty_t, torch.tensor([4]), torch.tensor([0])) == 1


# --------------------------------------------------------------------------- directions & dispatch


@pytest.mark.parametrize("impl", ["dispatch_ref", "dispatch_triton", "triton_module"])
def test_gather_and_scatter_directions(impl, monkeypatch):
    if impl == "dispatch_triton":
        monkeypatch.setenv(K.FORCE_TRITON_ENV, "1")
    else:
        monkeypatch.delenv(K.FORCE_TRITON_ENV, raising=False)
    mod = T if impl == "triton_module" else K
    conv, temporal = make_pool(2, 8, [(5, 3)], (3, 5, 7), torch.bfloat16, torch.float32)
    cache_slots, req_slots = torch.tensor([6, 7]), torch.tensor([1, 2])

    before = clone_pool(conv, temporal)
    mod.gather_states(conv, temporal, cache_slots, req_slots)  # cache -> request
    assert_copied(before, (conv, temporal), cache_slots, req_slots)

    # the request evolves, then is checkpointed back into fresh cache slots
    for t in (*conv, temporal):
        t[:, 1] += 1
    before = clone_pool(conv, temporal)
    mod.scatter_states(conv, temporal, torch.tensor([1]), torch.tensor([4]))  # request -> cache
    assert_copied(before, (conv, temporal), [1], [4])
    assert not torch.equal(bits(temporal[:, 4]), bits(temporal[:, 6]))


def test_dispatch_cpu_uses_ref_unless_forced(monkeypatch):
    conv, temporal = make_pool(2, 6, [(5, 3)], (3, 5, 7), torch.float16, torch.float32)
    src, dst = torch.tensor([0, 1]), torch.tensor([4, 5])

    def boom(*a, **k):
        raise AssertionError("wrong path taken")

    monkeypatch.delenv(K.FORCE_TRITON_ENV, raising=False)
    monkeypatch.setattr(T, "_run_plan", boom)
    assert not K.uses_triton(torch.device("cpu"))
    before = clone_pool(conv, temporal)
    copy_states(conv, temporal, src, dst)
    assert_copied(before, (conv, temporal), src, dst)
    monkeypatch.undo()

    monkeypatch.setenv(K.FORCE_TRITON_ENV, "1")
    monkeypatch.setattr(K, "copy_states_ref", boom)
    calls = []
    real = T._run_plan
    monkeypatch.setattr(T, "_run_plan", lambda plan, *a: calls.append(1) or real(plan, *a))
    assert K.uses_triton(torch.device("cpu"))
    before = clone_pool(conv, temporal)
    copy_states(conv, temporal, dst, src)
    assert calls == [1]
    assert_copied(before, (conv, temporal), dst, src)


def test_package_import_does_not_import_triton():
    code = textwrap.dedent(
        """
        import sys
        import sglang_marconi
        had = "triton" in sys.modules
        import sglang_marconi.kernels as k
        assert callable(k.copy_states)
        print("PRE" if had else ("BAD" if "triton" in sys.modules else "OK"))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    if out.stdout.strip() == "PRE":
        pytest.skip("sglang_marconi itself imports triton; cannot isolate the kernels package")
    assert out.stdout.strip() == "OK"


# --------------------------------------------------------------------------- validation


def _pool(slots=9, layers=2):
    return make_pool(layers, slots, [(5, 3), (3, 3)], (3, 5, 7), torch.bfloat16, torch.float32)


def _bad_case(name):
    conv, temporal = _pool()
    src, dst = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])
    if name == "dup_dst":
        return conv, temporal, src, torch.tensor([3, 4, 3]), r"^dst slot 3 appears more than once \(positions 0 and 2\)$"
    if name == "src_out_of_range":
        return conv, temporal, torch.tensor([0, 9, 2]), dst, r"^src\[1\] = 9 is out of range \[0, 9\)$"
    if name == "dst_negative":
        return conv, temporal, src, torch.tensor([3, 4, -1]), r"^dst\[2\] = -1 is out of range \[0, 9\)$"
    if name == "len_mismatch":
        return conv, temporal, src, torch.tensor([3, 4]), r"^src has 3 entries but dst has 2$"
    if name == "float_index":
        return conv, temporal, src.float(), dst, r"^src index dtype float32 is not an integer dtype$"
    if name == "bool_index":
        return conv, temporal, src, torch.tensor([True, False, True]), r"^dst index dtype bool is not an integer dtype$"
    if name == "index_2d":
        return conv, temporal, src.view(3, 1), dst, r"^src must be 1-D, got shape \(3, 1\)$"
    if name == "layers_mismatch":
        conv[1] = rand_state((3, 9, 3, 3), torch.bfloat16, torch.Generator().manual_seed(0))
        return conv, temporal, src, dst, r"^conv\[1\] has 3 layers but temporal has 2$"
    if name == "slots_mismatch":
        conv[0] = rand_state((2, 8, 5, 3), torch.bfloat16, torch.Generator().manual_seed(0))
        return conv, temporal, src, dst, r"^conv\[0\] has 8 slots but temporal has 9$"
    if name == "conv_dtype_mismatch":
        conv[1] = conv[1].to(torch.float16)
        return conv, temporal, src, dst, r"^conv\[1\] dtype float16 differs from conv\[0\] dtype bfloat16$"
    if name == "unsupported_dtype":
        return conv, temporal.double(), src, dst, r"^temporal dtype float64 is not supported"
    if name == "temporal_rank":
        return conv, temporal.flatten(3), src, dst, r"^temporal must be \[layers, slots, heads, head_dim, state\], got shape \(2, 9, 3, 35\)$"
    if name == "device_mismatch":
        conv[0] = torch.empty(2, 9, 5, 3, dtype=torch.bfloat16, device="meta")
        return conv, temporal, src, dst, r"^conv\[0\] is on meta but temporal is on cpu$"
    if name == "index_device":
        return conv, temporal, src.to("meta"), dst, r"^src is on meta but the states are on cpu$"
    raise KeyError(name)


BAD = [
    "dup_dst", "src_out_of_range", "dst_negative", "len_mismatch", "float_index", "bool_index",
    "index_2d", "layers_mismatch", "slots_mismatch", "conv_dtype_mismatch", "unsupported_dtype",
    "temporal_rank", "device_mismatch", "index_device",
]


@pytest.mark.parametrize("route", ["ref", "triton", "triton_module"])
@pytest.mark.parametrize("name", BAD)
def test_validation_errors_write_nothing(name, route, monkeypatch):
    if route == "triton":
        monkeypatch.setenv(K.FORCE_TRITON_ENV, "1")
    else:
        monkeypatch.delenv(K.FORCE_TRITON_ENV, raising=False)
    conv, temporal, src, dst, pattern = _bad_case(name)
    snap = [t.clone() for t in (*conv, temporal) if t.device.type == "cpu"]
    fn = T.copy_states_triton if route == "triton_module" else copy_states
    with pytest.raises(ValueError, match=pattern) as exc:
        fn(conv, temporal, src, dst)
    assert isinstance(exc.value, StateCopyError)
    assert "\n" not in str(exc.value)
    after = [t for t in (*conv, temporal) if t.device.type == "cpu"]
    for a, b in zip(after, snap):
        assert torch.equal(bits(a), bits(b)), "tensor modified by a rejected call"


def test_validation_passes_on_good_args_and_normalises():
    conv, temporal = _pool()
    plan = K.validate_copy_args(conv, temporal, torch.tensor([1, 2], dtype=torch.int16),
                                torch.tensor([2, 1], dtype=torch.uint8))
    assert plan.src.dtype == torch.int64 and plan.dst.tolist() == [2, 1]
    assert plan.num_layers == 2 and plan.num_slots == 9 and plan.num_pairs == 2
    assert plan.tensors[-1] is temporal


# --------------------------------------------------------------------------- bench smoke


def test_bench_no_gpu_message_and_cpu_mode():
    if torch.cuda.is_available():
        pytest.skip("GPU present: the no-GPU message is not printed")
    out = subprocess.run([sys.executable, "-m", "sglang_marconi.kernels.bench_state_copy"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("\n") == 1 and "No GPU available" in out.stdout and "unmeasured" in out.stdout
    out = subprocess.run(
        [sys.executable, "-m", "sglang_marconi.kernels.bench_state_copy", "--cpu-ref",
         "--layers", "2", "--pairs", "3", "--conv-dim", "64", "--heads", "2", "--state", "16",
         "--iters", "3", "--warmup", "1"],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "CPU measurement" in out.stdout and "ref/SGLang speed" in out.stdout
