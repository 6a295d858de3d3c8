#!/usr/bin/env python3
"""Which modules of a crate use which, from its `crate::` paths, and the
cycles among them.

    python3 tools/module-deps.py [crates/switchboard-server/src] [--check]

Prints one line per top-level module (`a -> b, c`), then every cycle (a set
of modules that reach each other). With --check it exits 1 when there is a
cycle, for CI once the server's modules form none.
"""

import os
import re
import sys


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
    return 1 if check and found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
