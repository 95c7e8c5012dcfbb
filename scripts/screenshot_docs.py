"""Screenshot every page of the built docs in headless Chromium with the network off.

Build the site first (``python -m sphinx -W --keep-going -b html docs docs/_build/html``),
then::

    python scripts/screenshot_docs.py                      # every page
    python scripts/screenshot_docs.py concepts rules --height 6000

First it runs the content checks on the built HTML (:func:`content_checks`: what the
pages must and must not say, one page per method, API pages of bounded length with
parameters listed once, wrapped code blocks, equations that fit the column, executed
tutorials with a download button and figures that open full size); ``--checks-only``
stops there. For each page it then writes ``<out>/<page>.png`` (a 1280-px-wide window, tall enough for
most pages; ``--height`` to change it) and checks the rendered DOM: the number of math
elements and how many of them MathJax rendered. A page whose math is not rendered (e.g.
MathJax loaded from a CDN) fails the run (exit code 1).

The network is off: the browser runs in a new network namespace (``unshare -rn``,
where the kernel allows it) and, in any case, with every host name mapped to nothing
and an unreachable proxy, so only ``file://`` URLs load. Chromium: ``apt-get install
chromium`` (Debian) or pass ``--chromium``.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {"_static", "_sources", "_images", "_modules", "jupyter_execute", "_generated"}
SKIP_PAGES = {"genindex", "search", "py-modindex"}

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    "--hide-scrollbars", "--disable-extensions", "--mute-audio",
    # network off even without a network namespace
    "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9",
    "--virtual-time-budget=15000",  # let MathJax typeset before the capture
]


def find_chromium(given: str | None) -> str:
    for name in filter(None, [given, "chromium", "chromium-browser", "google-chrome"]):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("no Chromium found: apt-get install -y chromium, or pass --chromium PATH")


def offline_prefix() -> list[str]:
    """``unshare -rn`` when the kernel lets us open a network namespace, else nothing."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-rn", "true"], capture_output=True).returncode == 0:
        return [unshare, "-rn"]
    return []


def pages(html: Path, names: list[str]) -> list[Path]:
    if names:
        return [html / (n if n.endswith(".html") else f"{n}.html") for n in names]
    found = []
    for path in sorted(html.rglob("*.html")):
        rel = path.relative_to(html)
        if rel.parts[0] in SKIP_DIRS or rel.stem in SKIP_PAGES:
            continue
        found.append(path)
    return found


def run(chromium: list[str], page: Path, extra: list[str], timeout: int) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        cmd = [*chromium, *FLAGS, f"--user-data-dir={profile}", *extra, page.as_uri()]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def math_status(dom: str) -> tuple[int, int]:
    """(math elements in the page, of which MathJax rendered)."""
    total = len(re.findall(r'class="math notranslate', dom))  # inline and display math
    rendered = len(re.findall(r"<mjx-container", dom))
    return total, rendered


# -- content checks on the built HTML (no browser needed) ----------------------------------------

METHOD_PAGES = ("ap", "atp", "relp", "ig", "eap", "eap_ig")
MAX_OBJECTS_PER_API_PAGE = 40
MAX_EQUATION_CHARS = 75
"""Visible characters per line of a display equation that still fit the 732-px content column."""
TIE = 0.01


def _read(html: Path, page: str) -> str:
    path = html / page
    return path.read_text(encoding="utf-8") if path.exists() else ""


def _text(dom: str, drop_code: bool = False) -> str:
    """The visible text of an HTML fragment (``drop_code``: without <code>/<pre> contents)."""
    import html as html_lib

    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    if drop_code:
        dom = re.sub(r"<(code|pre)\b.*?</\1>", " ", dom, flags=re.S)
    return html_lib.unescape(re.sub(r"<[^>]+>", "", dom))


def _visible_tex_width(tex: str) -> int:
    """Rough number of glyphs a TeX line renders to (commands count as one glyph, braces none)."""
    tex = re.sub(r"\\(left|right|big|Big|bigg|Bigg|qquad|quad|,|;|!|displaystyle|mathrm|mathcal|operatorname|"
                 r"text|texttt|mathbb|frac|begin\{[a-z]*\}|end\{[a-z]*\})", "", tex)
    tex = re.sub(r"\\[A-Za-z]+", "x", tex)  # \rho, \odot, ... : one glyph
    tex = re.sub(r"[_^]\{([^{}]*)\}", lambda m: m.group(1)[: max(1, len(m.group(1)) // 2)], tex)  # small scripts
    return len(re.sub(r"[{}&\s]", "", tex))


def content_checks(html: Path) -> list[str]:
    """What the built site must (not) say; each entry of the result is one failure."""
    failures = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            failures.append(message)

    cli = _read(html, "cli.html")
    cli_text = _text(cli)
    need("SUPPRESS" not in cli_text, "cli: a hidden option leaks (==SUPPRESS==)")
    need(not re.search("\u2013[a-z]", cli_text), "cli: an option name is typeset with an en-dash")
    need("pip install captum-relp" not in cli_text, "cli: claims `pip install captum-relp` (not on PyPI)")
    need("Both commands" not in cli_text, "cli: says 'Both commands' for three")
    need("--overwrite" in cli_text and "captum-relp-run.json" in cli_text, "cli: --overwrite / manifest undocumented")
    integrations = _text(_read(html, "integrations.html"))
    need("is not installed" not in integrations, "integrations: the build ran without the extra ('not installed')")
    need("captum-relp[integrations]" not in integrations, "integrations: claims a PyPI distribution")
    need("download.pytorch.org/whl/cpu" in _text(_read(html, "installation.html")),
         "installation: does not say how to get the CPU build of torch")

    results = _read(html, "results.html")
    prose = _text(results, drop_code=True)
    need("issue 12" not in prose and "c368263" not in prose, "results: internal 'issue 12' comparison section")
    need(not re.search(r"(?<![\w`/-])(relp|relp-ah|eap|eap-ig)(?![\w/-])", prose),
         "results: CLI identifiers (relp, eap, ...) used as method names outside code font")
    for sentence in re.findall(r"agrees best with AP[^.]*?\d\.\d\d[^<]*?\)\.", prose):
        values = [float(v) for v in re.findall(r"\d\.\d\d", sentence)]
        need(all(values[0] - v > TIE - 1e-9 for v in values[1:]), f"results: a winner crowned among ties: {sentence!r}")
    need("CPR (higher better)" not in prose or "not bounded" in prose, "results: CPR called 'higher better', unbounded")
    need("Models run" in prose and "SmolLM2" in prose, "results: no table of models run / SmolLM2 section")

    for name in METHOD_PAGES:
        page = _read(html, f"methods/{name}.html")
        text = _text(page)
        need(bool(page) and 'class="math' in page and "cell_output" in page and "Cost." in text
             and "When to use it." in text, f"methods/{name}: missing, or without equation/cost/use/executed example")
    trouble = _text(_read(html, "troubleshooting.html")).lower()
    need(all(w in trouble for w in ("threads", "memory", "prompt alignment", "unsupported modules")),
         "troubleshooting: missing page or section")
    citing_page = _read(html, "citing.html")
    citing = _text(citing_page)
    need("@misc{" in citing and "@software{" in citing and 'href="https://arxiv.org' in citing_page,
         "citing: paper link / BibTeX")

    api_pages = [p for p in [html / "api.html", *sorted((html / "api").rglob("*.html"))] if p.exists()]
    for path in api_pages:
        page = path.read_text(encoding="utf-8")
        rel = path.relative_to(html)
        objects = page.split('<dt class="sig sig-object py"')
        need(len(objects) - 1 <= MAX_OBJECTS_PER_API_PAGE, f"{rel}: {len(objects) - 1} objects on one page")
        for chunk in objects[1:]:
            body = chunk.split("</dd>", 1)[0]
            name = re.search(r'id="([^"]+)"', chunk)
            for field in ("Parameters", "Return type"):
                need(len(re.findall(rf">{field}<", body)) <= 1,
                     f"{rel}: {field} listed twice for {name.group(1) if name else '?'}")
        need(not re.search(r"Bases: (<[^>]+>)*object", page), f"{rel}: 'Bases: object'")
        need("captum_relp._" not in _text(page), f"{rel}: refers to a private module")

    css = _read(html, "_static/custom.css")
    need(re.search(r"div\.highlight pre[^{]*\{[^}]*white-space:\s*pre-wrap", css, re.S) is not None,
         "css: code blocks scroll sideways instead of wrapping")
    for path in sorted(html.rglob("*.html")):
        if path.relative_to(html).parts[0] in SKIP_DIRS:
            continue
        display = r'<div class="math notranslate nohighlight">\s*\\\[(.*?)\\\]'
        for tex in re.findall(display, path.read_text("utf-8"), re.S):
            for line in re.split(r"\\\\", tex):
                width = _visible_tex_width(line)
                need(width <= MAX_EQUATION_CHARS,
                     f"{path.relative_to(html)}: equation line of ~{width} glyphs is cut off: {line.strip()[:60]}...")

    for path in sorted((html / "tutorials").glob("*.html")):
        page = path.read_text(encoding="utf-8")
        rel = path.relative_to(html)
        need("cell_output" in page, f"{rel}: no executed outputs")
        download = re.search(r'href="([^"]+\.ipynb)"[^>]*download', page)
        need(download is not None and (path.parent / download.group(1)).exists(), f"{rel}: no notebook download button")
        outputs = re.findall(r'<div class="cell_output.*?(?=<div class="cell |</article>)', page, re.S)
        images = sum(o.count("<img") for o in outputs)
        linked = sum(len(re.findall(r'<a class="reference internal image-reference"[^>]*>\s*<img', o)) for o in outputs)
        need(images == linked, f"{rel}: {images - linked} of {images} output figures do not open full size")
    t04 = _text(_read(html, "tutorials/04_circuit_discovery.html"))
    need("-> signal" in t04 and "structures with signal" in t04,
         "tutorial 04: the faithfulness plot shows no setting with signal (a noise plot)")
    t05 = _read(html, "tutorials/05_edge_circuits.html")
    node = r"[a-z]+_\d+\.(?:features|error)/\d+/\d+"
    feature_edges = re.findall(rf"({node})\s*-&gt;\s*({node}|metric)", t05)
    need(any(".error/" not in u and ".error/" not in v for u, v in feature_edges),
         "tutorial 05: the feature-edge demo shows only error-node edges")
    need("node naming" in _text(t05).lower(), "tutorial 05: the feature/position naming (/15/0) is not explained")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pages", nargs="*", help="page names (e.g. concepts, api/generated/...); default all")
    parser.add_argument("--html", type=Path, default=ROOT / "docs" / "_build" / "html")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "_build" / "screenshots")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=4000)
    parser.add_argument("--chromium", default=None)
    parser.add_argument("--timeout", type=int, default=120)
    parser.add_argument("--checks-only", action="store_true", help="only the content checks (no browser)")
    args = parser.parse_args(argv)

    problems = content_checks(args.html)
    for problem in problems:
        print(f"FAIL content: {problem}")
    print(f"content checks: {len(problems)} failure(s)")
    if args.checks_only:
        return 1 if problems else 0
    chromium = [*offline_prefix(), find_chromium(args.chromium)]
    print("network:", "own namespace (unshare -rn)" if len(chromium) > 1 else "blocked by flags only")
    args.out.mkdir(parents=True, exist_ok=True)
    failed = []
    for page in pages(args.html, args.pages):
        if not page.exists():
            print(f"{page}: missing (build the docs first)")
            failed.append(page)
            continue
        rel = page.relative_to(args.html).with_suffix("")
        png = args.out / (str(rel).replace("/", "__") + ".png")
        shot = run(chromium, page, [f"--window-size={args.width},{args.height}",
                                    f"--screenshot={png}"], args.timeout)
        dom = run(chromium, page, ["--dump-dom"], args.timeout).stdout
        total, rendered = math_status(dom)
        ok = png.exists() and shot.returncode == 0 and rendered >= total
        print(f"{'ok  ' if ok else 'FAIL'} {rel}: math {rendered}/{total} rendered -> {png}")
        if not ok:
            failed.append(page)
    print(f"{len(failed)} page(s) failed" if failed else "all pages ok")
    return 1 if failed or problems else 0


if __name__ == "__main__":
    sys.exit(main())
