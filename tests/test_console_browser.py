"""The web console end to end in a real headless Chromium: sign in, the playground,
keys used with the official SDK, usage and balance, the operator's pages; and its
security seen from the browser (the network log, CSP, a cross-site POST).

One browser and one set of servers for the module. The screenshots in
docs/console/ are taken here (`make screenshots` writes them there; otherwise
they go to a temporary directory).
"""

from __future__ import annotations

import csv
import io
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web

from service import keys as service_keys
from service.money import usd_to_micros
from tests.browser import Browser, ServerLoop, require_browser
from tests.conftest import Stack, Tenant, make_tenant
from tests.fakes.base import Fault
from tests.fakes.openai import OPENAI_KEY, FakeOpenAI
from tests.providers_harness import FAST_DISPATCH, model, provider, provider_stack, route

pytestmark = pytest.mark.browser
REPO = Path(__file__).resolve().parents[1]
BROKEN_MODEL = "broken-image"
BROKEN_ROUTE = ("failing", "gpt-image-1")


class Console:
    """What the tests share: the servers' loop, the stack, the browser, the tenant."""

    def __init__(self, loop: ServerLoop, stack: Stack, browser: Browser, tenant: Tenant) -> None:
        self.loop, self.stack, self.browser, self.tenant = loop, stack, browser, tenant
        # Every key the browser was given: none may appear in a URL it requested.
        self.secrets = [tenant.key]

    @property
    def url(self) -> str:
        return self.stack.fronts["aiohttp"]

    def balance(self, account: str) -> int:
        found = self.loop.run(self.stack.service.store.get_account(account))
        assert found is not None
        return found.balance_micros

    def sdk(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0)


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    require_browser()
    shots_env = os.environ.get("IMAGEGATE_SCREENSHOTS")
    shots = Path(shots_env) if shots_env else tmp_path_factory.mktemp("shots")
    shots.mkdir(parents=True, exist_ok=True)
    with ServerLoop() as loop:
        failing = FakeOpenAI()
        loop.run(failing.start())
        loop.later(failing.stop)
        stack = loop.enter(
            provider_stack(
                tmp_path_factory.mktemp("console-browser"),
                providers={"failing": provider("openai", failing.base_url + "/v1")},
                models={
                    BROKEN_MODEL: model(
                        route(*BROKEN_ROUTE),
                        family="gpt-image",
                        sizes=["1024x1024"],
                        qualities=["medium"],
                        default_quality="medium",
                        prices={"medium": {"1024x1024": 40_000}},
                    )
                },
                env={"OPENAI_API_KEY": OPENAI_KEY},
                # The breaker stays open for the whole module once it has opened.
                dispatch={**FAST_DISPATCH, "breaker_cooldown_s": 3600},
                envoy=False,
            )
        )
        # Every call to the failing upstream gets a 500.
        failing.inject(*[Fault.SERVER_ERROR] * 50)
        tenant = loop.run(make_tenant(stack.service, credit_usd="5"))
        browser = Browser.start(
            stack.fronts["aiohttp"], shots, tmp_path_factory.mktemp("downloads")
        )
        try:
            yield Console(loop, stack, browser, tenant)
        finally:
            browser.quit()


def text(browser: Browser, selector: str) -> str:
    found: str = browser.wait_css(selector).text
    return found


def test_sign_in_and_generate_in_the_playground(console: Console) -> None:
    browser = console.browser
    browser.sign_in(console.tenant.key)
    browser.page("playground")
    assert browser.unlabelled_controls() == []
    before = console.balance(console.tenant.account)
    browser.css("#pg-size option[value='256x256']").click()
    browser.css("#pg-generate").click()
    image = browser.wait_css("#pg-images img.generated")
    # Rendered: the browser decoded it at the size asked for.
    browser.wait(lambda _: browser.js("return arguments[0].complete;", image))
    assert browser.js("return arguments[0].naturalWidth;", image) == 256
    cost = text(browser, "#pg-cost")
    spent = before - console.balance(console.tenant.account)
    assert spent > 0 and cost == f"${spent // 1_000_000}.{spent % 1_000_000:06d}"
    assert text(browser, "#pg-route") == "local/local"
    assert text(browser, "#pg-latency").endswith(" ms")
    download = browser.css("#pg-images a.download")
    assert download.get_attribute("download") == "imagegate-1.png"
    assert download.get_attribute("href").startswith("data:image/png;base64,")
    browser.shot("playground")
    # As a link: the image the service stores and serves, signed, from this origin.
    browser.css("#pg-response option[value='url']").click()
    browser.css("#pg-generate").click()
    browser.wait(lambda _: text(browser, "#pg-status").startswith("Done"))
    linked = browser.wait_css("#pg-images img.generated")
    assert linked.get_attribute("src").startswith(f"{console.url}/v1/images/files/")
    browser.wait(lambda _: browser.js("return arguments[0].complete;", linked))
    assert browser.js("return arguments[0].naturalWidth;", linked) == 256


def test_playground_shows_previews_as_they_stream(console: Console) -> None:
    browser = console.browser
    browser.page("playground")
    browser.css("#pg-size option[value='256x256']").click()
    browser.css("#pg-stream").click()
    partials = browser.css("#pg-partials")
    partials.clear()
    partials.send_keys("2")
    browser.css("#pg-generate").click()
    image = browser.wait_css("#pg-images img.generated")
    browser.wait(lambda _: browser.js("return arguments[0].complete;", image))
    assert browser.js("return arguments[0].naturalWidth;", image) == 256
    assert browser.css("#pg-images").get_attribute("data-previews") == "2"
    assert browser.all_css("#pg-images img.partial") == []  # replaced by the image
    assert text(browser, "#pg-status").startswith("Done")


def test_balance_and_usage_pages(console: Console) -> None:
    browser = console.browser
    browser.page("balance")
    micros = console.balance(console.tenant.account)
    shown = browser.css("#balance-usd")
    assert int(shown.get_attribute("data-micros")) == micros
    assert shown.text == f"${micros // 1_000_000}.{micros % 1_000_000:06d}"
    browser.shot("balance")
    browser.page("usage")
    # The playground's requests (the streamed one is settled just after its last event).
    rows = browser.wait(lambda _: _settled_rows(browser, 3))
    assert "settled" in rows[0].text and "local/local" in rows[0].text
    assert browser.all_css("#usage-charts svg rect")  # bars of today's spend
    assert browser.unlabelled_controls() == []
    # CSV export: what the table shows, one line per request.
    browser.css("#usage-csv").click()
    exported = browser.downloads / "imagegate-usage.csv"
    browser.wait(lambda _: exported.is_file() and exported.stat().st_size > 0)
    lines = list(csv.DictReader(io.StringIO(exported.read_text())))
    assert [line["status"] for line in lines] == ["settled"] * 3
    assert {line["request_id"] for line in lines} == {
        row.get_attribute("data-request-id") for row in rows
    }
    assert all(line["model"] == "local" and line["route"] == "local/local" for line in lines)
    exported.unlink()
    browser.shot("usage")
    browser.css("#usage-text").send_keys("no-such-route")
    browser.wait(lambda _: text(browser, "#usage-count").startswith("0 of 3"))


def _settled_rows(browser: Browser, count: int) -> list[Any] | bool:
    rows = browser.all_css("#usage-records tbody tr")
    if len(rows) == count and all("settled" in row.text for row in rows):
        return rows
    browser.page("usage")  # not yet: load the page again
    return False


def _usage_rows(browser: Browser) -> dict[str, str]:
    return {
        row.get_attribute("data-request-id"): row.text
        for row in browser.all_css("#usage-records tbody tr")
    }


def test_key_created_in_the_console_works_with_the_sdk_until_revoked(console: Console) -> None:
    browser = console.browser
    browser.page("keys")
    browser.css("#key-name").send_keys("from-console")
    browser.css("#key-create").click()
    assert browser.unlabelled_controls() == []
    key = text(browser, "#key-value")
    assert key.startswith(service_keys.PREFIX)
    console.secrets.append(key)
    browser.wait(lambda _: browser.css("#keys-table").text.count("from-console") == 1)
    # The copy button puts the key on the clipboard.
    browser.driver.execute_cdp_cmd(
        "Browser.grantPermissions",
        {"origin": console.url, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]},
    )
    browser.css("#key-copy").click()
    browser.wait(lambda _: browser.css("#key-copy").text == "Copied")
    pasted = browser.driver.execute_async_script(
        "navigator.clipboard.readText().then(arguments[0], e => arguments[0]('error ' + e));"
    )
    assert pasted == key
    browser.shot("keys")

    before = console.balance(console.tenant.account)
    client = console.sdk(key)
    raw = client.images.with_raw_response.generate(
        model="local", prompt="made with a console key", size="256x256"
    )
    assert len(raw.parse().data or []) == 1
    request_id = raw.headers["x-request-id"]
    after = console.balance(console.tenant.account)
    assert after < before

    browser.page("usage")
    row = _usage_rows(browser)[request_id]
    cost = before - after
    assert f"${cost // 1_000_000}.{cost % 1_000_000:06d}" in row and "settled" in row
    browser.page("balance")
    assert int(browser.css("#balance-usd").get_attribute("data-micros")) == after

    browser.page("keys")
    [revoke] = [
        b
        for b in browser.all_css("#keys-table button.danger")
        if b.is_enabled() and "from-console" in b.get_attribute("aria-label")
    ]
    revoke.click()
    browser.wait(lambda d: d.switch_to.alert).accept()
    browser.wait(lambda _: "Revoked" in text(browser, "#keys-status"))
    with pytest.raises(openai.AuthenticationError):
        client.images.generate(model="local", prompt="after revoke", size="256x256")
    client.close()
    assert console.balance(console.tenant.account) == after


def _admin_key(console: Console) -> str:
    from service.admin import Admin

    key, _ = console.loop.run(Admin(console.stack.service.store).create_admin_key("console"))
    console.secrets.append(key)
    return key


def test_operator_credits_an_account(console: Console) -> None:
    browser = console.browser
    browser.sign_in(_admin_key(console))
    browser.page("accounts")
    assert browser.unlabelled_controls() == []
    account = console.tenant.account
    before = console.balance(account)
    row = f"#accounts-table tr[data-account='{account}']"
    assert int(browser.css(f"{row} td[data-micros]").get_attribute("data-micros")) == before
    browser.css(f"#credit-{account}").send_keys("2.50")
    browser.css(f"#credit-add-{account}").click()
    browser.wait(lambda _: "Credited" in text(browser, "#accounts-status"))
    assert console.balance(account) == before + usd_to_micros("2.50")
    shown = browser.wait_css(f"{row} td[data-micros]").get_attribute("data-micros")
    assert int(shown) == before + usd_to_micros("2.50")
    browser.css(f"#ledger-{account}").click()
    newest = browser.wait_css("#ledger tbody tr")
    assert "credit" in newest.text and "$2.500000" in newest.text
    browser.shot("accounts")


def test_operator_changes_a_keys_models_and_limits(console: Console) -> None:
    from selenium.webdriver.support.ui import Select

    from service.admin import Admin

    account = console.tenant.account
    key, view = console.loop.run(Admin(console.stack.service.store).create_key(account, "limited"))
    console.secrets.append(key)
    client = console.sdk(key)
    two = {"model": "local", "prompt": "two", "size": "256x256", "n": 2}
    assert len(client.images.generate(**two).data or []) == 2  # type: ignore[arg-type]

    browser = console.browser
    browser.sign_in(_admin_key(console))
    browser.page("keys")
    Select(browser.css("#keys-account")).select_by_value(account)
    row = f"#keys-table tr[data-key-id='{view.record.id}']"

    def edit(models: str, max_n: str) -> None:
        browser.wait_css(f"{row} button[data-edit-key]").click()
        assert browser.unlabelled_controls() == []
        for selector, value in (("#edit-models", models), ("#edit-max_n", max_n)):
            field = browser.css(selector)
            field.clear()
            field.send_keys(value)
        browser.css("#edit-save").click()
        browser.wait(lambda _: f"Changed {view.record.prefix}" in text(browser, "#keys-status"))

    edit("local", "1")
    browser.wait(lambda _: "max_n 1" in browser.css(row).text)
    assert "local" in browser.css(row).text
    browser.css(f"{row} button[data-edit-key]").click()
    assert browser.wait_css("#edit-max_n").get_attribute("value") == "1"
    browser.shot("operator-key-edit")
    browser.css("#edit-cancel").click()
    # At once for the key's next request (the service drops it from its key cache).
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.generate(**two)  # type: ignore[arg-type]
    assert refused.value.code == "invalid_value" and refused.value.param == "n"
    with pytest.raises(openai.PermissionDeniedError):
        client.images.generate(model=BROKEN_MODEL, prompt="not this one", size="1024x1024")
    # Emptied: back to the default (no cap on n here), every model again.
    edit("", "")
    browser.wait(lambda _: "defaults" in browser.css(row).text)
    assert "all" in browser.css(row).text
    assert len(client.images.generate(**two).data or []) == 2  # type: ignore[arg-type]
    client.close()


def test_operator_sees_the_failing_route_as_open_breaker(console: Console) -> None:
    client = console.sdk(console.tenant.key)
    for _ in range(FAST_DISPATCH["breaker_failures"]):
        with pytest.raises(openai.APIStatusError) as failed:
            client.images.generate(model=BROKEN_MODEL, prompt="p", size="1024x1024")
        assert failed.value.status_code == 502, failed.value.body
    client.close()
    browser = console.browser
    browser.sign_in(_admin_key(console))
    browser.page("providers")
    rows = browser.all_css(f"#providers-table tr[data-model='{BROKEN_MODEL}']")
    assert [(r.get_attribute("data-provider"), r.get_attribute("data-breaker")) for r in rows] == [
        (BROKEN_ROUTE[0], "open")
    ]
    assert "open" in rows[0].text and BROKEN_ROUTE[1] in rows[0].text
    assert "$0.04" in rows[0].text  # its price
    local = browser.all_css("#providers-table tr[data-model='local']")
    assert [r.get_attribute("data-breaker") for r in local] == ["closed"]
    browser.shot("providers")
    browser.page("keys")
    browser.shot("operator-keys")
    browser.page("usage")
    browser.shot("operator-usage")


def _fits_the_width(browser: Any, page: str, width: int) -> None:
    """Nothing on `page` is wider than the screen: no sideways scrolling of the page."""
    browser.page(page)
    wide = browser.js(
        f"""return [...document.querySelectorAll('body *')]
            .filter(e => e.getBoundingClientRect().right > {width + 1})
            .map(e => e.tagName + '#' + e.id + '.' + e.className).slice(0, 5);"""
    )
    assert browser.js("return document.documentElement.scrollWidth;") <= width, (page, wide)


def test_narrow_screen(console: Console) -> None:
    browser = console.browser
    size = browser.driver.get_window_size()
    browser.driver.set_window_size(375, 800)
    try:
        browser.sign_in(console.tenant.key)
        for page in ("playground", "keys", "usage", "balance"):
            _fits_the_width(browser, page, 375)
        browser.page("playground")
        browser.shot("playground-375", themes=("light",))
        # The operator's pages too: wide tables scroll inside their own box.
        browser.sign_in(_admin_key(console))
        for page in ("accounts", "keys", "usage", "providers"):
            _fits_the_width(browser, page, 375)
        browser.shot("providers-375", themes=("light",))
    finally:
        browser.driver.set_window_size(size["width"], size["height"])


def test_keyboard_navigation(console: Console) -> None:
    from selenium.webdriver.common.keys import Keys

    browser = console.browser
    browser.sign_in(console.tenant.key)
    browser.page("playground")
    # Tab from the start of the page reaches the pages' links; Enter follows one.
    body = browser.css("body")
    body.send_keys(Keys.TAB)
    seen = []
    for _ in range(12):
        active = browser.driver.switch_to.active_element
        seen.append(active.get_attribute("id") or active.tag_name)
        if active.get_attribute("id") == "nav-usage":
            active.send_keys(Keys.ENTER)
            break
        active.send_keys(Keys.TAB)
    else:
        pytest.fail(f"nav-usage never focused: {seen}")
    browser.wait_css("#page-usage[data-ready='true']")
    # The theme toggle, from the keyboard: dark colours, then back.
    background = "return getComputedStyle(document.body).backgroundColor;"
    light = browser.js(background)
    browser.css("#theme").send_keys(Keys.ENTER)
    assert browser.js("return document.documentElement.dataset.theme;") == "dark"
    assert browser.css("#theme").get_attribute("aria-pressed") == "true"
    assert browser.js(background) != light
    browser.css("#theme").send_keys(Keys.ENTER)
    assert browser.js(background) == light
    browser.js("localStorage.clear();")


def test_sign_in_page_screenshot(console: Console) -> None:
    browser = console.browser
    browser.driver.delete_all_cookies()
    browser.open()
    browser.wait_css("#signin-key")
    assert browser.unlabelled_controls() == []
    browser.shot("sign-in")


def _evil_site(console: Console, target: str) -> str:
    """A page on another site (localhost, not 127.0.0.1) that posts to the console."""
    page = f"""<!doctype html><title>evil</title>
<form id="evil" method="post" action="{target}" enctype="text/plain">
<input name='{{"model":"local","prompt":"stolen","size":"256x256","x":"' value='"}}'>
<button id="go">go</button></form>"""

    async def evil(_: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html")

    async def serve() -> str:
        app = web.Application()
        app.router.add_get("/", evil)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        console.loop.later(runner.cleanup)
        return f"http://localhost:{runner.addresses[0][1]}/"

    return console.loop.run(serve())


def test_cross_site_post_is_refused(console: Console) -> None:
    browser = console.browser
    browser.sign_in(console.tenant.key)
    before = console.balance(console.tenant.account)
    evil = _evil_site(console, f"{console.url}/console/api/v1/images/generations")
    browser.driver.get(evil)
    browser.css("#go").click()
    browser.wait(lambda d: "csrf_failed" in d.page_source)
    browser.driver.get(evil)
    # A script on that site cannot add the console's header without a CORS preflight,
    # which the console never grants: the request is never sent.
    outcome = browser.driver.execute_async_script(
        """const done = arguments[arguments.length - 1];
        fetch(arguments[0], {method: 'POST', credentials: 'include',
              headers: {'X-Imagegate-Console': '1', 'Content-Type': 'application/json'},
              body: JSON.stringify({model: 'local', prompt: 'stolen', size: '256x256'})})
          .then(r => done('status ' + r.status), e => done('refused ' + e.name));""",
        f"{console.url}/console/api/v1/images/generations",
    )
    assert outcome.startswith("refused"), outcome
    time.sleep(0.2)
    assert console.balance(console.tenant.account) == before


def test_no_key_in_any_url_and_csp_on_every_page(console: Console) -> None:
    browser = console.browser
    browser.collect_network()
    assert len(browser.requests) > 20
    for url in browser.requests:
        for secret in console.secrets:
            assert secret not in url and secret[3:] not in url, url
    console_responses = [
        r for r in browser.responses if r["url"].startswith(f"{console.url}/console/")
    ]
    documents = [r for r in console_responses if r["mimeType"] == "text/html"]
    assert documents
    for response in documents:
        headers = {k.lower(): v for k, v in response["headers"].items()}
        assert "script-src 'self'" in headers["content-security-policy"]
        assert headers["x-content-type-options"] == "nosniff"
    api_calls = [r for r in console_responses if "/console/api/" in r["url"]]
    assert any("/console/api/v1/images/generations" in r["url"] for r in api_calls)
