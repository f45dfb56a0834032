"""Links to a heading of another page (`page.md#anchor`) resolve on GitHub too, not only in the
mkdocs build (tests/docs/test_docs_build.py checks those): GitHub slugs a heading its own way, e.g.
"`processing` — the apps' hooks" is `processing--the-apps-hooks` there (the dash dropped, both
spaces kept) and `processing-the-apps-hooks` in mkdocs, so links written for one broke on the other."""

from __future__ import annotations

import re
from pathlib import Path

from markdown.extensions.toc import slugify

REPO = Path(__file__).resolve().parents[2]
PAGES = sorted((REPO / "docs").rglob("*.md")) + [REPO / "README.md"]


def github_slug(text: str) -> str:
    # github-slugger: lower case, drop every character but letters, digits, '_', '-' and spaces,
    # then each space becomes a '-'
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def _headings(path: Path) -> list[str]:
    texts, fenced = [], False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"#{1,6} (.*)", line)):
            # as rendered: a link's text, no code or emphasis marks
            texts.append(re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match.group(1)).replace("`", "").replace("*", ""))
    return texts


def github_anchors(path: Path) -> set[str]:
    anchors, seen = set(), {}
    for text in _headings(path):
        slug = github_slug(text)
        anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    anchors.update(re.findall(r'<a (?:id|name)="([^"]+)"', path.read_text()))
    return anchors


def test_cross_page_anchors_resolve_on_github():
    broken = []
    for page in PAGES:
        for target, anchor in re.findall(r"\]\(([^)\s#]+\.md)#([^)\s]+)\)", page.read_text()):
            target_path = (page.parent / target).resolve()
            if target_path.is_file() and anchor not in github_anchors(target_path):
                broken.append(f"{page.relative_to(REPO)}: {target}#{anchor}")
    assert broken == []


def test_the_site_agent_module_headings_slug_alike_on_both():
    # the headings linked from launcher.md and settings.md
    for text in _headings(REPO / "docs" / "site.md"):
        if text.startswith(("processing", "scheduler", "transfers")):
            assert github_slug(text) == slugify(text, "-"), text


def test_github_slug_of_the_old_heading():
    assert github_slug("processing — the apps' hooks") == "processing--the-apps-hooks"
