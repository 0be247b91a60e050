"""Headless Chromium for the viewer tests, driven by Playwright's Python package.

The browser is the system's Debian `chromium` (launch/test.sh installs it when running as root);
Playwright is told its path (`executable_path`), so nothing is downloaded at run time. Without
either the caller's test skips with the reason. Every request the page makes is recorded, so a test
can assert that a page is self-contained (file: and data: URLs only).
"""
from __future__ import annotations

import contextlib
import os
import shutil

import pytest

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium_path() -> str | None:
    env = os.environ.get("NLA_CHROMIUM")
    if env:
        return env if os.path.isfile(env) else None
    for name in CANDIDATES:
        p = shutil.which(name)
        if p:
            return p
    return None


@contextlib.contextmanager
def page(viewport=(1200, 800)):
    """A fresh page: yields (page, requests, errors): URLs requested and uncaught page errors."""
    exe = chromium_path()
    if exe is None:
        pytest.skip("no chromium on this machine (launch/test.sh installs Debian's chromium when run as root)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed (requirements.txt)")
    with sync_playwright() as p:
        # --no-sandbox: the tests run as root in CI, where Chromium's sandbox refuses to start
        browser = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            pg = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            requests, errors = [], []
            pg.on("request", lambda r: requests.append(r.url))
            pg.on("pageerror", lambda e: errors.append(str(e)))
            yield pg, requests, errors
        finally:
            browser.close()


def external(requests) -> list[str]:
    """Requests that left the page's own file (anything but file: and data: URLs)."""
    return [u for u in requests if not u.startswith(("file:", "data:", "about:"))]
