"""`gear serve` driven in a real headless Chromium (Debian's chromium + chromium-driver, selenium): `make test-browser`.

One visit does what a person would: picks a class, a sample count and a seed, generates, and the grid shown must be
pixel for pixel what the `gear sample` command shown under it writes; an unreadable upload gets a message and the
page keeps working; a real upload gets its reconstruction, token map and PSNR; the curves tab plots. Every request
the browser made must have gone to the local server (the page works offline). A second visit edits one of the
Sample tab's images on the Edit tab, and the grid shown must be what its `gear edit` command writes.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from urllib.parse import urlparse

import numpy as np
import pytest
from helpers import tiny_runs
from PIL import Image

from gear.data.fashion_mnist import resolve_root

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: make test-browser")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="chromium / chromedriver not installed: make test-browser"),
    pytest.mark.skipif(not (resolve_root() / "train-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST not installed"),
]
WAIT = 60  # seconds for any one thing to appear on the page (shared CPU cores)
# The server and the `gear sample` it is compared with run on the same number of threads: a different thread count
# may change the decoder's float sums, and so a pixel by one grey level here and there.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`gear serve` on a tiny AR run, in its own process, on a free port."""
    run = tiny_runs(tmp_path_factory.mktemp("runs"))[1]
    port = free_port()
    log = open(tmp_path_factory.mktemp("log") / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "gear.cli", "serve", str(run), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=ENV)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                log.seek(0)
                pytest.fail(f"gear serve did not come up:\n{log.read()}")
            time.sleep(0.5)
    yield run, url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # the network log
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


def wait_for(driver, find, what: str):
    try:
        return WebDriverWait(driver, WAIT, poll_frequency=0.2).until(lambda d: find(d))
    except TimeoutException:
        driver.save_screenshot("/tmp/gear-serve-browser-failure.png")
        raise AssertionError(f"timed out waiting for {what} (screenshot: /tmp/gear-serve-browser-failure.png)") from None


def text_on_page(text: str):
    return lambda d: d.find_elements(By.XPATH, f"//*[contains(text(), {json.dumps(text)})]")


def set_number(driver, elem_id: str, value) -> None:
    box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=number]")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.TAB)


def pick_one_class(driver, label: str, elem_id: str = "classes") -> None:
    classes = driver.find_element(By.ID, elem_id)
    while removes := classes.find_elements(By.CSS_SELECTOR, ".token-remove[title^='Remove']"):
        removes[0].click()
    box = classes.find_element(By.CSS_SELECTOR, "input")
    box.click()
    box.send_keys(label.split(": ")[1])
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, f"li[role=option][aria-label='{label}']"),
             f"the option {label}")[0].click()
    wait_for(driver, lambda d: [t for t in classes.find_elements(By.CSS_SELECTOR, ".token") if t.text == label],
             f"{label} picked")
    box.send_keys(Keys.ESCAPE)


def request_urls(driver) -> set[str]:
    urls = set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.add(message["params"]["request"]["url"])
        elif message["method"] == "Network.webSocketCreated":
            urls.add(message["params"]["url"])
    return urls


def test_the_page_in_chromium(server, browser, tmp_path):
    run, url = server
    d = browser
    d.get(url)
    wait_for(d, lambda d: d.find_elements(By.ID, "generate"), "the Generate button")

    pick_one_class(d, "3: Dress")
    set_number(d, "per-class", 3)
    set_number(d, "seed", 11)
    d.find_element(By.ID, "generate").click()
    command = wait_for(d, lambda d: d.find_element(By.CSS_SELECTOR, "#command textarea").get_attribute("value"),
                       "the gear sample command")
    assert "--classes 3 --per-class 3" in command and "--seed 11" in command
    img = wait_for(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#grid img[src]"), "the sample grid")[0]
    assert d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) == 3 * 34 + 2
    shown = np.asarray(Image.open(io.BytesIO(urllib.request.urlopen(img.get_attribute("src"), timeout=30).read())))
    argv = shlex.split(command)
    argv[argv.index("--out") + 1] = str(tmp_path / "cli.png")
    assert argv[:2] == ["gear", "sample"]
    subprocess.run([sys.executable, "-m", "gear.cli", *argv[1:]], check=True, capture_output=True, env=ENV)
    assert np.array_equal(shown[..., :3], np.asarray(Image.open(tmp_path / "cli.png").convert("RGB")))
    assert d.find_element(By.ID, "download").is_displayed()

    d.find_element(By.XPATH, "//button[@role='tab'][contains(., 'Reconstruct')]").click()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG but not an image")
    wait_for(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"), "the upload box")[0].send_keys(str(broken))
    wait_for(d, text_on_page("broken.png is not an image"), "the message about the unreadable upload")

    d.find_element(By.CSS_SELECTOR, "#upload button[aria-label='Clear']").click()
    photo = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((48, 40, 3)) * 255).astype(np.uint8)).save(photo)
    wait_for(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"), "the upload box")[0].send_keys(str(photo))
    wait_for(d, text_on_page("PSNR"), "the PSNR")
    assert len(d.find_elements(By.CSS_SELECTOR, "#token-map .token-map span")) == 64  # 8x8 codes
    assert d.find_elements(By.CSS_SELECTOR, "#reconstruction img[src]")

    d.find_element(By.XPATH, "//button[@role='tab'][contains(., 'Curves')]").click()
    wait_for(d, lambda d: [p for p in d.find_elements(By.CSS_SELECTOR, "#plot-losses canvas, #plot-losses svg")
                           if p.is_displayed()], "the loss plot")
    assert d.find_elements(By.XPATH, "//*[@id='summary']//td[contains(., 'ar/loss')]")

    port = urlparse(url).port
    urls = request_urls(d)
    assert f"{url}theme.css" in {u.split("?")[0] for u in urls}  # the log did record the page's own requests
    outside = [u for u in urls
               if urlparse(u).scheme in ("http", "https", "ws", "wss") and (urlparse(u).hostname, urlparse(u).port) != ("127.0.0.1", port)]
    assert not outside, f"the page fetched from outside the local server: {outside}"


def test_the_edit_tab_in_chromium(server, browser, tmp_path):
    """Take an image of the Sample tab's grid, keep its left columns, edit it as one class: the grid shown is what
    the `gear edit` command shown writes; an upload gets its own preview."""
    run, url = server
    d = browser
    d.get(url)
    wait_for(d, lambda d: d.find_elements(By.ID, "generate"), "the Generate button")
    set_number(d, "per-class", 2)
    d.find_element(By.ID, "generate").click()
    wait_for(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#grid img[src]"), "the sample grid")

    d.find_element(By.XPATH, "//button[@role='tab'][contains(., 'Edit')]").click()
    wait_for(d, lambda d: [b for b in d.find_elements(By.ID, "edit-use-sample") if b.is_displayed()], "the Edit tab")
    set_number(d, "edit-sample-number", 3)
    d.find_element(By.ID, "edit-use-sample").click()
    wait_for(d, text_on_page("32 of 64 tokens kept"), "the preview of the default region (keep the top half)")
    d.find_element(By.XPATH, "//*[@id='edit-region']//label[contains(., 'keep left')]").click()
    set_number(d, "edit-count", 3)
    d.find_element(By.CSS_SELECTOR, "#edit-count input[type=range]").send_keys(Keys.ARROW_RIGHT, Keys.ARROW_LEFT)
    wait_for(d, text_on_page("24 of 64 tokens kept"), "the preview of keep left:3")
    assert len(d.find_elements(By.CSS_SELECTOR, "#edit-token-map span.generated")) == 40
    pick_one_class(d, "3: Dress", elem_id="edit-classes")
    set_number(d, "edit-num", 2)
    set_number(d, "edit-seed", 4)
    d.find_element(By.ID, "edit-generate").click()
    command = wait_for(d, lambda d: d.find_element(By.CSS_SELECTOR, "#edit-command textarea").get_attribute("value"),
                       "the gear edit command")
    assert "--keep left:3 --classes 3 --num 2" in command and "--seed 4" in command
    img = wait_for(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#edit-grid img[src]"), "the edit grid")[0]
    assert d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) == 4 * 34 + 2
    shown = np.asarray(Image.open(io.BytesIO(urllib.request.urlopen(img.get_attribute("src"), timeout=30).read())))
    argv = shlex.split(command)
    argv[argv.index("--out") + 1] = str(tmp_path / "cli.png")
    subprocess.run([sys.executable, "-m", "gear.cli", *argv[1:]], check=True, capture_output=True, env=ENV)
    assert np.array_equal(shown[..., :3], np.asarray(Image.open(tmp_path / "cli.png").convert("RGB")))

    photo = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(3).random((40, 48, 3)) * 255).astype(np.uint8)).save(photo)
    d.find_element(By.CSS_SELECTOR, "#edit-upload button[aria-label='Clear']").click()
    wait_for(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#edit-upload input[type=file]"), "the upload box")[0].send_keys(str(photo))
    d.find_element(By.XPATH, "//*[@id='edit-region']//label[contains(., 'inpaint')]").click()
    # the rectangle sliders now span the upload's 48x40 px; their defaults are its central quarter
    wait_for(d, lambda d: d.find_element(By.CSS_SELECTOR, "#edit-x1 input[type=number]").get_attribute("value") == "36",
             "the rectangle sliders over the upload")
    wait_for(d, text_on_page("tokens kept"), "the inpainting preview")
