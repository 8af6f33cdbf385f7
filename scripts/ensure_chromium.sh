#!/bin/sh
# Make sure Debian's headless-capable Chromium and its ChromeDriver are installed (for the page's browser test).
command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 && exit 0
if command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "installing chromium and chromium-driver (Debian packages)"
  $SUDO apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  echo "chromium and chromedriver not found: install the Debian packages chromium and chromium-driver" >&2
  exit 1
fi
