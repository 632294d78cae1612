"""The web page in real headless Chromium (Selenium + chromedriver from the apt packages): pick a
query, tick chunks, click a result, name a chunk, upload, share a URL; at laptop and phone widths.
Screenshots go to test-artifacts/ (git-ignored)."""
import json
import shutil
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):  # a missing browser fails, never skips
    raise RuntimeError("the web tests need the apt packages chromium and chromium-driver; "
                       "`make test` installs them (or: apt-get install chromium chromium-driver)")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run"]


@pytest.fixture(scope="module")
def base_url(api_index, tmp_path_factory):
    """The app on waitress in this process, on a free loopback port, over a copy of the index."""
    from waitress import create_server

    from api import create_app

    index = tmp_path_factory.mktemp("web") / "idx"
    shutil.copytree(api_index, index)
    server = create_server(create_app({"INDEX": str(index), "TOKEN": None}), host="127.0.0.1", port=0, threads=4)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.effective_port}"

    # close every socket from the loop's own thread: closed from here, a select() already waiting
    # on them fails with EBADF; with its map empty the loop returns
    def close_all():
        for channel in list(server._map.values()):
            channel.close()
    server.trigger.pull_trigger(close_all)
    thread.join(timeout=10)
    assert not thread.is_alive(), "waitress's loop did not stop"
    server.task_dispatcher.shutdown()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS + ["--window-size=1366,768"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _viewport(driver, width: int, height: int, mobile: bool) -> None:
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile})


def _wait(driver, predicate, timeout: float = 20):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: predicate(d))


def _tiles(driver, box: str):
    return driver.find_elements(By.CSS_SELECTOR, f"#{box} .tile")


def _images_loaded(driver) -> bool:
    return driver.execute_script(
        "return [...document.images].filter(i => !i.hidden && i.loading !== 'lazy' || i.getBoundingClientRect().top < innerHeight)"
        ".every(i => i.hidden || (i.complete && i.naturalWidth > 0))")


def _state(driver) -> dict:
    return driver.execute_script("return Object.fromEntries(new URLSearchParams(location.search))")


def _api(base_url: str, path: str) -> dict:
    with urllib.request.urlopen(base_url + path, timeout=10) as r:
        return json.load(r)


def _screenshot(driver, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    _wait(driver, _images_loaded)
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    return path


def test_pick_tick_click_and_share(browser, base_url):
    d = browser
    _viewport(d, 1366, 768, mobile=False)
    d.get(base_url + "/")
    _wait(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chunks .chunk")) == 8 and len(_tiles(d, "gallery")) == 48)
    assert "600 images" in d.find_element(By.ID, "info").text
    assert d.find_element(By.ID, "results-note").text == "tick one or more chunks"
    _wait(d, lambda d: d.execute_script(  # every chunk's transfer strip is shown and decoded
        "return [...document.querySelectorAll('#chunks .strip')].every(i => i.complete && i.naturalWidth > 0)"))

    # pick a query from the gallery, then tick chunk 1: the URL carries both
    _tiles(d, "gallery")[5].click()
    _wait(d, lambda d: _state(d).get("image") == "shape_000005")
    d.find_element(By.CSS_SELECTOR, "#chunks input[data-chunk='1']").click()
    _wait(d, lambda d: _state(d).get("chunks") == "1" and len(_tiles(d, "results")) == 24)
    expect = _api(base_url, "/search?image=shape_000005&chunks=1&k=24")["results"]
    assert [t.get_attribute("data-key") for t in _tiles(d, "results")] == [h["key"] for h in expect]
    assert f"d = {expect[0]['distance']:.4f}" in _tiles(d, "results")[0].text

    # a second chunk, then a result becomes the next query
    d.find_element(By.CSS_SELECTOR, "#chunks input[data-chunk='3']").click()
    _wait(d, lambda d: _state(d).get("chunks") == "1,3")
    first = _api(base_url, "/search?image=shape_000005&chunks=1,3&k=24")["results"][0]["key"]
    _wait(d, lambda d: _tiles(d, "results") and _tiles(d, "results")[0].get_attribute("data-key") == first)
    _tiles(d, "results")[0].click()
    _wait(d, lambda d: _state(d).get("image") == first and d.find_element(By.ID, "query-label").text == first)
    expect = _api(base_url, f"/search?image={first}&chunks=1,3&k=24")["results"]
    _wait(d, lambda d: [t.get_attribute("data-key") for t in _tiles(d, "results")] == [h["key"] for h in expect])
    shot = _screenshot(d, "web-laptop-1366x768.png")
    assert Image.open(shot).size == (1366, 768)
    assert d.execute_script("return document.documentElement.scrollWidth") <= 1366

    # back goes to the previous query; a shared URL restores the whole search
    d.back()
    _wait(d, lambda d: _state(d).get("image") == "shape_000005"
          and d.find_element(By.ID, "query-label").text == "shape_000005")
    d.get(base_url + "/?image=shape_000010&chunks=2,4&k=12")
    _wait(d, lambda d: len(_tiles(d, "results")) == 12)
    ticked = [b.get_attribute("data-chunk") for b in d.find_elements(By.CSS_SELECTOR, "#chunks input:checked")]
    assert ticked == ["2", "4"]


def test_name_chunk_upload_and_errors(browser, base_url, tmp_path):
    d = browser
    _viewport(d, 1366, 768, mobile=False)
    d.get(base_url + "/?image=shape_000003&chunks=0")
    _wait(d, lambda d: len(_tiles(d, "results")) == 24)
    name = d.find_element(By.CSS_SELECTOR, "#chunks .chunk[data-chunk='6'] input[type=text]")
    name.send_keys("background")
    d.find_element(By.CSS_SELECTOR, "#chunks .chunk[data-chunk='6'] button").click()
    _wait(d, lambda d: "now named" in d.find_element(By.ID, "status").text)
    assert _api(base_url, "/chunks")["chunks"][6]["name"] == "background"

    # upload a query image: results come from POST /search and the URL drops the image
    pixels = np.zeros((40, 40, 3), np.uint8)
    pixels[10:30, 10:30] = (230, 40, 40)
    Image.fromarray(pixels).save(tmp_path / "red.png")
    d.find_element(By.ID, "upload").send_keys(str(tmp_path / "red.png"))
    _wait(d, lambda d: "uploaded: red.png" in d.find_element(By.ID, "query-label").text
          and len(_tiles(d, "results")) == 24 and "image" not in _state(d))

    # an unknown key shows the API's message, not a broken page
    key = d.find_element(By.ID, "key-input")
    key.clear()
    key.send_keys("no-such-image\n")
    _wait(d, lambda d: "no indexed image" in d.find_element(By.ID, "status").text)


def test_phone_width(browser, base_url):
    d = browser
    _viewport(d, 390, 844, mobile=True)
    d.get(base_url + "/?image=shape_000007&chunks=2,5&k=12")
    _wait(d, lambda d: len(_tiles(d, "results")) == 12 and len(_tiles(d, "gallery")) == 48)
    assert d.execute_script("return document.documentElement.scrollWidth") <= 390
    strip = d.find_element(By.CSS_SELECTOR, "#chunks .chunk[data-chunk='2'] .strip")
    assert not strip.is_displayed()  # folded on a phone, one tap away
    d.find_element(By.CSS_SELECTOR, "#chunks .chunk[data-chunk='2'] summary").click()
    _wait(d, lambda d: strip.is_displayed() and d.execute_script("return arguments[0].naturalWidth", strip) > 0)
    shot = _screenshot(d, "web-phone-390x844.png")
    assert Image.open(shot).size == (390, 844)
    d.execute_script("document.getElementById('results-title').scrollIntoView()")
    _screenshot(d, "web-phone-390x844-results.png")
    # tapping a result works at this width too
    target = _tiles(d, "results")[1]
    key = target.get_attribute("data-key")
    target.click()
    _wait(d, lambda d: _state(d).get("image") == key)
    _viewport(d, 1366, 768, mobile=False)
