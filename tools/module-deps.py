#!/usr/bin/env python3
"""Which modules of a crate use which, from its `crate::` paths, and the
cycles among them.

    python3 tools/module-deps.py [crates/switchboard-server/src] [--check]

Prints one line per top-level module (`a -> b, c`), then every cycle (a set
of modules that reach each other), then, for a crate with layers (see
LAYERS), every module without a layer and every arrow that runs up them.
With --check it exits 1 on any of these; CI runs it.
"""

import os
import re
import sys

# Layers of the crates that have them, lowest first: a module may use its
# own layer's modules and those below (ARCHITECTURE.md gives the reasons).
# Every top-level module of such a crate must have a layer.
LAYERS = {
    "switchboard-server": [
        ["allowed_origins", "clock", "config", "frames", "metrics"],
        ["admission"],
        ["conn"],
        ["origin"],
        ["channels", "graphql"],
        ["sessions"],
        ["commands"],
        ["edge"],
        ["node"],
    ],
}

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def group_items(text, start):
    """The items of the `{...}` group opening at text[start], split at its
    top-level commas (nested groups kept whole)."""
    depth, items, current = 0, [], []
    for ch in text[start:]:
        if ch == "{":
            depth += 1
            if depth == 1:
                continue
        elif ch == "}":
            depth -= 1
            if depth == 0:
                break
        if ch == "," and depth == 1:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    items.append("".join(current))
    return [i.strip() for i in items if i.strip()]


def first_segments(text, start):
    """The first path segment of the path (or of each item of the group)
    that begins at text[start]."""
    if text.startswith("{", start):
        return [m.group(0) for item in group_items(text, start)
                for m in [re.match(IDENT, item)] if m]
    m = re.match(IDENT, text[start:])
    return [m.group(0)] if m else []


def leaves(tree):
    """The names a `use` tree brings in (after `as` when renamed)."""
    tree = tree.strip()
    if "{" in tree:
        head = tree.index("{")
        return [n for item in group_items(tree, head) for n in leaves(item)]
    if " as " in tree:
        return [tree.split(" as ")[-1].strip()]
    return [tree.split("::")[-1].strip()]


def reexports(src, tops):
    """Names `lib.rs` re-exports from a top-level module -> that module."""
    lib = os.path.join(src, "lib.rs")
    if not os.path.exists(lib):
        return {}
    text = open(lib, encoding="utf-8").read()
    found = {}
    for m in re.finditer(r"\bpub use (" + IDENT + r")::([^;]*);", text, re.S):
        if m.group(1) in tops:
            for name in leaves(m.group(2)):
                found[name] = m.group(1)
    return found


def module_path(rel):
    """The module path of a file (`edge/api.rs` -> [edge, api],
    `edge/mod.rs` -> [edge])."""
    parts = rel.split(os.sep)
    parts[-1] = parts[-1][: -len(".rs")]
    if parts[-1] == "mod":
        parts.pop()
    return parts


def modules(src):
    """Top-level module name -> the top-level modules it names, through
    `crate::` paths (groups included, nested or not), `super::` paths that
    climb to the crate root, and names `lib.rs` re-exports."""
    files = []
    for root, _, names in os.walk(src):
        for f in names:
            if f.endswith(".rs"):
                rel = os.path.relpath(os.path.join(root, f), src)
                if rel not in ("lib.rs", "main.rs"):
                    files.append(rel)
    tops = {module_path(rel)[0] for rel in files}
    exported = reexports(src, tops)
    deps = {t: set() for t in tops}
    for rel in files:
        here = module_path(rel)
        text = open(os.path.join(src, rel), encoding="utf-8").read()
        named = set()
        for m in re.finditer(r"\bcrate::", text):
            named.update(first_segments(text, m.end()))
        for m in re.finditer(r"\b((?:super::)+)", text):
            climbed = len(here) - m.group(1).count("super::")
            if climbed <= 0:
                named.update(first_segments(text, m.end()))
        resolved = {n if n in tops else exported.get(n) for n in named}
        deps[here[0]].update(d for d in resolved if d and d != here[0])
    return deps


def cycles(deps):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(deps[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(deps):
        if v not in index:
            visit(v)
    return found


def unlayered(deps, layers):
    """Modules of a layered crate that have no layer."""
    known = {m for ms in layers for m in ms}
    return sorted(m for m in deps if m not in known)


def upward(deps, layers):
    """Arrows from a module to one in a higher layer."""
    layer = {m: i for i, ms in enumerate(layers) for m in ms}
    return [
        (m, d)
        for m in sorted(deps)
        for d in sorted(deps[m])
        if m in layer and d in layer and layer[d] > layer[m]
    ]


def main(argv):
    check = "--check" in argv
    args = [a for a in argv if a != "--check"]
    src = args[0] if args else "crates/switchboard-server/src"
    deps = modules(src)
    for m in sorted(deps):
        print(f"{m} -> {', '.join(sorted(deps[m])) or '-'}")
    found = cycles(deps)
    for c in found:
        print(f"cycle: {' '.join(c)}")
    if not found:
        print("no cycles")
    crate = os.path.basename(os.path.dirname(os.path.abspath(src)))
    layers = LAYERS.get(crate)
    up, missing = [], []
    if layers:
        missing = unlayered(deps, layers)
        for m in missing:
            print(f"no layer: {m} (add it to LAYERS in {sys.argv[0]})")
        up = upward(deps, layers)
        for m, d in up:
            print(f"upward: {m} -> {d}")
    return 1 if check and (found or up or missing) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
