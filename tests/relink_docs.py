"""Rewrite the tutorial's line references after code moves: `python -m tests.relink_docs`.

A link [`name`](path#Lfirst-Llast) whose `name` is a top-level def or class is
pointed at that definition's current lines; if the definition left `path`, the
link follows it to the file beside `path` that now defines it. Links to whole
files (`name` ending in .py) are left alone. tests/test_docs.py checks the result.
"""
from pathlib import Path

from tests.test_docs import DOCS, LINK, definition_spans


def relink(doc: Path) -> int:
    text = doc.read_text()
    changed = 0

    def fix(match):
        nonlocal changed
        name, target = match.group(1), match.group(2)
        if name.endswith(".py"):
            return match.group(0)
        path = (doc.parent / target).resolve()
        candidates = [path] + sorted(p for p in path.parent.glob("*.py") if p != path)
        for candidate in candidates:
            span = definition_spans(candidate).get(name)
            if span:
                new_target = target if candidate == path else str(Path(target).parent / candidate.name).lstrip("./")
                if target.startswith("../") and not new_target.startswith("../"):
                    new_target = "../" + new_target
                new = match.group(0).replace(f"({target}#L{match.group(3)}-L{match.group(4)})",
                                             f"({new_target}#L{span[0]}-L{span[1]})")
                changed += new != match.group(0)
                return new
        raise SystemExit(f"{doc}: no definition of {name} near {target}")

    doc.write_text(LINK.sub(fix, text))
    return changed


if __name__ == "__main__":
    for doc in DOCS:
        print(f"{doc.name}: {relink(doc)} links updated")
