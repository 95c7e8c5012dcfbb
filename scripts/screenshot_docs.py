"""Screenshot every page of the built docs in headless Chromium with the network off.

Build the site first (``python -m sphinx -W --keep-going -b html docs docs/_build/html``),
then::

    python scripts/screenshot_docs.py                      # every page
    python scripts/screenshot_docs.py concepts rules --height 6000

For each page it writes ``<out>/<page>.png`` (a 1280-px-wide window, tall enough for
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pages", nargs="*", help="page names (e.g. concepts, api/generated/...); default all")
    parser.add_argument("--html", type=Path, default=ROOT / "docs" / "_build" / "html")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "_build" / "screenshots")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=4000)
    parser.add_argument("--chromium", default=None)
    parser.add_argument("--timeout", type=int, default=120)
    args = parser.parse_args(argv)

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
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
