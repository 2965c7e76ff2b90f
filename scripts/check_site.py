"""Check the built docs site offline: no external resources, formulas typeset in a browser.

    mkdocs build --strict && python scripts/check_site.py site

1. Static: no page or stylesheet references a script, style, font or image on another host.
2. Browser: headless Chromium (the Debian package ``chromium``) opens the main pages from a
   local server, lets their scripts run, and the rendered DOM must hold MathJax's output
   (``mjx-container``) for every formula of the page and no formula left as raw TeX
   (an arithmatex element still opening with a TeX delimiter). Every request Chromium made
   is read from its network log: any URL the page requested off the local server fails the
   check (the browser's own background requests carry no page origin and are not counted).

Exit status 0 when all holds; otherwise one line per problem and status 1.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

PAGES = [  # the main pages, and every page with formulas among them
    "",
    "getting-started/",
    "choosing/",
    "losses/mpo/",
    "losses/pairwise/",
    "losses/group/",
    "logps/",
    "reproductions/",
    "api/",
]
EXTERNAL = re.compile(
    r"""<(?:script|img|iframe|source|audio|video)\b[^>]*\bsrc=["']?(?:https?:)?//"""
    r"""|<link\b[^>]*\bhref=["']?(?:https?:)?//"""
    r"""|url\(\s*["']?(?:https?:)?//|@import\s+(?:url\()?["']?(?:https?:)?//""",
    re.I,
)
RAW_TEX = re.compile(r'class="arithmatex"[^>]*>\s*\\[(\[]')


def static_problems(site: Path) -> list[str]:
    """External resources referenced by the built HTML and CSS."""
    problems = []
    for path in sorted([*site.rglob("*.html"), *site.rglob("*.css")]):
        for m in EXTERNAL.finditer(path.read_text(errors="replace")):
            problems.append(f"{path.relative_to(site)}: external resource {m.group(0)!r}")
    return problems


def serve(site: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """A local HTTP server for the site on a free port."""
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def render(browser: str, url: str, netlog: Path) -> str:
    """The DOM of ``url`` after its scripts ran, from headless Chromium."""
    command = [
        browser,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-default-apps",
        "--disable-sync",
        "--virtual-time-budget=15000",
        f"--log-net-log={netlog}",
        "--dump-dom",
        url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"{browser} failed on {url}: {done.stderr.strip()[-500:]}")
    return done.stdout


def page_requests(netlog: Path, origin: str) -> list[str]:
    """URLs that the page (not the browser's own services) requested, from a network log.

    A request the page's HTML, CSS or scripts make carries the page's origin as its
    initiator; the browser's own background requests (update checks, accounts) carry none.
    """
    events = json.loads(netlog.read_text()).get("events", [])
    return [
        e["params"]["url"]
        for e in events
        if e.get("params", {}).get("initiator") == origin and "url" in e["params"]
    ]


def browser_problems(site: Path, browser: str) -> list[str]:
    """Pages whose formulas were not typeset, and requests that left the machine."""
    problems = []
    server, base = serve(site)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for page in PAGES:
                netlog = Path(tmp) / "net.json"
                dom = render(browser, base + page, netlog)
                name = page or "index"
                formulas = (site / page / "index.html").read_text().count('class="arithmatex"')
                typeset = dom.count("<mjx-container")
                if typeset < formulas:
                    problems.append(f"{name}: {typeset} of {formulas} formulas typeset")
                if RAW_TEX.search(dom):
                    problems.append(f"{name}: a formula left as raw TeX")
                urls = page_requests(netlog, base.rstrip("/"))
                problems += [f"{name}: request to {u}" for u in urls if not u.startswith(base)]
                print(
                    f"{name}: {typeset} of {formulas} formulas typeset, "
                    f"{len(urls)} requests, all to {base}"
                )
    finally:
        server.shutdown()
    return problems


def main() -> int:
    """Run both checks on a built site."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site", type=Path, help="the built site (mkdocs build's site/)")
    parser.add_argument("--browser", default="chromium", help="a Chromium binary")
    args = parser.parse_args()
    browser = shutil.which(args.browser)
    if browser is None:
        print(f"check_site: no {args.browser} on PATH (Debian: apt-get install chromium)")
        return 1
    problems = static_problems(args.site) + browser_problems(args.site, browser)
    for p in problems:
        print(f"check_site: {p}")
    print("check_site: ok" if not problems else f"check_site: {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
