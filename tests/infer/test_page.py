"""The chat page at `/`, driven in headless Chromium (Debian's `chromium` + `chromium-driver`, via selenium):
upload an image, set the controls, send, watch the answer stream in, regenerate, a second turn, an error, clear.
The page's answers must equal transformers' greedy answers (and the API's) for the same conversation.

Without Chromium or its driver this test FAILS with the install command: it never passes silently."""
import json
import os
import shutil

import pytest

from llava_jax.infer.loading import load_for_inference
from llava_jax.infer.openai_api import Limits
from llava_jax.infer.server import ServerOptions, ServerThread
from tests.fixtures import chat as cf

CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1280,860")
INSTALL = "apt-get update && apt-get install -y chromium chromium-driver"
MAX_TOKENS = 32
NAME = "tiny-llava"


def _driver(profile_dir, log_path):
  try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
  except ImportError:
    pytest.fail("the page test drives Chromium with selenium: pip install selenium", pytrace=False)
  chromium = shutil.which("chromium") or shutil.which("chromium-browser")
  chromedriver = shutil.which("chromedriver")
  if not chromium or not chromedriver:
    pytest.fail(f"the page test needs Debian's Chromium and its WebDriver; install them with: {INSTALL}",
                pytrace=False)
  os.environ.setdefault("SE_OFFLINE", "true")  # selenium-manager must never download a browser or driver
  options = webdriver.ChromeOptions()
  options.binary_location = chromium
  for flag in CHROME_FLAGS + (f"--user-data-dir={profile_dir}",):
    options.add_argument(flag)
  driver = webdriver.Chrome(service=Service(executable_path=chromedriver, log_output=str(log_path)), options=options)
  driver.set_page_load_timeout(60)
  driver.set_script_timeout(60)
  return driver


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_tokenizer_dir):
  checkpoint = cf.write_checkpoint(str(tmp_path_factory.mktemp("page") / NAME), tiny_tokenizer_dir)
  model = load_for_inference(cf.load_tiny_config(), checkpoint=checkpoint, mesh=None)
  options = ServerOptions(port=0, limits=Limits(max_output_tokens=256), steps_per_chunk=1)
  with ServerThread(model, options) as srv:
    yield srv


WATCH = """
window.__seen = [];
const chat = document.getElementById('chat');
new MutationObserver(() => {
  const texts = chat.querySelectorAll('.msg.assistant .text');
  if (!texts.length) return;
  const t = texts[texts.length - 1].textContent;
  if (window.__seen[window.__seen.length - 1] !== t) window.__seen.push(t);
}).observe(chat, {subtree: true, childList: true, characterData: true});
"""


def _set_range(driver, element_id, value):
  driver.execute_script("const s = document.getElementById(arguments[0]); s.value = arguments[1];"
                        "s.dispatchEvent(new Event('input'));", element_id, str(value))


def test_page_upload_chat_stream_regenerate_clear(server, tmp_path, tiny_tokenizer):
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import WebDriverWait

  image = cf.write_image(str(tmp_path / "astronaut.png"), "astronaut")
  driver = _driver(tmp_path / "profile", tmp_path / "chromedriver.log")
  try:
    wait = WebDriverWait(driver, 120)
    driver.get(server.url + "/")
    wait.until(lambda d: d.find_element(By.ID, "model-name").text == NAME)
    assert driver.find_element(By.ID, "max-tokens").get_attribute("max") == "256"  # from /health
    assert driver.find_element(By.ID, "top-p-value").text == "0.7"  # the reference demo's defaults
    assert driver.find_element(By.ID, "temperature-value").text == "0.2"
    _set_range(driver, "temperature", 0)
    _set_range(driver, "max-tokens", MAX_TOKENS)
    assert driver.find_element(By.ID, "temperature-value").text == "0"

    driver.find_element(By.ID, "image-input").send_keys(image)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#drop img"))
    assert "astronaut.png" in driver.find_element(By.ID, "status").text

    def send(text):
      box = driver.find_element(By.ID, "message")
      box.send_keys(text)
      driver.find_element(By.ID, "send").click()  # the page is busy when the click returns
      wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle")
      return [e.get_attribute("textContent") for e in driver.find_elements(By.CSS_SELECTOR, ".msg.assistant .text")]

    driver.execute_script(WATCH)
    q1 = "What is in the image?"
    answers = send(q1)
    want1 = cf.hf_answer(tiny_tokenizer, cf.reference_prompt([("<image>\n" + q1, None)]), image,
                         MAX_TOKENS).lstrip()
    assert answers == [want1]
    status, _, response = cf.post_json(server.url, {
        "messages": [cf.user_message(q1, open(image, "rb").read())], "temperature": 0, "top_p": 0.7,
        "max_tokens": MAX_TOKENS})
    assert status == 200 and response["choices"][0]["message"]["content"] == want1
    seen = [t for t in driver.execute_script("return window.__seen;") if t]
    assert seen[-1] == want1 and all(want1.startswith(t) for t in seen)
    assert len(seen) >= 3, f"the answer did not stream in pieces: {seen}"
    shot = tmp_path / "page.png"
    driver.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")

    driver.find_element(By.ID, "regenerate").click()  # greedy: the same answer replaces the old one
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle")
    assert [e.get_attribute("textContent") for e in driver.find_elements(By.CSS_SELECTOR, ".msg.assistant .text")] == [want1]

    q2 = "What else?"
    answers = send(q2)
    want2 = cf.hf_answer(tiny_tokenizer, cf.reference_prompt([("<image>\n" + q1, want1.strip()), (q2, None)]), image,
                         MAX_TOKENS).lstrip()
    assert answers == [want1, want2]
    assert len(driver.find_elements(By.CSS_SELECTOR, ".msg.user")) == 2
    assert len(driver.find_elements(By.CSS_SELECTOR, ".msg.user img")) == 1  # the image sits in the first turn

    send("Is <image> a tag?")  # refused by the server: the page shows its error message
    error = driver.find_element(By.CSS_SELECTOR, ".msg.error").text
    assert "cannot contain <image>" in error

    driver.find_element(By.ID, "clear").click()
    assert driver.find_elements(By.CSS_SELECTOR, "#chat .msg") == []
    assert driver.find_elements(By.CSS_SELECTOR, "#drop img") == []
    logs = driver.get_log("browser") if hasattr(driver, "get_log") else []
    assert not [entry for entry in logs if entry.get("level") == "SEVERE" and "400" not in entry.get("message", "")], \
        json.dumps(logs, indent=1)
  finally:
    driver.quit()
