"""The playground page (`GET /`, frontend/static/playground.html) driven in headless Chromium.

One `zomni serve` with an API key serves the module: the scripted LLM of `http_utils` (its
greedy reply is `SCRIPT_TEXT` whatever the prompt) and a tiny SD3 pipeline. The browser opens
the page without the key (a navigation sends none), is refused the model list until the key
is typed in, then chats (streamed, compared with the API's own non-streamed answer) and
generates an image with partial images (compared with the API's image for the same seed).

Needs Debian's `chromium` and `chromium-driver` (`make install` installs them) and selenium;
without them the tests fail, saying so: they are not skipped.
"""

from __future__ import annotations

import json
import os
import re
from types import SimpleNamespace

import psutil
import pytest
from http_utils import SCRIPT_TEXT, Proc, http, scripted_model, zomni_cmd
from image_utils import MIN_PSNR_DB, decode_png, psnr, tiny_pipelines
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.select import Select
from selenium.webdriver.support.ui import WebDriverWait

from zomni._process import free_port

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
API_KEY = "playground-key"
AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
TIMEOUT_S = 120.0  # generous: the engines share two cores with the browser


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    llm, _, _ = scripted_model(tmp_path_factory)
    sd3 = tiny_pipelines(tmp_path_factory).sd3
    port = free_port()
    proc = Proc(zomni_cmd("serve", "--model", str(llm), "--model", str(sd3),
                          "--served-model-name", "llm", "--served-model-name", "painter",
                          "--api-key", API_KEY, "--port", str(port), "--num-kv-blocks", "256",
                          "--num-threads", "1"),
                tmp_path_factory.mktemp("serve-playground") / "serve.log", port)
    try:
        proc.wait_healthy()
        yield SimpleNamespace(proc=proc, url=proc.base_url)
    finally:
        proc.kill()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        pytest.fail(f"{' and '.join(missing)} missing: the browser test needs Debian's chromium "
                    "and chromium-driver (`make install` as root installs them, or "
                    "`apt-get install chromium chromium-driver`)", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,1000", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(
        executable_path=CHROMEDRIVER,
        log_output=str(tmp_path_factory.mktemp("chromedriver") / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    # chromedriver and every Chromium process under it: none may outlive the module
    started = [psutil.Process(service.process.pid)]
    started += started[0].children(recursive=True)
    try:
        yield driver
    finally:
        driver.quit()
        _, alive = psutil.wait_procs(started, timeout=10)
        for proc in alive:
            proc.kill()


def api(server, path: str, body: dict) -> dict:
    status, _, data = http("POST", server.url + path, body, AUTH, timeout=TIMEOUT_S)
    assert status == 200, data
    return json.loads(data)


def by_id(driver, element_id: str):
    return driver.find_element(By.ID, element_id)


def type_into(driver, element_id: str, text: str) -> None:
    element = by_id(driver, element_id)
    element.clear()
    element.send_keys(text)


def wait_finished(driver, element_id: str, error_id: str, ready=lambda d: True) -> None:
    """Wait until `ready` holds and `element_id`'s data-state is done or error; fail with the
    page's error if it is error."""

    def finished(d):
        state = by_id(d, element_id).get_attribute("data-state")
        return state in ("done", "error") and ready(d) and state

    state = WebDriverWait(driver, TIMEOUT_S).until(finished)
    assert state == "done", f"the page says: {by_id(driver, error_id).text}"


def test_page_is_static_open_and_self_contained(server):
    status, headers, body = http("GET", server.url + "/")  # no API key
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert "connect-src 'self'" in headers["Content-Security-Policy"]
    html = body.decode()
    assert "<title>zomni playground</title>" in html
    assert not re.search(r"https?://|//cdn", html), "the page must load nothing from elsewhere"
    assert http("GET", server.url + "/v1/models")[0] == 401  # the API still needs the key


def test_playground_chats_and_generates(server, browser):
    browser.get(server.url + "/")
    # without the key the page says so; with it, both models are listed
    WebDriverWait(browser, TIMEOUT_S).until(
        lambda d: "API key" in by_id(d, "models-error").text)
    type_into(browser, "api-key", API_KEY)
    by_id(browser, "reload").click()
    WebDriverWait(browser, TIMEOUT_S).until(lambda d: len(d.find_elements(
        By.CSS_SELECTOR, "#models li[data-model]")) == 2)
    kinds = {item.get_attribute("data-model"): item.get_attribute("data-kind")
             for item in browser.find_elements(By.CSS_SELECTOR, "#models li")}
    assert kinds == {"llm": "ar", "painter": "image"}
    chat(server, browser)
    generate(server, browser)
    csp = [e for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
    assert not csp, csp


def chat_turn(browser, text: str) -> str:
    def answers(d):
        return d.find_elements(By.CSS_SELECTOR, "#chat-log .assistant")

    before = len(answers(browser))
    type_into(browser, "chat-input", text)
    by_id(browser, "chat-send").click()
    wait_finished(browser, "chat-log", "chat-error", lambda d: len(answers(d)) > before)
    answer = answers(browser)[-1]
    assert int(answer.get_attribute("data-chunks")) > 1, "the answer came in one piece"
    return answer.text


def chat(server, browser) -> None:
    browser.find_element(By.CSS_SELECTOR, '#models li[data-model="llm"] button').click()
    type_into(browser, "temperature", "0")
    type_into(browser, "max-tokens", "32")
    knobs = {"model": "llm", "temperature": 0, "top_p": 1, "max_tokens": 32}
    messages = [{"role": "user", "content": "hi"}]
    shown = chat_turn(browser, "hi")
    direct = api(server, "/v1/chat/completions", {**knobs, "messages": messages})
    assert shown == direct["choices"][0]["message"]["content"] == SCRIPT_TEXT
    # the second turn sends the whole conversation: the same prompt tokens as the API's
    messages += [{"role": "assistant", "content": shown}, {"role": "user", "content": "again"}]
    assert chat_turn(browser, "again") == SCRIPT_TEXT
    direct = api(server, "/v1/chat/completions", {**knobs, "messages": messages})
    prompt_tokens = by_id(browser, "chat-usage").get_attribute("data-prompt-tokens")
    assert int(prompt_tokens) == direct["usage"]["prompt_tokens"]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#chat-log .msg")) == 4


def generate(server, browser) -> None:
    browser.find_element(By.CSS_SELECTOR, '#models li[data-model="painter"] button').click()
    assert by_id(browser, "class-field").get_attribute("hidden") is not None  # text-conditioned
    type_into(browser, "image-prompt", "a red circle")
    type_into(browser, "image-size", "32x32")
    type_into(browser, "image-steps", "8")
    type_into(browser, "image-seed", "3")
    Select(by_id(browser, "partial-images")).select_by_visible_text("2")
    by_id(browser, "image-generate").click()
    wait_finished(browser, "image-out", "image-error")
    image = by_id(browser, "image-out")
    # both partial images were decoded into the <img> before the final one replaced them
    assert image.get_attribute("data-partials") == "2"
    assert "after 2/2 partial images" in by_id(browser, "image-status").text
    src = image.get_attribute("src")
    assert src.startswith("data:image/png;base64,")
    assert browser.execute_script("const i = arguments[0]; return [i.naturalWidth, "
                                  "i.naturalHeight];", image) == [32, 32]
    direct = api(server, "/v1/images/generations", {
        "model": "painter", "prompt": "a red circle", "size": "32x32",
        "num_inference_steps": 8, "seed": 3})
    shown = decode_png(src.removeprefix("data:image/png;base64,"))
    assert psnr(shown, decode_png(direct["data"][0]["b64_json"])) >= MIN_PSNR_DB
