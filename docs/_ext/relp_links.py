"""Fail the HTML build when an internal link points at a page or anchor that does not exist.

Sphinx's ``nitpicky`` mode catches unresolved cross-references, but not links that resolve to
a page without the anchor they name (the "[docs]" links of ``sphinx.ext.viewcode`` source pages,
a MyST ``[text](page.md#heading)`` whose heading was renamed). At ``build-finished`` every
built HTML page is scanned: each relative ``href``/``src`` must name a file of the build, and
each ``#fragment`` into an HTML page must be an ``id`` (or ``name``) in that page. External
links (``http:``, ``mailto:``...) are not checked (no network).
"""
from __future__ import annotations

import importlib
import os
from html.parser import HTMLParser
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Set, Tuple
from urllib.parse import unquote, urlsplit

SKIPPED_FOLDERS = ("_static", "_sources", "_images", "_downloads")
"""Build folders whose files are targets, not pages to scan (MathJax ships HTML fragments)."""


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: Set[str] = set()
        self.links: List[Tuple[str, str]] = []

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if key in ("id", "name") and value and not (tag == "meta" and key == "name"):
                self.ids.add(value)
            elif key in ("href", "src") and value is not None and tag in ("a", "img", "link", "script", "source"):
                self.links.append((tag, value))


def _scan(page: Path) -> _Links:
    parser = _Links()
    parser.feed(page.read_text(encoding="utf-8", errors="replace"))
    return parser


def broken_links(outdir: str) -> List[str]:
    """Internal links of the HTML build in ``outdir`` whose page or anchor does not exist.

    Args:
        outdir (str): the HTML builder's output folder.

    Returns:
        list of str: one ``"page: link (why)"`` line per broken link, sorted; empty when all resolve.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> out = Path(tempfile.mkdtemp())
        >>> _ = (out / "a.html").write_text('<h1 id="top">A</h1><a href="b.html#x">b</a><a href="#top">up</a>')
        >>> _ = (out / "b.html").write_text('<p id="y">B</p><a href="a.html#top">a</a><a href="c.html">c</a>')
        >>> broken_links(str(out))
        ['a.html: b.html#x (no id "x" in b.html)', 'b.html: c.html (no such file)']
    """
    root = Path(outdir)
    if not root.is_dir():
        raise FileNotFoundError(f"outdir: {outdir} is not a folder")
    pages = [p for p in root.rglob("*.html")
             if not any(part in SKIPPED_FOLDERS for part in p.relative_to(root).parts[:-1])]
    cache: Dict[Path, Set[str]] = {}

    def ids_of(page: Path) -> Set[str]:
        if page not in cache:
            cache[page] = _scan(page).ids
        return cache[page]

    problems = []
    for page in pages:
        parsed = _scan(page)
        cache[page] = parsed.ids
        name = page.relative_to(root).as_posix()
        for _tag, link in parsed.links:
            parts = urlsplit(link)
            if parts.scheme or parts.netloc or link.startswith("//"):
                continue  # external (http:, mailto:, data:, javascript:)
            path, fragment = unquote(parts.path), unquote(parts.fragment)
            target = page if not path else (page.parent / path)
            if path.endswith("/") or (path and target.is_dir()):
                target = target / "index.html"
            target = Path(os.path.normpath(target))
            if not target.is_file():
                problems.append(f"{name}: {link} (no such file)")
            elif fragment and target.suffix == ".html" and fragment not in ids_of(target):
                problems.append(f'{name}: {link} (no id "{fragment}" in {target.relative_to(root).as_posix()})')
    return sorted(problems)


def _top_object(module: str, name: str):
    """The object ``name`` (its first dotted part) of ``module``, or None where either does not exist."""
    try:
        return getattr(importlib.import_module(module), name.split(".")[0])
    except (ImportError, AttributeError, ValueError):
        return None


def documented_name(modname: str, name: str, documented: Mapping[str, str],
                    docname: Optional[str] = None) -> Optional[str]:
    """The full name under which the object ``name`` of module ``modname`` is documented.

    ``sphinx.ext.viewcode`` links each object of a highlighted module to
    ``<first module name seen>.<name>``; an object documented where users import it from (a
    re-export at the package root, or a sub-package) has another full name. The candidates are
    the documented names ending in ``.<name>`` whose module holds the *same* object; one
    documented on ``docname`` wins, then the one under ``modname`` itself, then the shortest.

    Args:
        modname (str): the module that defines the object (the source page's module).
        name (str): its name in that module, dotted for members (``LogitDiff.at_positions``).
        documented (Mapping[str, str]): documented full name -> the page that documents it.
        docname (str, optional): the page viewcode links to, preferred where it documents it.

    Returns:
        str or None: the documented full name, or None when the object is not documented.

    Example:
        >>> documented_name("json.decoder", "JSONDecoder.decode",
        ...                 {"json.JSONDecoder.decode": "api", "json.decoder.JSONDecodeError": "api"})
        'json.JSONDecoder.decode'
        >>> documented_name("json.decoder", "JSONDecoder.raw_decode", {"json.JSONDecoder.decode": "api"}) is None
        True
    """
    target = _top_object(modname, name)
    if target is None:
        return None
    found = [full for full in documented if full == f"{modname}.{name}" or (
        full.endswith("." + name) and _top_object(full[:-len(name) - 1], name) is target)]
    if not found:
        return None
    return min(found, key=lambda full: (documented[full] != docname, full != f"{modname}.{name}", len(full), full))


def _fix_viewcode_backlinks(app, pagename, templatename, context, doctree) -> None:
    """Point each "[docs]" link of a highlighted source page at the anchor that documents the object."""
    modules = getattr(app.env, "_viewcode_modules", {})
    modname = pagename[len("_modules/"):].replace("/", ".") if pagename.startswith("_modules/") else None
    entry = modules.get(modname) if modname else None
    if not entry or "body" not in context:
        return
    _code, _tags, used, refname = entry
    domain = app.env.get_domain("py")
    documented = {full: obj.docname for full, obj in domain.objects.items()}
    body = context["body"]
    for name, docname in used.items():
        wrong = app.builder.get_relative_uri(pagename, docname) + "#" + refname + "." + name
        full = documented_name(modname, name, documented, docname)
        if full is None:
            continue  # not documented: the link check reports the link
        obj = domain.objects[full]
        right = app.builder.get_relative_uri(pagename, obj.docname) + "#" + obj.node_id
        body = body.replace(f'href="{wrong}"', f'href="{right}"')
    context["body"] = body


def _check_links(app, exception) -> None:
    if exception is not None or app.builder.format != "html":
        return
    from sphinx.errors import ExtensionError  # here, so the module imports without sphinx (tests)

    problems = broken_links(app.outdir)
    if problems:
        shown = "\n  ".join(problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise ExtensionError(f"{len(problems)} internal link(s) point at a missing page or anchor:\n  "
                             f"{shown}{more}")


def setup(app):
    app.connect("html-page-context", _fix_viewcode_backlinks)
    app.connect("build-finished", _check_links, priority=900)  # after the handlers that copy files in
    return {"parallel_read_safe": True, "parallel_write_safe": True}
