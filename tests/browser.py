"""Headless Chromium for the browser tests, kept from sending anything off 127.0.0.1.

Debian's chromium package is driven by Playwright without Playwright's own
browser download. Two guards keep every request on this machine: Chromium's
host resolver fails every name but 127.0.0.1, and a route handler aborts any
request to another host (the Prefect UI loads an outside analytics script on
every page, whatever the server's analytics setting).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]


@contextmanager
def local_page(blocked: list[str]) -> Iterator[object]:
    """Yield a Playwright page whose requests to other hosts are aborted.

    Each aborted URL is appended to `blocked`, so a test can show what the page
    tried to reach.
    """
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000})

            def guard(route, request) -> None:
                if urlsplit(request.url).hostname == "127.0.0.1":
                    route.continue_()
                    return
                if not request.url.startswith(("data:", "blob:")):
                    blocked.append(request.url)
                route.abort()

            context.route("**/*", guard)
            yield context.new_page()
        finally:
            browser.close()
