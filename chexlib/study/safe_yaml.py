"""YAML with bounds: a study specification that is too long, would expand past a
size or nests past a depth is refused in a moment, before anything walks it.

YAML aliases (``*a``) share one object, so a few lines can name a value that
expands to billions (the "billion laughs"), and an anchor can even contain
itself; a deeply nested value exhausts Python's recursion. Both are refused
here with :class:`YamlLimitError`; what a real specification uses (anchors for
shared parameters, a few levels of nesting) stays well inside the bounds.
"""

from __future__ import annotations

import yaml

MAX_CHARS = 256 * 1024  # a specification is a few KB; this parses in well under a second
MAX_DEPTH = 32  # nesting levels of mappings and lists, aliases expanded
MAX_NODES = 100_000  # values (scalars, lists, mappings), aliases expanded


class YamlLimitError(ValueError):
    """A YAML document that nests too deep, expands too large or contains itself."""


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses nesting past :data:`MAX_DEPTH` while composing
    (the composer recurses: a deeper document would exhaust the stack)."""

    depth = 0

    def compose_node(self, parent, index):
        if self.depth >= MAX_DEPTH:
            mark = self.peek_event().start_mark
            raise YamlLimitError(
                f"nested deeper than {MAX_DEPTH} levels (line {mark.line + 1}); "
                "a study specification needs a few"
            )
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _children(node) -> list:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def check_size(root) -> None:
    """Refuse a composed document whose aliases expand it past :data:`MAX_NODES`
    values or :data:`MAX_DEPTH` levels, or make it contain itself.

    Each node is measured once (shared nodes from their memo), without recursion.
    """
    measured: dict[int, tuple[int, int]] = {}  # id -> (values, depth), aliases expanded
    open_nodes: set[int] = set()  # entered, not finished: the path from the root
    stack = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            parts = [measured[id(c)] for c in _children(node)]
            size = 1 + sum(p[0] for p in parts)
            depth = 1 + max((p[1] for p in parts), default=0)
            line = node.start_mark.line + 1
            if size > MAX_NODES:
                raise YamlLimitError(
                    f"the value at line {line} holds more than {MAX_NODES:,} values "
                    "(aliases expanded); refused"
                )
            if depth > MAX_DEPTH:
                raise YamlLimitError(
                    f"the value at line {line} nests (through aliases) deeper than "
                    f"{MAX_DEPTH} levels; refused"
                )
            measured[key] = (size, depth)
            open_nodes.discard(key)
        elif key in open_nodes:
            raise YamlLimitError(
                f"the value at line {node.start_mark.line + 1} contains itself (through an alias)"
            )
        elif key not in measured:
            open_nodes.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in _children(node))


def safe_load(text: str):
    """``yaml.safe_load(text)`` within the bounds.

    Raises:
        YamlLimitError: longer than :data:`MAX_CHARS`, too deep, too large once
            aliases are expanded, or recursive.
        yaml.YAMLError: not valid YAML.
    """
    if len(text) > MAX_CHARS:
        raise YamlLimitError(
            f"{len(text):,} characters, more than the {MAX_CHARS:,} a study specification may have"
        )
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        check_size(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()
