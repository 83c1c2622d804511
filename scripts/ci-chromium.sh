#!/usr/bin/env bash
# Debian packages for the dashboard's browser tests (tests/ui):
#   chromium           the browser Playwright drives (chromium.launch(executable_path="/usr/bin/chromium"));
#                      Playwright's own browser download is never used, so nothing is fetched at test time
#   fonts-dejavu-core  a font, so pages render text (and screenshots are readable) on a minimal machine
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
pkgs=(chromium fonts-dejavu-core)
need=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
if ((${#need[@]})); then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
test -x /usr/bin/chromium
