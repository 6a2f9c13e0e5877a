#!/usr/bin/env python3
"""Checks that host/src keeps the layout its crate docs describe.

- No import cycle between top-level modules (folders or files of host/src): each component
  builds only on the ones below it.
- No file over 700 code lines (not blank, not comments), no function over 120 lines.

Prints the module graph and every breach; exits 1 on any. Run by scripts/test.sh.
"""
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "host", "src")
FILE_MAX, FN_MAX = 700, 120


def modules():
    found = {}
    for entry in sorted(os.listdir(ROOT)):
        path = os.path.join(ROOT, entry)
        if entry.endswith(".rs") and entry not in ("lib.rs", "main.rs"):
            found[entry[:-3]] = [path]
        elif os.path.isdir(path):
            found[entry] = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(".rs")]
    return found


def code(text):
    """The text without unit tests and comment lines."""
    cut = text.find("#[cfg(test)]\nmod tests")
    if cut >= 0:
        text = text[:cut]
    return "\n".join(l for l in text.split("\n") if not l.strip().startswith("//"))


def graph(mods):
    names = set(mods)
    edges = {}
    for name, files in mods.items():
        deps = set()
        for f in files:
            text = code(open(f).read())
            for block in re.findall(r"crate::\{([^;]*?)\};", text, re.S):
                deps.update(n for n in re.findall(r"\b([a-z_]+)\b", block) if n in names)
            deps.update(n for n in re.findall(r"crate::([a-z_]+)", text) if n in names)
        deps.discard(name)
        edges[name] = deps
    return edges


def cycles(edges):
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                found.append(sorted(part))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def sizes():
    breaches = []
    for d, _, fs in os.walk(ROOT):
        for f in fs:
            if not f.endswith(".rs"):
                continue
            path = os.path.join(d, f)
            rel = os.path.relpath(path, os.path.join(ROOT, "..", ".."))
            lines = open(path).read().split("\n")
            count = sum(1 for l in lines if l.strip() and not l.strip().startswith("//"))
            if count > FILE_MAX:
                breaches.append(f"{rel}: {count} code lines (at most {FILE_MAX})")
            for i, line in enumerate(lines):
                m = re.match(r"^(\s*)(pub(\([a-z]+\))? )?(async )?(const )?(unsafe )?fn (\w+)", line)
                if not m or line.rstrip().endswith(";"):
                    continue
                # A whole function on one line (`fn f() {}`): nothing to measure.
                if line.rstrip().endswith("}") and line.count("{") == line.count("}"):
                    continue
                indent = m.group(1)
                for j in range(i + 1, len(lines)):
                    if lines[j].startswith(indent + "}") and len(lines[j].strip()) <= 2:
                        if j - i + 1 > FN_MAX:
                            breaches.append(f"{rel}:{i + 1}: fn {m.group(7)} is {j - i + 1} lines (at most {FN_MAX})")
                        break
    return breaches


def main():
    edges = graph(modules())
    for name in sorted(edges):
        print(f"  {name:12} -> {' '.join(sorted(edges[name])) or '-'}")
    problems = [f"import cycle between {', '.join(c)}" for c in cycles(edges)] + sizes()
    for p in problems:
        print(f"layout: {p}")
    if problems:
        return 1
    print("layout: no import cycle; files and functions within limits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
