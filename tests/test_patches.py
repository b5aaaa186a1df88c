"""The patch series in patches/ applies cleanly to the pinned SGLang release
(the installed sglang==0.5.23 sources, laid out as SGLang's repo: python/sglang/...),
and the patched registry resolves the marconi backend."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATCHES = ROOT / "patches"


def _series() -> list[Path]:
    names = [l.strip() for l in (PATCHES / "series").read_text().splitlines() if l.strip() and not l.startswith("#")]
    return [PATCHES / n for n in names]


def _touched(patch: Path) -> list[str]:
    return [l[len("+++ b/"):].strip() for l in patch.read_text().splitlines() if l.startswith("+++ b/")]


@pytest.fixture
def release_tree(tmp_path):
    import sglang

    assert version("sglang") == "0.5.23"
    site = Path(sglang.__file__).resolve().parents[1]
    for patch in _series():
        for rel in _touched(patch):
            assert rel.startswith("python/"), rel
            dst = tmp_path / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(site / rel[len("python/"):], dst)
    return tmp_path


def test_series_lists_every_patch():
    assert sorted(p.name for p in PATCHES.glob("*.patch")) == sorted(p.name for p in _series())


def test_series_applies_cleanly(release_tree):
    for patch in _series():
        r = subprocess.run(
            ["patch", "-p1", "--forward", "--batch", "-F0", "-i", str(patch)],
            cwd=release_tree, capture_output=True, text=True,
        )
        assert r.returncode == 0, f"{patch.name}: {r.stdout}{r.stderr}"
        assert "offset" not in r.stdout and "fuzz" not in r.stdout, r.stdout


def test_patched_registry_resolves_marconi(release_tree):
    for patch in _series():
        subprocess.run(["patch", "-p1", "--batch", "-i", str(patch)], cwd=release_tree, check=True, capture_output=True)
    path = release_tree / "python/sglang/srt/mem_cache/registry.py"
    spec = importlib.util.spec_from_file_location("patched_sglang_registry", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve their module through sys.modules
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.modules.pop(spec.name, None)
    assert mod.get_radix_cache_factory("marconi") is None
    mod._register_marconi()
    from sglang_marconi.sglang_backend.factory import marconi_factory

    assert mod.get_radix_cache_factory("marconi") is marconi_factory
