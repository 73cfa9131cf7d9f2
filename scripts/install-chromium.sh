#!/usr/bin/env bash
# Headless Chromium for the web-console browser tests (tests/test_console_browser.py).
#
#   scripts/install-chromium.sh        # prints the path of the chromium binary on stdout
#
# Uses a chromium already on PATH (or $FEDPACT_CHROMIUM); otherwise, as root, installs Debian's
# `chromium` package with apt-get (set FEDPACT_NO_APT=1 to forbid that). Playwright's own browser
# download is not used (it does not work offline). Exit code 3: no browser available.
set -euo pipefail

find_browser() {
  local candidate
  for candidate in "${FEDPACT_CHROMIUM:-}" chromium chromium-browser google-chrome; do
    [[ -n "$candidate" ]] || continue
    if command -v "$candidate" >/dev/null 2>&1; then
      command -v "$candidate"
      return 0
    fi
  done
  return 1
}

if path=$(find_browser); then
  echo "$path"
  exit 0
fi
if [[ "${FEDPACT_NO_APT:-0}" == "1" ]]; then
  echo "no chromium found and FEDPACT_NO_APT=1 forbids installing it" >&2
  exit 3
fi
if [[ "$(id -u)" != "0" ]]; then
  echo "no chromium found; install Debian's chromium package (sudo apt-get install chromium) or set FEDPACT_CHROMIUM" >&2
  exit 3
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >&2
if path=$(find_browser); then
  echo "$path"
  exit 0
fi
echo "apt-get finished but no chromium binary is on PATH" >&2
exit 3
