"""The status page: its login, its session cookie, and the page itself in a real browser."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from trio_sync.server.auth import SESSION_COOKIE

from .conftest import TOKEN, ServerHandle

AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def test_the_page_logs_in_with_a_token_and_reads_with_a_cookie(server: ServerHandle) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        shell = await client.get("/")
        assert shell.status_code == 200
        assert "default-src 'none'" in shell.headers["content-security-policy"]
        assert (await client.get("/status.json")).status_code == 401
        wrong = await client.post("/login", json={"token": "not-the-token"})
        assert wrong.status_code == 401
        assert SESSION_COOKIE not in wrong.cookies
        right = await client.post("/login", json={"token": TOKEN})
        assert right.status_code == 200
        cookie = right.headers["set-cookie"]
        assert "HttpOnly" in cookie
        assert "SameSite=Strict" in cookie
        assert TOKEN not in cookie
        status = (await client.get("/status.json")).json()
        assert status["storage"]["files"] == 0
        assert status["version"]
        # The cookie reads; it never writes (a page from elsewhere could not send it anyway).
        made = await client.post("/commit", json={"path": "d", "base_rev": 0, "kind": "dir"})
        assert made.status_code == 401
        await client.post("/logout")
        assert (await client.get("/status.json")).status_code == 401


def _browser(scratch: Path) -> Any:
    """A headless Chromium driven by Selenium, or a skip that says what is missing. Its
    profile and the temp files it would leave in /tmp go in *scratch*."""
    try:
        from selenium import webdriver
    except ImportError:
        pytest.skip("the page's browser test needs selenium (pip install selenium)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip(
            "the page's browser test needs Chromium and its driver:"
            " apt-get install chromium chromium-driver"
        )
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={scratch / 'profile'}")
    service = Service(driver, env={**os.environ, "TMPDIR": str(scratch)})
    return webdriver.Chrome(service=service, options=options)


@pytest.fixture
def browser() -> Iterator[Any]:
    # Not tmp_path: Chromium puts a Unix socket in its temp folder, and a socket's path is
    # limited to 107 bytes. Left in /tmp, each run would leave its folder behind.
    with tempfile.TemporaryDirectory(prefix="trio-sync-chromium-") as scratch:
        driver = _browser(Path(scratch))
        try:
            yield driver
        finally:
            driver.quit()


async def test_the_page_in_a_browser_shows_a_change_without_reloading(
    browser: Any, server: ServerHandle, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait

    def wait_for(condition: Any) -> Any:
        return WebDriverWait(browser, 20).until(condition)

    async def run(fn: Any, *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args)

    await run(browser.get, server.url + "/")
    await run(wait_for, seen.visibility_of_element_located((By.ID, "token")))
    box = browser.find_element(By.ID, "token")
    await run(box.send_keys, "a wrong token")
    await run(browser.find_element(By.CSS_SELECTOR, "#login-form button").click)
    await run(wait_for, seen.text_to_be_present_in_element((By.ID, "error"), "not accepted"))
    assert not browser.find_element(By.ID, "status").is_displayed()
    assert browser.find_element(By.ID, "clients").text == ""  # a wrong token gets no data

    await run(box.send_keys, TOKEN)
    await run(browser.find_element(By.CSS_SELECTOR, "#login-form button").click)
    await run(wait_for, seen.visibility_of_element_located((By.ID, "status")))
    await run(wait_for, seen.text_to_be_present_in_element((By.ID, "clients"), "127.0.0.1"))
    async with httpx.AsyncClient(base_url=server.url, timeout=10, headers=AUTH) as client:
        made = await client.post(
            "/commit", json={"path": "made-live", "base_rev": 0, "kind": "dir"}
        )
        assert made.status_code == 200
    await run(wait_for, seen.text_to_be_present_in_element((By.ID, "changes"), "made-live"))
    assert "folder" in browser.find_element(By.ID, "changes").text
    assert TOKEN not in browser.current_url
