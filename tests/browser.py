"""A real headless Chromium (Debian's chromium + chromium-driver) driven by Selenium, and
the servers it talks to on an event loop of their own (Selenium's calls block).

    with ServerLoop() as loop:
        stack = loop.enter(provider_stack(...))
        browser = Browser.start(stack.fronts["aiohttp"], shots_dir)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import pytest

CHROMIUM = Path(os.environ.get("IMAGEGATE_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("IMAGEGATE_CHROMEDRIVER", "/usr/bin/chromedriver"))
WAIT_S = 30.0
T = TypeVar("T")


def require_browser() -> None:
    """Skip (locally) or fail (CI=true) when Chromium, its driver or Selenium is missing."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (dev extra)")
    if missing:
        _unavailable(
            f"no browser for the console tests: {', '.join(missing)} missing "
            "(apt-get install chromium chromium-driver)"
        )


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason}; CI=true, so the browser tests must run", pytrace=False)
    pytest.skip(reason)


class ServerLoop:
    """An asyncio loop in a thread for the servers; run() waits for a coroutine there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._exits: list[Callable[[], Coroutine[Any, Any, object]]] = []

    def __enter__(self) -> ServerLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            while self._exits:
                self.run(self._exits.pop()())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def enter(self, cm: contextlib.AbstractAsyncContextManager[T]) -> T:
        """Enter an async context manager on the loop; it is exited when the loop closes."""
        value = self.run(cm.__aenter__())
        self._exits.append(lambda: cm.__aexit__(None, None, None))
        return value

    def later(self, close: Callable[[], Coroutine[Any, Any, object]]) -> None:
        self._exits.append(close)


@dataclass
class Browser:
    """One Chromium for a test module; every URL it requested is kept (network log)."""

    driver: Any
    base_url: str
    shots: Path
    downloads: Path
    requests: list[str] = field(default_factory=list)
    responses: list[dict[str, Any]] = field(default_factory=list)
    _visits: int = 0

    @classmethod
    def start(cls, base_url: str, shots: Path, downloads: Path) -> Browser:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for argument in (
            "--headless=new",
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--disable-gpu",
            "--window-size=1280,900",
            "--force-device-scale-factor=1",
            "--hide-scrollbars",
        ):
            options.add_argument(argument)
        options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        driver.set_script_timeout(WAIT_S)
        driver.execute_cdp_cmd(
            "Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
        )
        return cls(driver, base_url, shots, downloads)

    def quit(self) -> None:
        self.driver.quit()

    # --- the network log -----------------------------------------------------------

    def collect_network(self) -> None:
        """Drain Chromium's performance log into requests/responses (it empties on read)."""
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            params = message.get("params", {})
            if message["method"] == "Network.requestWillBeSent":
                self.requests.append(params["request"]["url"])
            elif message["method"] == "Network.responseReceived":
                self.responses.append(params["response"])

    # --- pages ---------------------------------------------------------------------

    def open(self, page: str = "", base_url: str | None = None) -> None:
        """Load the console afresh (a new query each time, so the app starts over)."""
        self._visits += 1
        self.driver.get(f"{base_url or self.base_url}/console/?v={self._visits}#/{page}")
        self.collect_network()

    def page(self, name: str) -> Any:
        """Open a page and wait until it has rendered."""
        self.open(name)
        return self.wait_css(f"#page-{name}[data-ready='true']")

    def wait(self, condition: Callable[[Any], T], timeout: float = WAIT_S) -> T:
        from selenium.common.exceptions import StaleElementReferenceException
        from selenium.webdriver.support.ui import WebDriverWait

        # A page that redraws replaces its elements: look again rather than fail.
        waiting = WebDriverWait(
            self.driver, timeout, ignored_exceptions=(StaleElementReferenceException,)
        )
        result: T = waiting.until(condition)
        return result

    def wait_css(self, selector: str, timeout: float = WAIT_S) -> Any:
        from selenium.webdriver.common.by import By

        def found(driver: Any) -> Any:
            elements = driver.find_elements(By.CSS_SELECTOR, selector)
            return elements[0] if elements and elements[0].is_displayed() else False

        return self.wait(found, timeout)

    def css(self, selector: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, selector)

    def all_css(self, selector: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        found: list[Any] = self.driver.find_elements(By.CSS_SELECTOR, selector)
        return found

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def sign_in(self, key: str) -> None:
        from selenium.webdriver.common.keys import Keys

        self.driver.delete_all_cookies()
        self.open()
        field = self.wait_css("#signin-key")
        # Keyboard only: type the key and press Enter.
        field.send_keys(key + Keys.ENTER)
        self.wait_css("#nav a")
        self.wait_css("main section[data-ready='true']")
        self.collect_network()

    def unlabelled_controls(self) -> list[str]:
        """Form controls on the page without a label or aria-label."""
        found: list[str] = self.js(
            """return [...document.querySelectorAll('input, select, textarea, button')]
                .filter(e => e.offsetParent !== null)
                .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                             && !(e.tagName === 'BUTTON' && e.textContent.trim()))
                .map(e => e.outerHTML.slice(0, 120));"""
        )
        return found

    def shot(self, name: str, *, themes: tuple[str, ...] = ("light", "dark")) -> None:
        """Full-page screenshots of the current page, in each theme (set by the app's own
        toggle, then forgotten)."""
        width = self.js("return window.innerWidth;")
        for theme in themes:
            pressed = self.css("#theme").get_attribute("aria-pressed") == "true"
            if pressed != (theme == "dark"):
                self.css("#theme").click()
            height = self.js("return document.documentElement.scrollHeight;")
            metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
            self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
            try:
                self.driver.save_screenshot(str(self.shots / f"{name}-{theme}.png"))
            finally:
                self.driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        self.js("localStorage.clear(); delete document.documentElement.dataset.theme;")
