#!/usr/bin/env bash
# Debian's Chromium for the browser tests, the web benchmark and the screenshot (Playwright drives it; no browser
# download). Nothing to do when one is installed; as root it installs the package, otherwise it prints the command.
set -euo pipefail
if command -v chromium > /dev/null || [ -x /usr/lib/chromium/chromium ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "no Chromium: sudo apt-get install -y --no-install-recommends chromium (the browser tests skip without it)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq --no-install-recommends chromium > /dev/null 2>&1 \
  || { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium > /dev/null; }
