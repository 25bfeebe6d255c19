#!/usr/bin/env python3
"""The crate's dependency picture, from its `crate::` and `super::` paths.

Prints the graph between top-level modules (the layers of ARCHITECTURE.md)
and between files, and exits non-zero if either has a cycle, so CI keeps
dependencies pointing one way:

    examples -> jobs (inference, training, embeddings) -> models -> layers
             -> io -> backend -> error

usage: python3 scripts/deps.py [--files]
"""
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")


def module_of(path):
    """src/models/llama.rs -> ['models', 'llama']; src/models/mod.rs -> ['models']."""
    rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
    if rel[-1] in ("mod", "lib"):
        rel = rel[:-1]
    return rel


def files():
    for d, _, names in os.walk(ROOT):
        for n in sorted(names):
            if n.endswith(".rs"):
                yield os.path.join(d, n)


def known_modules():
    return {tuple(module_of(p)) for p in files()}


def resolve(parts, mods):
    """The longest known module prefix of a path."""
    for k in range(len(parts), 0, -1):
        if tuple(parts[:k]) in mods:
            return tuple(parts[:k])
    return None


def code_without_comments(text):
    text = re.sub(r"//[^\n]*", "", text)
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S)


def edges():
    mods = known_modules()
    out = set()
    for p in files():
        me = module_of(p)
        text = code_without_comments(open(p, encoding="utf-8").read())
        # `use` groups are flattened: crate::a::{b, c::d} names a::b, a::c.
        for m in re.finditer(r"\b(crate|super)((?:::\w+)+)(::\{([^;]*?)\})?", text):
            base = m.group(2).strip(":").split("::")
            if m.group(1) == "super":
                # `super` of a/b.rs and of a/b/mod.rs is `a` either way.
                base = list(me[:-1]) + base
            targets = [base]
            if m.group(4):
                for item in re.split(r",(?![^{]*\})", m.group(4)):
                    item = item.strip().split(" as ")[0]
                    if item and item != "self":
                        targets.append(base + re.findall(r"\w+", item)[:1])
            for t in targets:
                r = resolve(t, mods)
                if r and r != tuple(me) and not tuple(me)[: len(r)] == r:
                    out.add((tuple(me), r))
    return out


def find_cycle(nodes, adj):
    state = {}
    stack = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(adj.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                c = visit(m)
                if c:
                    return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(nodes):
        if n not in state:
            c = visit(n)
            if c:
                return c
    return None


def show(name, e):
    nodes = {a for a, _ in e} | {b for _, b in e}
    adj = {}
    for a, b in e:
        adj.setdefault(a, set()).add(b)
    print(f"## {name}")
    for a in sorted(adj):
        print(f"{'::'.join(a) or 'crate'} -> {', '.join(sorted('::'.join(b) for b in adj[a]))}")
    cycle = find_cycle(nodes, adj)
    if cycle:
        print(f"CYCLE: {' -> '.join('::'.join(c) for c in cycle)}")
    else:
        print("no cycles")
    print()
    return cycle is None


def main():
    e = edges()
    top = {(a[:1], b[:1]) for a, b in e if a[:1] != b[:1] and a and b}
    ok = show("top-level modules", top)
    if "--files" in sys.argv:
        ok = show("files", e) and ok
    else:
        ok = find_cycle({x for p in e for x in p}, _adj(e)) is None and ok
        print("files: " + ("no cycles" if ok else "CYCLE (run with --files)"))
    sys.exit(0 if ok else 1)


def _adj(e):
    adj = {}
    for a, b in e:
        adj.setdefault(a, set()).add(b)
    return adj


if __name__ == "__main__":
    main()
