"""The demo page as a person sees it, at a desktop (1280 px) and a phone (390 px) width, on
`broker dev` and on a real `broker edge` + `broker worker` + redis-server + fake LLM.

Each flow collects every console message and uncaught error of the page (Chromium logs any
4xx/5xx a page's requests get as a console error: a favicon 404, a pointless cancel's 409),
checks that nothing is wider than the viewport or its own box, and reads the texts a person
reads (the status line, the notice, each viewer's state) at every step. Screenshots of each
step go to `$BROKER_SCREENSHOTS` (default: a pytest temporary directory), for a person to
look at; they are not compared with stored images.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page

from broker.tools.mockllm import streamed_messages

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.browser]

WAIT_MS = 20_000
WIDTHS = [1280, 390]

# Every rendered element: its box within the viewport, its content within its box.
OVERFLOW = """
() => {
    const root = document.documentElement;
    const width = root.clientWidth;
    const name = (el) => el.tagName.toLowerCase() + (el.id ? '#' + el.id : '')
        + (el.className && typeof el.className === 'string' ? '.' + el.className.trim()
            .split(/\\s+/).join('.') : '');
    const problems = [];
    if (root.scrollWidth > width) problems.push(`document ${root.scrollWidth} > ${width}`);
    for (const el of document.body.querySelectorAll('*')) {
        const box = el.getBoundingClientRect();
        if (box.width === 0 && box.height === 0) continue;  // not rendered
        if (box.left < -0.5 || box.right > width + 0.5) {
            problems.push(`${name(el)} spans ${box.left.toFixed(1)}..${box.right.toFixed(1)}`);
        }
        if (el.clientWidth > 0 && el.scrollWidth > el.clientWidth + 1) {
            problems.push(`${name(el)} content ${el.scrollWidth} > box ${el.clientWidth}`);
        }
    }
    return problems;
}
"""

TEXTS = """
() => ({
    notice: document.querySelector('#notice').textContent,
    status: document.querySelector('#status-line').textContent,
    cancelDisabled: document.querySelector('#cancel').disabled,
    viewers: [...document.querySelectorAll('.viewer')].map((v) => ({
        state: v.querySelector('.state').textContent,
        dataState: v.dataset.state,
        dropDisabled: v.querySelector('.drop').disabled,
        color: getComputedStyle(v.querySelector('.state')).color,
    })),
})
"""

# The colour a CSS custom property of the page resolves to, as computed colours are written.
COLOR_OF = """
name => {
    const probe = document.createElement('span');
    probe.style.color = `var(${name})`;
    document.body.append(probe);
    const color = getComputedStyle(probe).color;
    probe.remove();
    return color;
}
"""


class Screen:
    """One page at one width, with what its console said."""

    def __init__(self, page: Page, width: int, shots: Path, label: str) -> None:
        self.page = page
        self.width = width
        self.shots = shots
        self.label = label
        self.console: list[str] = []
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))

    @property
    def errors(self) -> list[str]:
        return [m for m in self.console if m.startswith(("error", "pageerror"))]

    async def check(self, step: str) -> dict[str, Any]:
        """Screenshot, no overflow, no console error so far; the texts on screen."""
        path = self.shots / f"{self.label}-{self.width}-{step}.png"
        await self.page.screenshot(path=str(path), full_page=True)
        assert await self.page.evaluate(OVERFLOW) == [], f"{step} at {self.width} px ({path})"
        assert self.errors == [], f"console errors by {step} at {self.width} px: {self.errors}"
        texts: dict[str, Any] = await self.page.evaluate(TEXTS)
        return texts

    async def wait(self, condition: str, arg: Any = None) -> None:
        await self.page.wait_for_function(condition, arg=arg, timeout=WAIT_MS)


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = os.environ.get("BROKER_SCREENSHOTS")
    path = Path(where) if where else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(params=["dev", "edge"])
def base_url(request: pytest.FixtureRequest) -> str:
    """`broker dev`, or a real edge + worker + redis-server + fake LLM."""
    url: str = request.getfixturevalue("broker_url" if request.param == "dev" else "edge_url")
    return url


@pytest_asyncio.fixture(loop_scope="module", params=WIDTHS, ids=lambda w: f"{w}px")
async def screen(request: pytest.FixtureRequest, browser: Browser, base_url: str,
                 shots: Path) -> AsyncIterator[Screen]:
    width: int = request.param
    context = await browser.new_context(base_url=base_url,
                                        viewport={"width": width, "height": 900})
    context.set_default_timeout(WAIT_MS)
    page = await context.new_page()
    label = request.node.name.split("[")[0].removeprefix("test_")
    backend = "edge" if "edge" in request.node.callspec.id else "dev"
    try:
        yield Screen(page, width, shots, f"{label}-{backend}")
    finally:
        await context.close()


async def ask_and_wait_live(screen: Screen, messages: int) -> None:
    await screen.page.click("#ask")
    await screen.wait("""n => {
        const v = window.demo.viewers[0];
        return Boolean(v) && v.state === 'live' && v.messages >= n;
    }""", messages)


async def wait_terminal(screen: Screen, count: int) -> None:
    await screen.wait("""n => window.demo.viewers.length === n
        && window.demo.viewers.every((v) => v.terminal !== null)""", count)


async def test_an_answer_from_load_to_end(screen: Screen) -> None:
    await screen.page.goto("/")
    loaded = await screen.check("1-loaded")
    assert (loaded["notice"], loaded["status"], loaded["viewers"]) == ("", "none yet", [])

    await ask_and_wait_live(screen, 2)
    await screen.page.click("#add-viewer")
    await screen.wait("() => window.demo.viewers.length === 2 "
                      "&& window.demo.viewers[1].state === 'live'")
    live = await screen.check("2-live")
    assert live["notice"] == "Generation created: viewer #1 follows its stream below."
    assert live["status"] == "running"  # not the create answer's "queued" any more
    assert [v["state"] for v in live["viewers"]] == ["live", "live"]
    assert not live["cancelDisabled"]

    await wait_terminal(screen, 2)
    gen_text: str = await screen.page.evaluate("() => window.demo.viewers[0].text")
    length = await screen.page.evaluate("() => window.demo.viewers[0].text.length")  # UTF-16
    await screen.wait("s => document.querySelector('#status-line').textContent === s",
                      f"completed · text {length} chars · finish_reason stop")
    ended = await screen.check("3-ended")
    assert ended["notice"] == "The answer is complete (finish_reason stop)."
    assert [v["state"] for v in ended["viewers"]] == ["complete", "complete"]
    assert ended["cancelDisabled"], "Cancel stays enabled: a click could only get a 409"
    assert all(v["dropDisabled"] for v in ended["viewers"])
    assert {v["color"] for v in ended["viewers"]} == {await screen.page.evaluate(
        COLOR_OF, "--ok")}

    # The first band is the first words, out at once; every band after it one whole sentence.
    bands = await screen.page.locator(".viewer").nth(0).locator(".answer .msg").all_inner_texts()
    assert "".join(bands) == gen_text
    assert bands == streamed_messages(gen_text, bands[0])


async def test_a_cancelled_answer_reads_cancelled(screen: Screen) -> None:
    await screen.page.goto("/")
    await ask_and_wait_live(screen, 1)
    await screen.page.click("#cancel")
    await wait_terminal(screen, 1)
    await screen.wait("() => document.querySelector('#status-line').textContent"
                      ".startsWith('cancelled · text ')")
    cancelled = await screen.check("cancelled")
    assert cancelled["notice"] == ("Cancelled: the answer stopped early; every viewer has the "
                                   "same text up to there.")
    assert cancelled["status"].endswith(" chars · finish_reason cancelled")
    (viewer,) = cancelled["viewers"]
    assert (viewer["state"], viewer["dataState"]) == ("cancelled", "ended")
    assert viewer["color"] == await screen.page.evaluate(COLOR_OF, "--warn")
    assert viewer["color"] != await screen.page.evaluate(COLOR_OF, "--ok")
    assert cancelled["cancelDisabled"] and viewer["dropDisabled"]
