"""KV cache events for resumable prefixes only (``--kv-events-config`` on a Marconi replica).

SGLang's ``KVCacheEventRecorder`` publishes every KV page the tree gains. On a
hybrid model a KV prefix is a cache hit only up to the deepest SSM state on it,
so a router scoring those events (SMG's event-driven ``cache_aware`` mode)
counts KV whose state Marconi never admitted or already evicted.
:class:`StatePathEvents` replaces the tree core's recorder and publishes the
set of nodes that have a state-holding node in their subtree (the node itself
included): the union of the paths root → every stored state.

* a node gains a state and no published path covers it: ``BlockStored`` for
  the unpublished nodes of root → node, top down (SGLang's own
  ``record_store``, so hashes and parent links chain as SGLang computes them);
* a state is evicted, or a published node's KV is: ``BlockRemoved`` for each
  node of the path under which no state remains, bottom up;
* the tree core's own store calls (KV gained, with or without a state) publish
  nothing; its remove calls publish only for a published node.

The flag ``marconi_published`` lives on the node (a split gives it to both
halves: ``MarconiMambaComponent.redistribute_on_node_split``).
"""

from __future__ import annotations

from typing import Any, Optional

from sglang.srt.disaggregation.kv_events import StorageMedium
from sglang.srt.mem_cache.events import KVCacheEventRecorder
from sglang.srt.mem_cache.unified_cache.components.base import ComponentType

PUBLISHED = "marconi_published"
MAMBA = ComponentType.MAMBA


def _published(node) -> bool:
    return getattr(node, PUBLISHED, False)


class StatePathEvents(KVCacheEventRecorder):
    @classmethod
    def replacing(cls, stock: KVCacheEventRecorder) -> "StatePathEvents":
        """The same settings and pending queue as the tree core's ``stock`` recorder."""
        new = cls(
            enabled=stock.enabled,
            page_size=stock.page_size,
            dynamo_format=stock.dynamo_format,
            lora_names=stock.lora_names,
        )
        new._queue = stock._queue
        return new

    # -- the tree core's calls ------------------------------------------------
    def record_store(self, node: Any, medium=None, *, session_id: Optional[str] = None) -> None:
        """KV entered the tree: a path is published only when a state lands on it."""

    def record_remove(self, node: Any, medium=None) -> None:
        """``node``'s KV left the tree (a deleted leaf: nothing lies under it)."""
        if medium not in (None, StorageMedium.GPU) or not _published(node):
            return
        self._unpublish(node)
        self._prune(node.parent)

    # -- the MAMBA component's calls -------------------------------------------
    def state_gained(self, node: Any) -> None:
        path = []
        while node.parent is not None and not _published(node):
            path.append(node)
            node = node.parent
        for n in reversed(path):
            super().record_store(n)
            setattr(n, PUBLISHED, True)

    def state_lost(self, node: Any) -> None:
        self._prune(node)

    # -------------------------------------------------------------------------
    def _prune(self, node: Any) -> None:
        """Unpublish ``node`` and its ancestors while no state lies under them."""
        while (
            node is not None
            and node.parent is not None
            and _published(node)
            and node.component_data[MAMBA].value is None
            and not any(_published(c) for c in node.children.values())
        ):
            self._unpublish(node)
            node = node.parent

    def _unpublish(self, node: Any) -> None:
        super().record_remove(node)
        setattr(node, PUBLISHED, False)


__all__ = ["StatePathEvents"]
