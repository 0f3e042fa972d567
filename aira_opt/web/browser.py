"""The page in a real headless Chromium, driven by Playwright: what the tests, the speed benchmark and the
screenshot use. Debian's Chromium (`apt-get install chromium`), never a downloaded browser; Playwright's Python
package drives it (`pip install 'aira-opt[browser]'`). Every request the page makes is recorded, so a caller can
prove that nothing left the loopback address."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aira_opt.core.errors import AiraOptError, MissingExtraError

CHROMIUM = ("/usr/lib/chromium/chromium", "chromium", "chromium-browser", "google-chrome")  # the binary first: not
# Debian's wrapper script, which adds flags of its own
# Headless, as root, on a machine with no network: without the background-networking flags Chromium keeps
# trying to reach Google's hosts.
CHROMIUM_ARGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
READY = "body[data-ready=true]"


def find_chromium() -> str | None:
    """A Chromium binary (AIRA_OPT_CHROMIUM, else Debian's, else one on PATH)."""
    if os.environ.get("AIRA_OPT_CHROMIUM"):
        return os.environ["AIRA_OPT_CHROMIUM"]
    for name in CHROMIUM:
        found = name if os.path.isfile(name) and os.access(name, os.X_OK) else shutil.which(name)
        if found:
            return found
    return None


@dataclass
class PageSession:
    """One loaded page: `ask` runs window.aira.ask (the form's own path) and returns its result."""

    page: Any  # playwright.sync_api.Page
    requests: list[str] = field(default_factory=list)  # every URL the page asked for
    errors: list[str] = field(default_factory=list)  # uncaught page errors

    def ask(self, question: str, timeout_s: float = 600, **options: Any) -> dict[str, Any]:
        self.page.set_default_timeout(timeout_s * 1000)
        return self.page.evaluate("([q, o]) => window.aira.ask(q, o)", [question, options])

    def off_loopback(self) -> list[str]:
        """Requests to anything but this machine (data: and blob: URLs stay in the page)."""
        return [url for url in self.requests
                if urlsplit(url).scheme in ("http", "https", "ws", "wss") and urlsplit(url).hostname not in LOOPBACK]

    def type_and_send(self, question: str, timeout_s: float = 600) -> str:
        """Ask through the form, as a visitor does; the answer's text once its timing line appears."""
        before = self.page.locator(".turn.model .meta").count()
        self.page.fill("#question", question)
        self.page.click("#send")
        self.page.locator(".turn.model .meta").nth(before).wait_for(timeout=timeout_s * 1000)
        answer = self.page.locator(".turn.model").nth(before)
        return answer.evaluate("node => node.firstChild.textContent")


@contextlib.contextmanager
def headless_chromium() -> Iterator[Any]:
    """A launched Chromium (playwright's Browser); closed on exit."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        raise MissingExtraError("the headless browser driver (Playwright)", "browser") from exc
    chromium = find_chromium()
    if chromium is None:
        raise AiraOptError("no Chromium found: apt-get install -y --no-install-recommends chromium "
                           "(or set AIRA_OPT_CHROMIUM to a Chromium binary)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=list(CHROMIUM_ARGS))
        try:
            yield browser
        finally:
            browser.close()


@contextlib.contextmanager
def open_page(browser: Any, url: str, timeout_s: float = 120,
              viewport: tuple[int, int] = (900, 640)) -> Iterator[PageSession]:
    """The chat page at `url`, loaded and ready (its models listed, the form enabled)."""
    page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
    session = PageSession(page)
    page.on("request", lambda request: session.requests.append(request.url))
    page.on("pageerror", lambda error: session.errors.append(str(error)))
    try:
        page.goto(url)
        page.wait_for_selector(READY, timeout=timeout_s * 1000)
        yield session
    finally:
        page.close()


def screenshot(session: PageSession, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    session.page.screenshot(path=str(path), full_page=True)
    return path
