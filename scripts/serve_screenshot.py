"""Screenshot of `gear serve` on a run, in headless Chromium (Debian's chromium + chromium-driver, selenium).

    python scripts/serve_screenshot.py runs/demo/ar docs/serve.png

Starts the page on a free port, generates with the page's defaults, uploads IMAGE to the Reconstruct tab when given
(--image), and writes the Sample tab (or --tab) as a palette PNG.
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
from selenium.webdriver.support.ui import WebDriverWait

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("out")
    p.add_argument("--tab", choices=["Sample", "Reconstruct", "Curves"], default="Sample")
    p.add_argument("--image", help="an image to upload on the Reconstruct tab first")
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
            if args.image:
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


if __name__ == "__main__":
    main()
