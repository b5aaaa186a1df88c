"""Tests for sglang_marconi.policy.cost_model.

The cost model itself is stdlib-only; SGLang (and torch) are imported only inside the
parity tests, which compare state sizes with what SGLang 0.5.23's own config classes
and ``Mamba2CacheParams`` report (tp = 1, default dtypes).
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sglang_marconi.policy import cost_model as cm
from sglang_marconi.policy.cost_model import (
    BUILTIN_PROFILES,
    CostProfile,
    builtin_profile,
    from_hf_config,
)

REAL_BUILTINS = [n for n in BUILTIN_PROFILES if n != "paper-7b"]
D, N = 4096, 128  # paper-7b


@pytest.fixture(autouse=True)
def _no_dtype_env(monkeypatch):
    # SGLang and the cost model both honour these; tests assume the defaults.
    monkeypatch.delenv("SGLANG_MAMBA_SSM_DTYPE", raising=False)
    monkeypatch.delenv("SGLANG_MAMBA_CONV_DTYPE", raising=False)


def _profile_cfg(name: str) -> dict:
    data = json.loads((cm.PROFILES_DIR / f"{name}.json").read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


# --------------------------------------------------------------------- synthetic configs
TINY_NEMOTRON = {
    "model_type": "nemotron_h",
    "hidden_size": 64,
    "intermediate_size": 96,
    "hybrid_override_pattern": "M*M-ME",
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "mamba_num_heads": 8,
    "mamba_head_dim": 16,
    "ssm_state_size": 16,
    "n_groups": 2,
    "conv_kernel": 4,
    "expand": 2,
    "chunk_size": 32,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "n_shared_experts": 1,
    "moe_shared_expert_intermediate_size": 48,
}
TINY_FALCON = {
    "model_type": "falcon_h1",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "mamba_d_ssm": 96,
    "mamba_n_heads": 6,
    "mamba_d_head": "auto",
    "mamba_n_groups": 2,
    "mamba_d_state": 8,
    "mamba_d_conv": 3,
}
TINY_QWEN3_NEXT = {
    "model_type": "qwen3_next",
    "hidden_size": 64,
    "num_hidden_layers": 8,
    "full_attention_interval": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 32,
    "linear_value_head_dim": 16,
    "linear_conv_kernel_dim": 4,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
}
TINY_QWEN3_5 = {
    "architectures": ["Qwen3_5ForConditionalGeneration"],
    "model_type": "qwen3_5",
    "text_config": {
        "model_type": "qwen3_5_text",
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 6,
        "full_attention_interval": 3,
        "layer_types": ["linear_attention", "linear_attention", "full_attention"] * 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 6,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 8,
        "linear_conv_kernel_dim": 4,
        "mamba_ssm_dtype": "bfloat16",
    },
}
TINY_MAMBA2 = {
    "model_type": "mamba2",
    "hidden_size": 64,
    "num_heads": 8,
    "head_dim": 16,
    "state_size": 16,
    "n_groups": 2,
    "num_hidden_layers": 3,
    "expand": 2,
    # SGLang's Mamba2Config reads intermediate_size, which HF's config does not define.
    "intermediate_size": 128,
}
TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 3,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
}


# =============================================================================== paper
def test_paper_7b_state_is_26_8_mb_and_409_tokens_of_kv():
    p = builtin_profile("paper-7b")
    assert (p.ssm_kind, p.n_ssm, p.n_attn, p.n_mlp, p.d_model, p.d_state) == ("paper", 24, 4, 28, D, N)
    per_layer = 2 * D * N + 2 * 4 * (2 * D + 2 * N)
    assert p.ssm_state_bytes() == 24 * per_layer == 26_787_840
    # The paper quotes 26.8 MB (decimal megabytes) per checkpoint.
    assert p.ssm_state_bytes() / 1e6 == pytest.approx(26.8, abs=0.05)
    # KV: 2 * l * D * 2 bytes per attention layer.
    assert p.kv_bytes_per_token == 4 * 2 * D * 2 == 65_536
    assert p.kv_bytes(10) == 10 * 65_536
    # "one SSM checkpoint weighs as much as ~409 tokens of KV": 408.75.
    assert p.state_kv_equivalent_tokens() == pytest.approx(408.75)
    assert round(p.state_kv_equivalent_tokens()) == 409


def test_paper_7b_flops_saved_by_hand():
    p = builtin_profile("paper-7b")
    # Node [0, 10): c = 10, no parent.
    mamba = 12 * 10 * D * D + 16 * 10 * D * N + 10 * 10 * D
    attn = 8 * 10 * D * D + 4 * 10 * 10 * D
    mlp = 16 * 10 * D * D
    assert 24 * mamba + 4 * attn + 28 * mlp == 130_878_668_800
    assert p.flops_saved(0, 10) == 130_878_668_800
    # Node [100, 110): attention is prefix-aware, attn(110) - attn(100); MLP(110) - MLP(100).
    attn_pa = (8 * 110 * D * D + 4 * 110**2 * D) - (8 * 100 * D * D + 4 * 100**2 * D)
    mlp_pa = 16 * 110 * D * D - 16 * 100 * D * D
    expected = 24 * mamba + 4 * attn_pa + 28 * mlp_pa
    assert expected == 131_009_740_800
    assert p.flops_saved(100, 110) == expected
    assert p.prefill_flops(100, 110) == expected
    # Bytes of that node: its 10 tokens of KV + one checkpoint.
    assert p.node_bytes(10, True) == 10 * 65_536 + 26_787_840
    assert p.node_bytes(10, False) == 10 * 65_536
    assert p.efficiency(100, 110) == pytest.approx(expected / (10 * 65_536 + 26_787_840))


def test_paper_efficiency_positive_for_long_parents_unlike_the_authors_bug():
    p = builtin_profile("paper-7b")
    P, T = 100_000, 100_032
    assert p.efficiency(P, T) > 0
    assert p.efficiency(P, T, has_state=False) > 0
    # The authors' code subtracted attn(P) in the MLP term: negative for long parents.
    c = T - P
    mamba = 12 * c * D * D + 16 * c * D * N + 10 * c * D
    attn = lambda l: 8 * l * D * D + 4 * l * l * D  # noqa: E731
    mlp = lambda l: 16 * l * D * D  # noqa: E731
    buggy = 24 * mamba + 4 * (attn(T) - attn(P)) + 28 * (mlp(T) - attn(P))
    assert buggy < 0


def test_paper_kind_custom_layer_mix():
    prof = from_hf_config(
        {"model_type": "marconi_paper", "hidden_size": 1024, "d_state": 16, "n_ssm_layers": 32, "n_attn_layers": 4}
    )
    assert (prof.n_ssm, prof.n_attn, prof.n_mlp) == (32, 4, 36)
    assert prof.ssm_state_bytes() == 32 * (2 * 1024 * 16 + 8 * (2 * 1024 + 2 * 16))
    assert prof.kv_bytes_per_token == 4 * 2 * 1024 * 2


# ======================================================================== FLOP algebra
ALL_PROFILE_FACTORIES = [(n, (lambda n=n: builtin_profile(n))) for n in BUILTIN_PROFILES] + [
    ("tiny-nemotron", lambda: from_hf_config(TINY_NEMOTRON)),
    ("tiny-falcon", lambda: from_hf_config(TINY_FALCON)),
    ("tiny-qwen3-next", lambda: from_hf_config(TINY_QWEN3_NEXT)),
    ("tiny-qwen3.5", lambda: from_hf_config(TINY_QWEN3_5)),
    ("tiny-mamba2", lambda: from_hf_config(TINY_MAMBA2)),
    ("tiny-llama", lambda: from_hf_config(TINY_LLAMA)),
]


@pytest.mark.parametrize("name,make", ALL_PROFILE_FACTORIES, ids=[n for n, _ in ALL_PROFILE_FACTORIES])
def test_flops_saved_is_additive_and_grows_as_replay_moves_back(name, make):
    p = make()
    for R, P, T in [(0, 0, 1), (0, 100, 164), (37, 512, 4096), (1000, 30_000, 30_016), (0, 131_072, 131_073)]:
        got = p.flops_saved(P, T, replay_from=R)
        assert got == pytest.approx(p.prefill_flops(R, P) + p.prefill_flops(P, T), rel=1e-12)
        assert p.prefill_flops_int(R, T) == p.prefill_flops_int(R, P) + p.prefill_flops_int(P, T)
        assert p.flops_saved(P, T) == p.prefill_flops(P, T) == p.flops_saved(P, T, replay_from=P)
    P, T = 8192, 8256
    saved = [p.flops_saved(P, T, replay_from=r) for r in (P, P - 1, 4096, 1024, 0)]
    assert all(a < b for a, b in zip(saved, saved[1:]))
    # Attention makes a token more expensive the later it sits (when there is attention).
    if p.n_attn:
        assert p.prefill_flops(10_000, 10_001) > p.prefill_flops(0, 1)
    else:
        assert p.prefill_flops(10_000, 10_001) == p.prefill_flops(0, 1)
    assert p.prefill_flops(5, 5) == 0.0
    # Efficiency is positive for long parents, with and without a state.
    assert p.efficiency(100_000, 100_032) > 0
    assert p.efficiency(100_000, 100_032, replay_from=50_000) > p.efficiency(100_000, 100_032)
    if p.n_attn:
        assert p.efficiency(100_000, 100_032, has_state=False) > 0


def test_argument_validation():
    p = builtin_profile("nemotron-h-8b")
    with pytest.raises(ValueError, match="replay_from"):
        p.flops_saved(10, 20, replay_from=11)
    with pytest.raises(ValueError, match="start"):
        p.prefill_flops(20, 10)
    with pytest.raises(ValueError, match="parent_len"):
        p.flops_saved(30, 20)
    with pytest.raises(ValueError, match="n_tokens"):
        p.kv_bytes(-1)


def test_zero_byte_node_has_zero_efficiency():
    p = from_hf_config(TINY_MAMBA2)  # no attention: a node without a state holds 0 bytes
    assert p.kv_bytes_per_token == 0
    assert p.node_bytes(100, False) == 0
    assert p.efficiency(0, 100, has_state=False) == 0.0
    assert p.efficiency(0, 100) > 0
    assert math.isinf(p.state_kv_equivalent_tokens())


def test_dense_llama_flops_are_twice_the_matmul_params_plus_causal_attention():
    p = from_hf_config(TINY_LLAMA)
    d, f, L, H, K = 64, 176, 3, 8, 2
    hd = d // H
    assert (p.n_attn, p.n_ssm, p.n_mlp, p.head_dim) == (L, 0, L, hd)
    params_per_layer = d * H * hd + 2 * d * K * hd + H * hd * d + 3 * d * f
    T = 50
    assert p.prefill_flops_int(0, T) == L * (2 * params_per_layer * T + 4 * H * hd * T * (T + 1) // 2)
    # Tokens [20, 50) with [0, 20) cached: queries at positions 20..49 attend to p + 1 keys.
    scores = 4 * H * hd * sum(pos + 1 for pos in range(20, 50))
    assert p.prefill_flops_int(20, 50) == L * (2 * params_per_layer * 30 + scores)
    assert p.kv_bytes_per_token == L * 2 * K * hd * 2


def test_moe_counts_active_experts_shared_expert_and_router():
    p = from_hf_config(TINY_QWEN3_NEXT)
    d = 64
    assert (p.n_moe, p.n_mlp, p.n_experts, p.experts_per_tok, p.n_shared_experts) == (8, 0, 8, 2, 1)
    per_tok = 2 * d * 8 + 2 * (3 * 2 * d * 32) + 3 * 2 * d * 32 + 2 * d
    assert p.moe_layer_flops(1) == per_tok
    assert p.moe_layer_flops(7) == 7 * per_tok
    # Gated attention doubles q_proj.
    assert p.attn_output_gate
    assert p.attention_layer_flops(0, 1) == 2 * d * (2 * 4 * 32 + 2 * 2 * 32) + 2 * 4 * 32 * d + 4 * 4 * 32


def test_mamba2_and_gdn_layer_flops_are_dominated_by_projections():
    nem = from_hf_config(TINY_NEMOTRON)
    inner, g, n, h = 8 * 16, 2, 16, 8
    proj = 2 * 64 * (2 * inner + 2 * g * n + h) + 2 * inner * 64
    assert proj < nem.ssm_layer_flops(1) < 2 * proj
    assert nem.mlp_gated is False and nem.mlp_layer_flops(1) == 2 * 2 * 64 * 96
    q35 = from_hf_config(TINY_QWEN3_5)
    key_dim, value_dim = 2 * 16, 6 * 8
    proj = 2 * 64 * (2 * key_dim + 2 * value_dim + 2 * 6) + 2 * value_dim * 64
    assert proj < q35.ssm_layer_flops(1) < 3 * proj
    # Real 7-9B hybrids: ~2 FLOPs per non-embedding parameter per token.
    for name, lo, hi in [("nemotron-h-8b", 13e9, 15e9), ("falcon-h1-7b", 12.5e9, 15e9),
                         ("qwen3.5-9b", 13e9, 15e9), ("qwen3-next-80b-a3b", 6e9, 7.5e9)]:
        assert lo < builtin_profile(name).prefill_flops(0, 1) < hi, name


# ================================================================= built-in profiles
def test_builtin_profiles_exist_and_load():
    files = sorted(p.stem for p in cm.PROFILES_DIR.glob("*.json"))
    assert files == sorted(BUILTIN_PROFILES)
    for name in BUILTIN_PROFILES:
        p = builtin_profile(name)
        assert p.name == name
        raw = json.loads((cm.PROFILES_DIR / f"{name}.json").read_text())
        assert "published" in raw["_comment"] or name == "paper-7b"
        assert CostProfile.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    with pytest.raises(ValueError, match="paper-7b.*nemotron-h-8b"):
        builtin_profile("llama-7b")


def test_builtin_profile_numbers():
    expect = {
        # name: (state bytes, KV bytes/token, n_ssm, n_attn)
        "nemotron-h-8b": (102_137_856, 16_384, 24, 4),
        "falcon-h1-7b": (139_358_208, 45_056, 44, 44),
        "qwen3-next-80b-a3b": (77_266_944, 24_576, 36, 12),
        "qwen3.5-9b": (51_511_296, 32_768, 24, 8),
    }
    for name, (state, kv, n_ssm, n_attn) in expect.items():
        p = builtin_profile(name)
        assert (p.ssm_state_bytes(), p.kv_bytes_per_token, p.n_ssm, p.n_attn) == (state, kv, n_ssm, n_attn), name
    assert builtin_profile("nemotron-h-8b").n_mlp == 24
    q = builtin_profile("qwen3-next-80b-a3b")
    assert (q.n_moe, q.n_experts, q.experts_per_tok, q.shared_d_ff, q.ssm_kind) == (48, 512, 10, 512, "gdn")


# ====================================================================== SGLang parity
@pytest.fixture(scope="module")
def sgl():
    """SGLang's config classes and a tp=1 parallel context (imported only here)."""
    pytest.importorskip("torch")
    pytest.importorskip("sglang.srt.configs.mamba_utils")
    from sglang.srt.configs import mamba_utils
    from sglang.srt.configs.falcon_h1 import FalconH1Config
    from sglang.srt.configs.mamba2 import Mamba2Config
    from sglang.srt.configs.nemotron_h import NemotronHConfig
    from sglang.srt.configs.qwen3_5 import Qwen3_5Config
    from sglang.srt.configs.qwen3_next import Qwen3NextConfig
    from sglang.srt.runtime_context import get_parallel

    classes = {
        "nemotron_h": NemotronHConfig,
        "falcon_h1": FalconH1Config,
        "qwen3_next": Qwen3NextConfig,
        "qwen3_5": Qwen3_5Config,
        "mamba2": Mamba2Config,
    }

    def cache_params(cfg: dict):
        cfg = copy.deepcopy(cfg)
        cls = classes[cfg["model_type"]]
        with get_parallel().override(attn_tp_size=1, tp_size=1, enable_cp_tp_group_sharing=False):
            obj = cls(**cfg)
            text = getattr(obj, "text_config", obj)
            params = text.mamba2_cache_params
            n_full = len(list(text.full_attention_layer_ids))
        return text, params, n_full

    return cache_params, mamba_utils


def _sglang_state_bytes_by_hand(params) -> int:
    """Sum over SGLang's shapes x dtype sizes x layers (what MambaPool allocates per slot)."""
    conv = sum(math.prod(s) for s in params.shape.conv) * params.dtype.conv.itemsize
    temporal = math.prod(params.shape.temporal) * params.dtype.temporal.itemsize
    return (conv + temporal) * len(params.layers)


PARITY_CASES = [(n, lambda n=n: _profile_cfg(n)) for n in REAL_BUILTINS] + [
    ("tiny-nemotron", lambda: TINY_NEMOTRON),
    ("tiny-falcon", lambda: TINY_FALCON),
    ("tiny-qwen3-next", lambda: TINY_QWEN3_NEXT),
    ("tiny-qwen3.5-bf16-ssm", lambda: TINY_QWEN3_5),
    ("tiny-mamba2", lambda: TINY_MAMBA2),
]


@pytest.mark.parametrize("name,get_cfg", PARITY_CASES, ids=[n for n, _ in PARITY_CASES])
def test_ssm_state_bytes_match_sglang(sgl, name, get_cfg):
    cache_params, _ = sgl
    cfg = get_cfg()
    text, params, n_full = cache_params(cfg)
    prof = from_hf_config(cfg)
    assert prof.ssm_state_bytes() == params.mamba_cache_per_req == _sglang_state_bytes_by_hand(params)
    assert prof.n_ssm == len(params.layers)
    assert prof.conv_dtype_bytes == params.dtype.conv.itemsize
    assert prof.ssm_dtype_bytes == params.dtype.temporal.itemsize
    assert prof.ssm_conv_dim == params.shape.conv_dim
    assert (prof.ssm_heads, prof.ssm_head_dim, prof.d_state) == tuple(params.shape.temporal)
    assert prof.conv_kernel == params.shape.conv_kernel
    # KV: num_kv_heads * head_dim * 2 (K, V) * n_attn * dtype bytes per token.
    assert prof.n_attn == n_full
    if n_full:
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        assert prof.kv_bytes_per_token == text.num_key_value_heads * head_dim * 2 * n_full * 2
        assert prof.kv_bytes(1000) == 1000 * prof.kv_bytes_per_token


@pytest.mark.parametrize("env_dtype,nbytes", [("float16", 2), ("bfloat16", 2), ("float32", 4)])
def test_ssm_dtype_env_override_matches_sglang(sgl, monkeypatch, env_dtype, nbytes):
    cache_params, _ = sgl
    monkeypatch.setenv("SGLANG_MAMBA_SSM_DTYPE", env_dtype)
    for cfg in (_profile_cfg("nemotron-h-8b"), TINY_QWEN3_5):
        _, params, _ = cache_params(cfg)
        prof = from_hf_config(cfg)
        assert prof.ssm_dtype_bytes == nbytes == params.dtype.temporal.itemsize
        assert prof.ssm_state_bytes() == params.mamba_cache_per_req


def test_builtin_profile_follows_dtype_env(monkeypatch):
    default = builtin_profile("qwen3.5-9b")
    monkeypatch.setenv("SGLANG_MAMBA_SSM_DTYPE", "bfloat16")
    half = builtin_profile("qwen3.5-9b")
    assert (default.ssm_dtype_bytes, half.ssm_dtype_bytes) == (4, 2)
    assert half.ssm_state_bytes() < default.ssm_state_bytes()
    monkeypatch.delenv("SGLANG_MAMBA_SSM_DTYPE")
    assert builtin_profile("qwen3.5-9b") == default


def test_explicit_dtype_arguments():
    p = from_hf_config(TINY_NEMOTRON, ssm_dtype="bfloat16", conv_dtype="float32", kv_dtype="fp8_e4m3")
    assert (p.ssm_dtype_bytes, p.conv_dtype_bytes, p.kv_dtype_bytes) == (2, 4, 1)
    assert from_hf_config(TINY_QWEN3_5).ssm_dtype_bytes == 2  # config's mamba_ssm_dtype
    with pytest.raises(ValueError, match="kv_dtype"):
        from_hf_config(TINY_NEMOTRON, kv_dtype="int3")


# ===================================================================== config parsing
def test_nemotron_transformers5_layer_names_match_the_pattern():
    base = from_hf_config(TINY_NEMOTRON)
    cfg = dict(TINY_NEMOTRON)
    del cfg["hybrid_override_pattern"]
    names = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
    cfg["layers_block_type"] = [names[ch] for ch in TINY_NEMOTRON["hybrid_override_pattern"]]
    cfg["mamba_n_groups"] = cfg.pop("n_groups")
    assert from_hf_config(cfg) == base
    cfg["layer_types"] = cfg.pop("layers_block_type")
    assert from_hf_config(cfg) == base
    sglang_names = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
    cfg["layer_types"] = [sglang_names[ch] for ch in TINY_NEMOTRON["hybrid_override_pattern"]]
    assert from_hf_config(cfg) == base
    assert (base.n_ssm, base.n_attn, base.n_mlp, base.n_moe) == (3, 1, 1, 1)


def test_from_path_and_model_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_FALCON))
    a = from_hf_config(tmp_path)
    b = from_hf_config(str(tmp_path / "config.json"), name="falcon-tiny")
    assert a.ssm_state_bytes() == b.ssm_state_bytes()
    assert b.name == "falcon-tiny"
    assert a.name == "falcon_h1"
    assert from_hf_config({**TINY_FALCON, "_name_or_path": "tiiuae/tiny"}).name == "tiiuae/tiny"
    # Falcon-H1: attention, Mamba2 and MLP in every layer.
    assert (a.n_attn, a.n_ssm, a.n_mlp) == (3, 3, 3)


def test_architectures_without_model_type():
    cfg = dict(TINY_LLAMA)
    del cfg["model_type"]
    cfg["architectures"] = ["LlamaForCausalLM"]
    assert from_hf_config(cfg) == from_hf_config(TINY_LLAMA)


def test_state_spaces_mamba_ssm_config():
    cfg = {
        "d_model": 256,
        "n_layer": 8,
        "d_intermediate": 512,
        "ssm_cfg": {"layer": "Mamba2", "d_state": 64, "headdim": 32, "ngroups": 1},
        "attn_layer_idx": [3, 7],
        "attn_cfg": {"num_heads": 8, "num_heads_kv": 2, "head_dim": 32},
    }
    p = from_hf_config(cfg)
    assert (p.n_ssm, p.n_attn, p.n_mlp, p.ssm_heads) == (6, 2, 8, 16)
    assert p.ssm_state_bytes() == 6 * ((512 + 2 * 64) * 3 * 2 + 16 * 32 * 64 * 4)


@pytest.mark.parametrize(
    "cfg,field",
    [
        ({"model_type": "jamba", "hidden_size": 8}, "model_type"),
        ({"architectures": ["JambaForCausalLM"]}, "architectures"),
        ({"hidden_size": 8}, "model_type"),
        ({k: v for k, v in TINY_NEMOTRON.items() if k != "hidden_size"}, "hidden_size"),
        ({**TINY_NEMOTRON, "hybrid_override_pattern": "M*X-"}, r"hybrid_override_pattern\[2\]"),
        ({**{k: v for k, v in TINY_NEMOTRON.items() if k != "hybrid_override_pattern"},
          "layers_block_type": ["mamba", "retention"]}, r"layers_block_type\[1\]"),
        ({**TINY_NEMOTRON, "mamba_num_heads": "eight"}, "mamba_num_heads"),
        ({**TINY_NEMOTRON, "ssm_state_size": 0}, "ssm_state_size"),
        ({**TINY_NEMOTRON, "mamba_n_groups": 4}, "n_groups|mamba_n_groups"),
        ({**TINY_FALCON, "mamba_d_head": 7}, "mamba_d_head"),
        ({**TINY_QWEN3_NEXT, "linear_num_key_heads": 3}, "linear_num_key_heads"),
        ({**TINY_QWEN3_NEXT, "full_attention_interval": None}, "full_attention_interval"),
        ({**TINY_QWEN3_NEXT, "layer_types": ["full_attention"] * 8}, "layer_types"),
        ({**TINY_LLAMA, "num_key_value_heads": 3}, "num_key_value_heads"),
        ({"model_type": "qwen3_5", "text_config": {**TINY_QWEN3_5["text_config"], "model_type": "llama"}},
         "text_config.model_type"),
        ({"model_type": "marconi_paper", "hidden_size": 4096, "d_state": 128, "n_ssm_layers": 24}, "n_attn_layers"),
        ({"model_type": 5}, "model_type"),
    ],
)
def test_bad_config_raises_value_error_naming_the_field(cfg, field):
    with pytest.raises(ValueError, match=field) as info:
        from_hf_config(cfg)
    assert "\n" not in str(info.value)


def test_bad_paths_and_inputs(tmp_path):
    with pytest.raises(ValueError, match="config"):
        from_hf_config(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        from_hf_config(tmp_path)
    with pytest.raises(ValueError, match="config"):
        from_hf_config(42)  # type: ignore[arg-type]


def test_costprofile_validation():
    with pytest.raises(ValueError, match="ssm_kind"):
        CostProfile(name="x", d_model=8, n_attn=0, n_ssm=0, ssm_kind="rwkv")
    with pytest.raises(ValueError, match="d_state"):
        CostProfile(name="x", d_model=8, n_attn=0, n_ssm=2, ssm_kind="mamba2", ssm_heads=2, ssm_head_dim=4, n_groups=1)
    with pytest.raises(ValueError, match="unknown CostProfile field"):
        CostProfile.from_dict({**builtin_profile("paper-7b").to_dict(), "bogus": 1})


def test_module_imports_neither_torch_nor_sglang():
    path = Path(cm.__file__)
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('cost_model_standalone', {str(path)!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules[spec.name] = m; spec.loader.exec_module(m)\n"
        "p = m.builtin_profile('qwen3.5-9b'); assert p.ssm_state_bytes() > 0\n"
        "bad = [k for k in sys.modules if k.split('.')[0] in ('torch', 'sglang', 'numpy', 'transformers')]\n"
        "assert not bad, bad\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)
