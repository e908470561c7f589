"""`tunesmith web`: headless Chromium loads the chat page, sends a message and reads the streamed answer.

Needs Debian's chromium + chromium-driver (apt-get install -y chromium chromium-driver) and selenium; skipped
with the reason otherwise. The screenshot lands in test-artifacts/web_chat.png (gitignored).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from tests.serve.conftest import free_port
from tests.timeouts import TIMEOUT

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path(shutil.which("chromedriver") or "/usr/bin/chromedriver")

pytestmark = [
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs /usr/bin/chromium: apt-get install -y chromium chromium-driver"
    ),
    pytest.mark.skipif(not CHROMEDRIVER.exists(), reason="needs chromedriver: apt-get install -y chromium-driver"),
]


def test_to_messages_keeps_roles_and_system():
    from tunesmith.serve.web import to_messages

    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "text", "text": "yo"}]}]
    assert to_messages(history, "be brief") == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
    ]
    assert to_messages(history, "  ")[0]["role"] == "user"
    shown = [{"role": "user", "content": "&lt;b&gt;x &amp; y&lt;/b&gt;"}]  # the page keeps what the user typed escaped
    assert to_messages(shown, "")[0]["content"] == "<b>x & y</b>"


@pytest.fixture(scope="module")
def web_url(smollm2_engine):
    pytest.importorskip("gradio")
    from tunesmith.serve.web import build_demo, launch

    demo = build_demo(smollm2_engine, model_name="smollm2-135m-instruct", max_new_tokens=40)
    port = free_port()
    launch(demo, host="127.0.0.1", port=port, block=False)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(TIMEOUT)
    yield driver
    driver.quit()


def _bot_text(driver) -> str:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    for _ in range(20):  # streaming re-renders the bubble: an element found a moment ago may be gone; look again
        try:
            found = driver.find_elements(By.CSS_SELECTOR, "#chatbot [data-testid='bot']") or driver.find_elements(
                By.CSS_SELECTOR, "#chatbot .bot"
            )
            return found[-1].text.strip() if found else ""
        except StaleElementReferenceException:
            time.sleep(0.02)
    return ""


def test_web_page_streams_an_answer(web_url, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(web_url)
    wait = WebDriverWait(browser, TIMEOUT)
    box = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#message textarea, #message input")))
    for elem_id in ("system", "temperature", "top_p", "max_tokens", "reset", "stop"):
        assert browser.find_elements(By.ID, elem_id), f"#{elem_id} missing from the page"
    box.send_keys("What is the capital of France?")
    box.send_keys(Keys.ENTER)

    seen: list[str] = []  # distinct partial answers observed while it streams
    deadline = time.monotonic() + TIMEOUT
    stable_since = None
    while time.monotonic() < deadline:
        text = _bot_text(browser)
        if text and (not seen or text != seen[-1]):
            seen.append(text)
            stable_since = time.monotonic()
        elif "Paris" in text and stable_since and time.monotonic() - stable_since > 3:
            break  # the answer is there and has stopped growing (a loaded CPU may pause it longer)
        time.sleep(0.05)
    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    browser.save_screenshot(str(artifacts / "web_chat.png"))
    assert seen, "no answer appeared on the page"
    assert "Paris" in seen[-1]
    assert len(seen) >= 2, f"the answer did not stream: {seen}"
    assert all(seen[-1].startswith(s[: max(1, len(s) - 2)]) for s in seen[:-1] if s)  # it grew in place
    assert (artifacts / "web_chat.png").stat().st_size > 1000

    # reset clears the conversation
    browser.find_element(By.CSS_SELECTOR, "#reset").click()
    WebDriverWait(browser, TIMEOUT).until(lambda d: _bot_text(d) == "")


def test_a_message_with_markup_is_shown_as_text(web_url, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(web_url)
    box = WebDriverWait(browser, TIMEOUT).until(
        ec.element_to_be_clickable((By.CSS_SELECTOR, "#message textarea, #message input")))
    typed = "<script>window.__pwned = 1</script><b>bold?</b> say hi"
    box.send_keys(typed)
    box.send_keys(Keys.ENTER)

    def user_text(driver):
        found = driver.find_elements(By.CSS_SELECTOR, "#chatbot [data-testid='user']") or driver.find_elements(
            By.CSS_SELECTOR, "#chatbot .user")
        return found[-1].text if found else ""

    WebDriverWait(browser, TIMEOUT).until(lambda d: "<script>" in user_text(d))
    assert "<b>bold?</b>" in user_text(browser)  # the tags are text, not markup
    assert browser.execute_script("return window.__pwned") is None
    browser.find_element(By.CSS_SELECTOR, "#reset").click()
