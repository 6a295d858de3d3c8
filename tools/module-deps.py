#!/usr/bin/env python3
"""Which modules of a crate use which, from its `crate::` paths, and the
cycles among them.

    python3 tools/module-deps.py [crates/switchboard-server/src] [--check]

Prints one line per top-level module (`a -> b, c`), then every cycle (a set
of modules that reach each other), then every arrow that runs up the
server's layers (see LAYERS). With --check it exits 1 on either; CI runs it.
"""

import os
import re
import sys

# The server crate's layers, lowest first: a module may use its own layer's
# modules and those below (ARCHITECTURE.md gives the reasons).
LAYERS = [
    ["allowed_origins", "clock", "config", "frames", "metrics"],
    ["admission"],
    ["conn"],
    ["origin"],
    ["channels"],
    ["commands"],
    ["edge"],
    ["node"],
]


def modules(src):
    """Top-level module name -> the top-level modules it names."""
    deps = {}
    for root, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            path = os.path.join(root, f)
            rel = os.path.relpath(path, src)[: -len(".rs")]
            name = rel.split(os.sep)[0]
            if name in ("lib", "main"):
                continue
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
            named = set(re.findall(r"\bcrate::([a-z_][a-z0-9_]*)", text))
            # `crate::{a, b::c}`: the first segment of each item.
            for group in re.findall(r"\bcrate::\{([^}]*)\}", text):
                named.update(re.findall(r"(?:^|,)\s*([a-z_][a-z0-9_]*)", group))
            deps.setdefault(name, set()).update(named - {name})
    return {m: {d for d in ds if d in deps} for m, ds in deps.items()}


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


def upward(deps):
    """Arrows from a module to one in a higher layer, when every module has
    a layer (other crates are not checked)."""
    layer = {m: i for i, ms in enumerate(LAYERS) for m in ms}
    if not set(deps) <= set(layer):
        return []
    return [
        (m, d)
        for m in sorted(deps)
        for d in sorted(deps[m])
        if layer[d] > layer[m]
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
    up = upward(deps)
    for m, d in up:
        print(f"upward: {m} -> {d}")
    return 1 if check and (found or up) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
