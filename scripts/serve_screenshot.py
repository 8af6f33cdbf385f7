"""Screenshot of `gear serve` on a run, in headless Chromium (Debian's chromium + chromium-driver, selenium).

    python scripts/serve_screenshot.py runs/demo/ar docs/serve.png

Starts the page on a free port, generates with the page's defaults, uploads IMAGE to the Reconstruct tab when given
(--image), and writes the Sample tab (or --tab) as a palette PNG. With --tab Edit, the Edit tab edits IMAGE (or image
--sample of the Sample tab's grid) with --region and --count and the page's other defaults:

    python scripts/serve_screenshot.py runs/demo/ar docs/edit.png --tab Edit --sample 3 --region "keep top" --count 4
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("out")
    p.add_argument("--tab", choices=["Sample", "Edit", "Reconstruct", "Curves"], default="Sample")
    p.add_argument("--image", help="an image to upload on the Reconstruct tab first (on the Edit tab with --tab Edit)")
    p.add_argument("--sample", type=int, default=1, help="--tab Edit without --image: edit this image of the sample grid")
    p.add_argument("--region", default="keep top", help="--tab Edit: keep top | keep left | inpaint | outpaint down | ...")
    p.add_argument("--count", type=int, default=0, help="--tab Edit: token rows/columns kept or added (0: the default)")
    p.add_argument("--size", default="1280,1000", help="window width,height")
    args = p.parse_args()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "gear.cli", "serve", args.run_dir, "--port", str(port)])
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                if server.poll() is not None:
                    sys.exit("gear serve stopped")
                time.sleep(0.5)
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for flag in (*FLAGS, f"--user-data-dir={tempfile.mkdtemp()}", f"--window-size={args.size}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
        wait = WebDriverWait(driver, 120)
        try:
            driver.get(url)
            wait.until(lambda d: d.find_elements(By.ID, "generate"))
            driver.find_element(By.ID, "generate").click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#grid img[src]"))
            if args.tab == "Edit":
                edit(driver, wait, args)
            elif args.image:
                driver.find_element(By.XPATH, "//button[@role='tab'][contains(., 'Reconstruct')]").click()
                driver.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(os.path.abspath(args.image))
                wait.until(lambda d: "PSNR" in d.find_element(By.ID, "psnr").text)
            driver.find_element(By.XPATH, f"//button[@role='tab'][contains(., '{args.tab}')]").click()
            driver.execute_script("window.scrollTo(0, 0)")
            time.sleep(2)  # plots and images settle
            shot = os.path.join(tempfile.mkdtemp(), "shot.png")
            driver.save_screenshot(shot)
        finally:
            driver.quit()
    finally:
        server.terminate()
        server.wait(timeout=30)
    Image.open(shot).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
    print(f"wrote {args.out} ({os.path.getsize(args.out) // 1024} KiB)")


def set_number(driver, elem_id: str, value) -> None:
    box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=number]")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.TAB)


def edit(driver, wait, args) -> None:
    """The Edit tab: the image, the region, then Edit with the page's defaults; waits for the grid."""
    driver.find_element(By.XPATH, "//button[@role='tab'][contains(., 'Edit')]").click()
    wait.until(lambda d: [b for b in d.find_elements(By.ID, "edit-use-sample") if b.is_displayed()])
    if args.image:
        driver.find_element(By.CSS_SELECTOR, "#edit-upload input[type=file]").send_keys(os.path.abspath(args.image))
    else:
        set_number(driver, "edit-sample-number", args.sample)
        driver.find_element(By.ID, "edit-use-sample").click()
    wait.until(lambda d: "tokens kept" in d.find_element(By.ID, "edit-message").text)
    driver.find_element(By.XPATH, f"//*[@id='edit-region']//label[contains(., '{args.region}')]").click()
    if args.count:
        set_number(driver, "edit-count", args.count)
        driver.find_element(By.CSS_SELECTOR, "#edit-count input[type=range]").send_keys(Keys.ARROW_RIGHT, Keys.ARROW_LEFT)
    time.sleep(1)
    driver.find_element(By.ID, "edit-generate").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#edit-grid img[src]"))


if __name__ == "__main__":
    main()
