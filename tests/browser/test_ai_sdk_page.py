"""The AI SDK's ``useChat`` in Chromium against a real edge + worker + fake LLM: a page
bundled at setup by esbuild from the npm packages (``ai``, ``@ai-sdk/react``, React;
``tests/frontends/node/page.jsx``) streams a turn, is reloaded mid-answer, resumes the
answer's stream and shows the whole answer once."""

from __future__ import annotations

import re
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page, Request, Route, expect

from tests.support.ai_sdk import NODE_DIR, ensure_node_modules
from tests.support.fakellm import TRICKY_TEXT, FakeLLM

pytestmark = pytest.mark.asyncio(loop_scope="module")

WAIT_MS = 15_000
PAGE_PATH = "/ai-sdk-test-page"  # answered by the test (Playwright), not by the edge
SCRIPT_PATH = "/ai-sdk-test-page.js"
PAGE_HTML = ('<!doctype html><meta charset="utf-8"><div id="root"></div>'
             f'<script src="{SCRIPT_PATH}"></script>')
ANSWER = "The first sentence. The second sentence arrives after the reload. The third ends it."
STREAM_PATH = re.compile(r"/v1/ai-sdk/chat/[^/]+/stream$")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The page's script: esbuild bundles page.jsx with the packages in node_modules."""
    ensure_node_modules()
    out = tmp_path_factory.mktemp("ai-sdk-page") / "page.js"
    subprocess.run(["node", "build_page.mjs", str(out)], cwd=NODE_DIR, check=True, timeout=60)
    return Path(out).read_bytes()


@pytest_asyncio.fixture(loop_scope="module")
async def chat_page(browser: Browser, edge_url: str, bundle: bytes) -> AsyncIterator[Page]:
    """A page on the edge's origin (so its requests are same-origin) whose document and
    script the test serves; every other request goes to the edge."""
    context = await browser.new_context(base_url=edge_url)
    context.set_default_timeout(WAIT_MS)

    async def serve(route: Route) -> None:
        path = route.request.url.split("?", 1)[0].removeprefix(edge_url)
        if path == PAGE_PATH:
            await route.fulfill(body=PAGE_HTML, content_type="text/html")
        else:
            await route.fulfill(body=bundle, content_type="text/javascript")

    await context.route(re.compile(f"{re.escape(edge_url)}({PAGE_PATH}|{SCRIPT_PATH})"), serve)
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield page
    finally:
        await context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


async def test_use_chat_streams_is_reloaded_mid_turn_and_shows_the_whole_answer_once(
    chat_page: Page, fake_llm: FakeLLM
) -> None:
    answer = f"{ANSWER} {TRICKY_TEXT}"
    question = fake_llm.script(f"ai-sdk page {uuid.uuid4().hex}", answer, hold_at=6)
    page = chat_page
    resumes: list[Request] = []
    page.on("request", lambda r: resumes.append(r) if STREAM_PATH.search(r.url) else None)
    await page.goto(f"{PAGE_PATH}?chat=page-{uuid.uuid4().hex}")
    await expect(page.locator("#status")).to_have_text("ready")  # nothing to resume yet
    await page.fill("input[name=question]", question)
    await page.click("button[type=submit]")
    assistant = page.locator(".message.assistant")
    await expect(assistant).to_have_count(1)
    await expect(assistant.locator(".text")).not_to_have_text("")
    partial = "".join(await assistant.locator(".text").all_text_contents())
    assert partial and answer.startswith(partial) and len(partial) < len(answer)

    await page.reload()  # mid-answer: the LLM holds the rest
    await expect(page.locator("#status")).to_have_text("streaming")
    await expect(assistant.locator(".text")).not_to_have_text("")
    fake_llm.reply_for(question).release.set()
    await expect(page.locator("#status")).to_have_text("ready")
    await expect(assistant).to_have_count(1)
    assert "".join(await assistant.locator(".text").all_text_contents()) == answer
    assert (await page.locator("main").text_content() or "").count("The second sentence") == 1
    assert [r.method for r in resumes][-1] == "GET" and len(resumes) == 2  # load, reload
    statuses = [(await r.response()).status for r in resumes]  # type: ignore[union-attr]
    assert statuses == [204, 200]
