"""The radix tree of token ids behind :class:`~kvstream.stores.radix.RadixStore`: plain Python, no tensors, no files.

Each edge is a run of token ids; a node owns the KV of its edge's tokens as the slice
``[offset, offset + len(edge))`` of a named **blob** (the store holds the blob's memory; the tree only
counts its tokens, bytes and the nodes that slice it). Splitting a node copies nothing: both halves slice
the same blob, which lives while any node refers to it. Only leaves are evicted (least recently used
first, SGLang's ``RadixCache``), so a pin on the deepest node of a match protects the whole path. Pins
are counted per owner (a process), so that the shared mode can drop the pins of a process that died.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from ..match import PinError

#: Owner of the pin an insert holds on its parent while it evicts (the parent must not go).
INSERT_OWNER = "__insert__"


class Node:
    """One edge of the tree and the slice of a blob that holds its tokens' KV.

    Attributes
    ----------
    id : int
        Unique in its tree (the root is 0).
    parent : Node or None
        ``None`` for the root only.
    edge : tuple of int
        The token ids of this edge (empty for the root).
    children : dict of int to Node
        Children by the first token of their edge.
    blob : str or None
        The blob holding this edge's KV (``None`` for the root); ``offset`` is its first token there.
    last_access : int
        The tree's clock when the node was last used (LRU order).
    pins : dict of str to int
        Pins by owner; a pinned node is never evicted.
    """

    __slots__ = ("id", "parent", "edge", "children", "blob", "offset", "last_access", "pins")

    def __init__(self, id_: int, parent: "Node | None", edge: tuple[int, ...], blob: str | None, offset: int,
                 last_access: int):
        self.id = id_
        self.parent = parent
        self.edge = edge
        self.children: dict[int, Node] = {}
        self.blob = blob
        self.offset = offset
        self.last_access = last_access
        self.pins: dict[str, int] = {}

    def pin_count(self) -> int:
        """Pins held on this node by every owner."""
        return sum(self.pins.values())


class Tree:
    """Nodes, blobs and the LRU clock of a radix store.

    Attributes
    ----------
    root : Node
        The empty edge every sequence starts from.
    nodes : dict of int to Node
        Every node by id, the root included.
    blobs : dict of str to list
        ``name -> [tokens, nbytes, nodes that slice it]``.
    used_bytes : int
        Sum of the blobs' bytes.
    layout : object or None
        What the store keeps with the tree (its :class:`~kvstream.layout.KVLayout`); the tree does not
        look at it.
    namespace : str or None
        The namespace (model fingerprint) of the KV in the tree, set with the layout; not looked at either.
    """

    def __init__(self) -> None:
        self.root = Node(0, None, (), None, 0, 0)
        self.nodes: dict[int, Node] = {0: self.root}
        self.blobs: dict[str, list[int]] = {}
        self.used_bytes = 0
        self.tick = 0
        self.next_id = 1
        self.layout: Any = None
        self.namespace: str | None = None

    # -- matching --------------------------------------------------------------------------------------
    def walk(self, ids: Sequence[int]) -> tuple[list[tuple[Node, int]], int]:
        """Longest prefix of ``ids`` in the tree: the ``(node, tokens used of its edge)`` path and its length."""
        path: list[tuple[Node, int]] = []
        node, i, n = self.root, 0, len(ids)
        while i < n:
            child = node.children.get(ids[i])
            if child is None:
                break
            edge = child.edge
            k = 1
            limit = min(len(edge), n - i)
            while k < limit and edge[k] == ids[i + k]:
                k += 1
            path.append((child, k))
            i += k
            if k < len(edge):
                break
            node = child
        return path, i

    def touch(self, path: list[tuple[Node, int]]) -> None:
        """Mark the nodes of ``path`` used now (LRU order)."""
        self.tick += 1
        for node, _ in path:
            node.last_access = self.tick

    # -- structure -------------------------------------------------------------------------------------
    def split(self, node: Node, k: int) -> Node:
        """Split ``node``'s edge after ``k`` tokens; returns the new upper node (no data is copied)."""
        upper = Node(self.next_id, node.parent, node.edge[:k], node.blob, node.offset, node.last_access)
        self.next_id += 1
        self.nodes[upper.id] = upper
        node.parent.children[upper.edge[0]] = upper
        node.edge = node.edge[k:]
        node.offset += k
        node.parent = upper
        upper.children[node.edge[0]] = node
        self.blobs[upper.blob][2] += 1
        return upper

    def add_child(self, parent: Node, edge: tuple[int, ...], blob: str, offset: int) -> Node:
        """Attach a new node for ``edge`` (tokens ``[offset, ...)`` of ``blob``) under ``parent``."""
        self.tick += 1
        node = Node(self.next_id, parent, edge, blob, offset, self.tick)
        self.next_id += 1
        self.nodes[node.id] = node
        parent.children[edge[0]] = node
        self.blobs[blob][2] += 1
        return node

    def add_blob(self, name: str, tokens: int, nbytes: int) -> None:
        """Record a blob of ``tokens`` tokens and ``nbytes`` bytes (no node slices it yet)."""
        self.blobs[name] = [tokens, nbytes, 0]
        self.used_bytes += nbytes

    def drop_blob(self, name: str) -> None:
        """Forget a blob."""
        self.used_bytes -= self.blobs.pop(name)[1]

    def evict(self, need_bytes: int, capacity_bytes: int, keep: Callable[[Node], bool] | None = None) -> list[str]:
        """Remove unpinned leaves, least recently used first, until ``need_bytes`` more fit.

        A parent whose last child went becomes a leaf and may go next (empty branches are pruned).
        ``keep(leaf)``, called before a leaf goes (while its path is intact), may return ``True`` to keep
        it (a write-back store whose lower tier could not take it). Returns the names of blobs that lost
        their last node (the caller frees their memory).
        """
        freed: list[str] = []
        kept: set[int] = set()
        while self.used_bytes + need_bytes > capacity_bytes:
            leaves = sorted((n for n in self.nodes.values()
                             if n is not self.root and not n.children and not n.pins and n.id not in kept),
                            key=lambda n: (n.last_access, n.id))
            if not leaves:
                break
            progressed = False
            for leaf in leaves:
                if self.used_bytes + need_bytes <= capacity_bytes:
                    break
                if keep is not None and keep(leaf):
                    kept.add(leaf.id)
                    continue
                del leaf.parent.children[leaf.edge[0]]
                del self.nodes[leaf.id]
                blob = self.blobs[leaf.blob]
                blob[2] -= 1
                if blob[2] == 0:
                    self.drop_blob(leaf.blob)
                    freed.append(leaf.blob)
                progressed = True
            if not progressed:
                break
        return freed

    # -- pins --------------------------------------------------------------------------------------------
    @staticmethod
    def pin(node: Node, owner: str) -> None:
        """Add one pin of ``owner`` on ``node``."""
        node.pins[owner] = node.pins.get(owner, 0) + 1

    def unpin(self, node_id: int, owner: str) -> None:
        """Remove one pin of ``owner``.

        Raises
        ------
        PinError
            If the node is gone or ``owner`` holds no pin on it (a count never goes below zero).
        """
        node = self.nodes.get(node_id)
        if node is None:
            raise PinError(f"RadixStore: pinned node {node_id} is gone (was the store unlinked or this process's "
                           "pins dropped as dead?)")
        count = node.pins.get(owner, 0)
        if count <= 0:
            raise PinError(f"RadixStore: unpin of node {node_id} by {owner!r} would drive its pin count below zero")
        if count == 1:
            del node.pins[owner]
        else:
            node.pins[owner] = count - 1

    def drop_pins(self, owner: str) -> None:
        """Remove every pin of ``owner`` (a process that closed its store or died)."""
        for node in self.nodes.values():
            node.pins.pop(owner, None)

    # -- reading it out ----------------------------------------------------------------------------------
    @staticmethod
    def path_to(node: Node) -> list[Node]:
        """The nodes from the root's child down to ``node``."""
        path = []
        while node.parent is not None:
            path.append(node)
            node = node.parent
        return path[::-1]

    def sequences(self) -> list[tuple[int, ...]]:
        """Every root-to-leaf token sequence, sorted."""
        out: list[tuple[int, ...]] = []
        stack = [(self.root, ())]
        while stack:
            node, prefix = stack.pop()
            seq = prefix + node.edge
            if not node.children and node is not self.root:
                out.append(seq)
            stack.extend((child, seq) for child in node.children.values())
        return sorted(out)

    def to_json(self) -> dict:
        """The tree as a JSON-able dict: ``tick``, ``next_id``, ``blobs`` (name -> [tokens, nbytes]), ``nodes``.

        Each node is ``[id, parent id, edge, blob, offset, last_access, pins]``; the root is implied.
        """
        nodes = [[n.id, n.parent.id, list(n.edge), n.blob, n.offset, n.last_access, n.pins]
                 for n in self.nodes.values() if n is not self.root]
        return {"tick": self.tick, "next_id": self.next_id, "blobs": {k: v[:2] for k, v in self.blobs.items()},
                "nodes": nodes}

    @classmethod
    def from_json(cls, doc: dict) -> "Tree":
        """Rebuild a tree from :meth:`to_json`'s dict (other keys of ``doc`` are ignored)."""
        tree = cls()
        tree.tick, tree.next_id = int(doc["tick"]), int(doc["next_id"])
        for name, (tokens, nbytes) in doc["blobs"].items():
            tree.add_blob(name, int(tokens), int(nbytes))
        rows = sorted(doc["nodes"], key=lambda r: r[0])
        for id_, _, edge, blob, offset, last, pins in rows:
            tree.nodes[id_] = Node(id_, None, tuple(edge), blob, offset, last)
            tree.nodes[id_].pins = {str(k): int(v) for k, v in pins.items()}
        for id_, parent_id, *_ in rows:
            node, parent = tree.nodes[id_], tree.nodes[parent_id]
            node.parent = parent
            parent.children[node.edge[0]] = node
            tree.blobs[node.blob][2] += 1
        return tree

    def stats(self) -> dict:
        """Counts: nodes, blobs, tokens, used bytes, pinned nodes and pins (every owner)."""
        nodes = [n for n in self.nodes.values() if n is not self.root]
        return {"nodes": len(nodes), "blobs": len(self.blobs), "tokens": sum(len(n.edge) for n in nodes),
                "used_bytes": self.used_bytes, "pinned_nodes": sum(1 for n in nodes if n.pins),
                "pins": sum(n.pin_count() for n in nodes)}


__all__ = ["Node", "Tree", "INSERT_OWNER"]
