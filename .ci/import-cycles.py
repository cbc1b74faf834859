#!/usr/bin/env python3
"""Fails when two files of one crate import from each other.

A file's imports are its `crate::…` and `super::…` paths (comments and `mod tests` blocks left
out), resolved to the files of the crate's modules; a module naming its own submodules does not
count. Prints each pair, then how many there are; exits 1 when there is any.
"""
import itertools
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = ("/target", "/.git", "node_modules", "/new_driver")


def crate_sources():
    for path, dirs, files in os.walk(ROOT):
        if any(s in path for s in SKIP):
            continue
        if "Cargo.toml" in files and os.path.isdir(os.path.join(path, "src")):
            yield os.path.join(path, "src")


def module_path(src, file):
    parts = os.path.relpath(file, src)[:-3].split("/")
    return tuple(parts[:-1] if parts[-1] in ("mod", "lib", "main") else parts)


def imports(text, here, files):
    text = re.sub(r"//[^\n]*", "", text)
    cut = text.find("#[cfg(test)]\nmod tests {")
    if cut >= 0:
        text = text[:cut]
    found = set()

    def resolve(candidate, floor):
        for k in range(len(candidate), floor - 1, -1):
            if tuple(candidate[:k]) in files:
                found.add(tuple(candidate[:k]))
                return

    for m in re.finditer(r"\bcrate::((?:[a-z_][a-z0-9_]*::?)*)", text):
        resolve([p for p in m.group(1).split("::") if p], 1)
    for m in re.finditer(r"\bsuper::((?:[a-z_][a-z0-9_]*::?)*)", text):
        parent = list(here[:-1])
        resolve(parent + [p for p in m.group(1).split("::") if p], len(parent))
    found.discard(here)
    return found


def main():
    pairs = []
    for src in crate_sources():
        files = {}
        for path, _, names in os.walk(src):
            for name in names:
                if name.endswith(".rs"):
                    file = os.path.join(path, name)
                    files[module_path(src, file)] = file
        edges = {m: imports(open(f).read(), m, files) for m, f in files.items()}
        for a, b in itertools.combinations(edges, 2):
            if b in edges[a] and a in edges[b]:
                pairs.append((files[a], files[b]))
    for a, b in pairs:
        print(f"{os.path.relpath(a, ROOT)} <-> {os.path.relpath(b, ROOT)}")
    print(f"{len(pairs)} pairs of files that import from each other")
    return 1 if pairs else 0


if __name__ == "__main__":
    sys.exit(main())
