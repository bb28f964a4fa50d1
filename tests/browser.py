"""Debian's headless Chromium, driven by Playwright, for the tests marked ``explorer``.

Chromium is a Debian package (``.ci/run`` installs it; locally ``apt-get install chromium``).
Without it these tests are skipped, unless ``FORKPOP_REQUIRE_BROWSER=1`` (CI sets it): then
they fail, so a CI without a browser cannot pass them by skipping.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import pytest

CHROMIUM = os.environ.get("FORKPOP_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# No background traffic: the browser itself asks no host for anything (updates, sync, QUIC).
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
    "--disable-default-apps",
    # no host but this machine resolves: a request meant for one fails (and is counted) here
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
]
ARTIFACTS = Path(os.environ.get("FORKPOP_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))


def _require() -> None:
    missing = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing = "playwright is not installed (pip install -e '.[dev]')"
    if missing is None and not Path(CHROMIUM).exists():
        missing = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    if missing:
        if os.environ.get("FORKPOP_REQUIRE_BROWSER") == "1":
            pytest.fail(missing)
        pytest.skip(missing)


@contextmanager
def browser():
    """A headless Chromium of its own (a fresh profile), closed afterwards."""
    _require()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


class Requests:
    """Every request a page (and its frames) makes, seen from the browser."""

    LOCAL_SCHEMES = ("blob", "data", "about", "chrome-error")

    def __init__(self, page):  # noqa: ANN001 - a Playwright page
        self.urls: list[str] = []
        page.on("request", lambda r: self.urls.append(r.url))

    def off_machine(self) -> list[str]:
        """The requests for any host but this machine (none: the page asked nobody else)."""
        out = []
        for url in self.urls:
            u = urlparse(url)
            if u.scheme in self.LOCAL_SCHEMES or (u.scheme == "file" and not u.netloc):
                continue
            if (u.hostname or "") not in ("127.0.0.1", "localhost"):
                out.append(url)
        return sorted(set(out))


def screenshot(page, name: str) -> Path:  # noqa: ANN001
    """A screenshot kept as a test artifact (``FORKPOP_TEST_ARTIFACTS``, default ./test-artifacts)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
