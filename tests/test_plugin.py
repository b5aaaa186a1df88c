"""The plugin is discovered through SGLang's entry point, and
``--radix-cache-backend marconi`` makes SGLang build a MarconiRadixCache."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest


def test_entry_point_is_declared():
    eps = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == "marconi"]
    assert len(eps) == 1
    assert eps[0].value == "sglang_marconi.plugin:register"
    assert eps[0].dist.name == "sglang-marconi"


def test_sglang_load_plugins_registers_backend():
    import sglang.srt.plugins as plugins
    from sglang.srt.mem_cache.registry import get_radix_cache_factory, registered_radix_cache_backends

    plugins._plugins_loaded = False
    plugins.load_plugins()
    assert "marconi" in registered_radix_cache_backends()
    from sglang_marconi.sglang_backend.factory import marconi_factory

    assert get_radix_cache_factory("marconi") is marconi_factory
    # Registering twice (every SGLang process loads plugins) is harmless.
    from sglang_marconi.plugin import register

    register()
    assert registered_radix_cache_backends().count("marconi") == 1


def _ctx(built_params, server_args, *, hybrid_ssm=True, hf_config=None):
    from types import SimpleNamespace

    from sglang.srt.mem_cache.registry import TreeCacheBuildContext

    return TreeCacheBuildContext(
        server_args=server_args,
        params=built_params,
        is_hybrid_swa=False,
        is_hybrid_ssm=hybrid_ssm,
        enable_hierarchical_cache=False,
        disable_radix_cache=False,
        tp_worker=None,
        model_config=SimpleNamespace(hf_config=hf_config),
        tp_size=1,
        tp_rank=0,
        tp_group=None,
    )


def _params(eviction_policy_config=None, enable_kv_cache_events=False):
    """CacheInitParams on real pools, as the scheduler's kv_cache_builder makes them."""
    from sglang_marconi.sglang_backend.pools import build_hybrid_cache

    built = build_hybrid_cache(kv_slots=256, mamba_slots=8)
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.unified_cache.components.base import ComponentType

    return CacheInitParams(
        req_to_token_pool=built.req_to_token_pool,
        token_to_kv_pool_allocator=built.kv_allocator,
        page_size=1,
        disable=False,
        tree_components=(ComponentType.FULL, ComponentType.MAMBA),
        eviction_policy_config=eviction_policy_config,
        enable_kv_cache_events=enable_kv_cache_events,  # the scheduler: --kv-events-config given
    )


@pytest.fixture
def server_args_marconi():
    """Global ServerArgs as `launch_server --radix-cache-backend marconi` leaves them."""
    from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler

    import sglang_marconi.plugin

    sglang_marconi.plugin.register()
    args = ServerArgs(model_path="dummy", page_size=1, radix_cache_backend="marconi")
    args._mamba_cache_chunk_size = 64
    set_global_server_args_for_scheduler(args)
    yield args
    plain = ServerArgs(model_path="dummy", page_size=1)
    plain._mamba_cache_chunk_size = 64
    set_global_server_args_for_scheduler(plain)


def test_cli_flag_parses():
    from sglang.srt.server_args import ServerArgs
    import argparse

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    ns = parser.parse_args(
        ["--model-path", "dummy", "--radix-cache-backend", "marconi",
         "--radix-eviction-policy-config", '{"variant": "paper", "alpha": 0.5}']
    )
    assert ns.radix_cache_backend == "marconi"
    from sglang_marconi.policy.config import parse_server_config

    cfg = parse_server_config(ns.radix_eviction_policy_config)
    assert cfg.alpha == 0.5 and cfg.variant == "paper"


def test_create_tree_cache_builds_marconi(server_args_marconi):
    from sglang.srt.mem_cache.registry import create_tree_cache

    from sglang_marconi.sglang_backend.cache import MarconiRadixCache
    from sglang_marconi.sglang_backend.components import MarconiFullComponent, MarconiMambaComponent
    from sglang.srt.mem_cache.unified_cache.components.base import ComponentType

    cache = create_tree_cache(_ctx(_params({"variant": "paper", "alpha": 0.7, "profile": "nemotron-h-8b"}), server_args_marconi))
    assert isinstance(cache, MarconiRadixCache)
    assert isinstance(cache.components[ComponentType.FULL], MarconiFullComponent)
    assert isinstance(cache.components[ComponentType.MAMBA], MarconiMambaComponent)
    assert cache.marconi.alpha == 0.7
    assert cache.marconi.profile.name == "nemotron-h-8b"
    assert cache.supports_mamba()


def test_kv_events_config_switches_on_state_path_events(server_args_marconi):
    """With --kv-events-config the scheduler builds the cache with events on: the Marconi
    cache publishes through StatePathEvents; without, SGLang's recorder stays (disabled)."""
    from sglang.srt.mem_cache.events import KVCacheEventRecorder
    from sglang.srt.mem_cache.registry import create_tree_cache

    from sglang_marconi.sglang_backend.events import StatePathEvents

    on = create_tree_cache(_ctx(_params(enable_kv_cache_events=True), server_args_marconi))
    assert isinstance(on.tree_core.kv_events, StatePathEvents) and on.state_events is on.tree_core.kv_events
    assert on.tree_core.kv_events.enabled
    off = create_tree_cache(_ctx(_params(), server_args_marconi))
    assert off.state_events is None and type(off.tree_core.kv_events) is KVCacheEventRecorder
    assert not off.tree_core.kv_events.enabled


def test_profile_defaults_to_served_model_config(server_args_marconi):
    from sglang.srt.mem_cache.registry import create_tree_cache
    from sglang_marconi.policy.cost_model import load_config_dict, PROFILES_DIR

    hf = load_config_dict(PROFILES_DIR / "nemotron-h-8b.json")
    cache = create_tree_cache(_ctx(_params({}), server_args_marconi, hf_config=hf))
    from sglang_marconi.policy import builtin_profile

    assert cache.marconi.profile.ssm_state_bytes() == builtin_profile("nemotron-h-8b").ssm_state_bytes()


@pytest.mark.parametrize(
    "cfg, needle",
    [
        ({"alpah": 1}, "unknown key 'alpah'"),
        ({"variant": "paper", "alpha": -1}, "alpha=-1"),
        ({"alpha": 0.5}, "alpha=0.5 weighs the paper's utility"),
        ({"window_multiplier": 0}, "key 'window_multiplier' was removed"),
        ({"profile": "no-such-model"}, "profile='no-such-model'"),
        ({"branch_points": "nearby"}, "branch_points='nearby'"),
        ("{not json", "not valid JSON"),
        ({"input_state": "yes"}, "key 'input_state' was removed"),
        ({"utility_form": "lhd"}, "key 'utility_form' was removed"),
        ({"variant": "paper", "tuner": "gpu"}, "tuner='gpu' must be one of"),
    ],
)
def test_bad_config_stops_startup_with_one_line(server_args_marconi, cfg, needle):
    from sglang.srt.mem_cache.registry import create_tree_cache

    with pytest.raises(ValueError) as ei:
        create_tree_cache(_ctx(_params(cfg), server_args_marconi))
    msg = str(ei.value)
    assert needle in msg and "\n" not in msg


def test_non_hybrid_model_is_refused(server_args_marconi):
    from sglang.srt.mem_cache.registry import create_tree_cache

    with pytest.raises(ValueError, match="no SSM layers"):
        create_tree_cache(_ctx(_params(), server_args_marconi, hybrid_ssm=False))


# ------------------------------------------------ prefill cut at the branch point


class _Adder:
    def __init__(self, marconi=True, rem=4096, chunked=None):
        self.tree_cache = type("T", (), {"marconi": object() if marconi else None})()
        self.rem_chunk_tokens = rem
        self.new_chunked_req = chunked


class _Req:
    def __init__(self, branch, admitted=False):
        self.mamba_branching_seqlen = branch
        if admitted:
            self.marconi_branch_admitted = True


def test_prefill_cut_ends_the_first_chunk_at_the_branch_point():
    from sglang.srt.managers.schedule_policy import _PrefillAdmission

    from sglang_marconi.plugin import cut_prefill_at_branch_point

    adm = _PrefillAdmission(prefix_len=10, extend_len=90, max_new_tokens=16, is_chunked=False, replay_len=0)
    adder = _Adder()
    out = cut_prefill_at_branch_point(adm, adder, _Req(40))
    assert out == _PrefillAdmission(10, 30, 0, True, 0)  # chunk [10, 40), no decode yet
    assert adder.rem_chunk_tokens == 30  # the batch takes nothing after this chunk
    # left alone: branch outside (prefix, end), already admitted, not a Marconi tree,
    # chunking off, another chunked request pending, a verdict instead of an admission
    for a, req in (
        (_Adder(), _Req(None)), (_Adder(), _Req(10)), (_Adder(), _Req(100)), (_Adder(), _Req(120)),
        (_Adder(), _Req(40, admitted=True)), (_Adder(marconi=False), _Req(40)), (_Adder(rem=None), _Req(40)),
        (_Adder(chunked=object()), _Req(40)),
    ):
        assert cut_prefill_at_branch_point(adm, a, req) is None
    assert cut_prefill_at_branch_point("NO_TOKEN", _Adder(), _Req(40)) is None


def test_prefill_cut_hook_is_registered():
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from sglang_marconi import plugin

    plugin.register()
    hooks = HookRegistry._hooks["sglang.srt.managers.schedule_policy.PrefillAdder._select_prefill_admission"]
    assert any(h is plugin.cut_prefill_at_branch_point and t == HookType.AFTER for t, h, _ in hooks)
