"""Debian's Chromium under Playwright (Playwright's own browser download does not work here)."""

from __future__ import annotations

from playwright.async_api import Browser, Playwright

CHROMIUM = "/usr/bin/chromium"
# Headless as root, and quiet: without the background-networking flags Chromium keeps
# trying hosts this sandbox cannot reach.
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


async def launch(playwright: Playwright, *, bfcache: bool = False) -> Browser:
    """Debian's Chromium, headless. Playwright turns the back/forward cache off
    (``--disable-back-forward-cache``); ``bfcache=True`` keeps it on, as in a user's browser."""
    ignored = ["--disable-back-forward-cache"] if bfcache else []
    return await playwright.chromium.launch(
        executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
        ignore_default_args=ignored,
    )
