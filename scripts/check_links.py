#!/usr/bin/env python3
"""Checks the relative links of the README, the book's sources and docker/README.md.

Every relative link must name a file that exists, and its #anchor a heading of that file (or of
the same file for a bare #anchor), with anchors made the way GitHub and mdBook make them: lower
case, punctuation dropped, spaces to hyphens, a repeated heading numbered -1, -2. A link from
the book must stay inside docs/src/: the built book contains nothing else. Links to other sites
(http:, https:, mailto:) are not followed. Code blocks and code spans are skipped. The book's
`{{#include}}`s must name files that exist, and a named anchor must be marked in its file:
mdBook includes nothing for an anchor it does not find, and builds without a word.

    scripts/check_links.py        (a step of scripts/test.sh; exits 1 naming each broken link)
"""

import re
import sys
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "docs" / "src"
FILES = [ROOT / "README.md", ROOT / "docker" / "README.md", *sorted(BOOK.rglob("*.md"))]

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
LINK = re.compile(r"(?<!!)\[(?:[^\]\\]|\\.)*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
IMAGE = re.compile(r"!\[(?:[^\]\\]|\\.)*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text):
    """(line number, line) outside fenced code blocks, code spans blanked."""
    fence = None
    for n, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)[0] * len(m.group(1))
            continue
        if fence is not None:
            if line.strip().startswith(fence) and line.strip().strip(fence[0]) == "":
                fence = None
            continue
        yield n, CODE_SPAN.sub(lambda s: " " * len(s.group(0)), line)


def slug(heading):
    """The anchor GitHub and mdBook give a heading."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link's text
    text = re.sub(r"<[^>]+>", "", text)
    out = []
    for ch in text.strip().lower():
        if ch in (" ", "-"):
            out.append("-")
        elif ch == "_" or ch.isalnum() or unicodedata.category(ch).startswith("M"):
            out.append(ch)
    return "".join(out)


def anchors(path, cache={}):
    if path not in cache:
        seen = {}
        found = set()
        for _, line in prose_lines(path.read_text(encoding="utf-8")):
            m = HEADING.match(line)
            if not m:
                continue
            s = slug(m.group(2))
            n = seen.get(s, 0)
            seen[s] = n + 1
            found.add(s if n == 0 else f"{s}-{n}")
        cache[path] = found
    return cache[path]


INCLUDE = re.compile(r"(?<!\\)\{\{#include\s+([^}\s:]+)(?::([^}\s]*))?\s*\}\}")


def includes(path, text):
    """Problems with the book's `{{#include FILE[:ANCHOR or LINES]}}`: a missing file, or a named
    anchor without its `ANCHOR: name` / `ANCHOR_END: name` pair (mdBook then includes nothing,
    and says nothing)."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        for m in INCLUDE.finditer(line):
            target, part = m.group(1), m.group(2) or ""
            dest = (path.parent / target).resolve()
            where = f"{path.relative_to(ROOT)}:{n}: {{{{#include {target}:{part}}}}}"
            if not dest.exists():
                out.append(f"{where}: {target} does not exist")
                continue
            if not part or re.fullmatch(r"\d*(:\d*)?", part):
                continue  # the whole file, or a line range
            body = dest.read_text(encoding="utf-8")
            for marker in (f"ANCHOR: {part}", f"ANCHOR_END: {part}"):
                if not re.search(re.escape(marker) + r"\b", body):
                    out.append(f"{where}: {dest.relative_to(ROOT)} has no `{marker}`")
    return out


def main():
    problems = []
    checked = 0
    for path in sorted(BOOK.rglob("*.md")):
        found = includes(path, path.read_text(encoding="utf-8"))
        checked += len(INCLUDE.findall(path.read_text(encoding="utf-8")))
        problems.extend(found)
    for path in FILES:
        rel = path.relative_to(ROOT)
        in_book = BOOK in path.parents
        for n, line in prose_lines(path.read_text(encoding="utf-8")):
            for m in list(LINK.finditer(line)) + list(IMAGE.finditer(line)):
                target = m.group(1).strip("<>")
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                    continue
                checked += 1
                file_part, _, anchor = target.partition("#")
                dest = (path.parent / file_part).resolve() if file_part else path
                where = f"{rel}:{n}: {target}"
                if not dest.exists():
                    problems.append(f"{where}: {file_part} does not exist")
                    continue
                if in_book and BOOK not in dest.parents and dest != BOOK:
                    problems.append(f"{where}: leaves docs/src/ (the built book does not contain it)")
                    continue
                if anchor:
                    if dest.suffix != ".md":
                        problems.append(f"{where}: an anchor into a file that is not Markdown")
                    elif anchor not in anchors(dest):
                        problems.append(f"{where}: no heading of {dest.relative_to(ROOT)} makes #{anchor}")
    for p in problems:
        print(p)
    print(f"links: {checked} relative links and includes in {len(FILES)} files, {len(problems)} broken")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
