#!/usr/bin/env bash
# Install Debian's Chromium when no Chromium is on PATH (the report's browser test renders
# report.html with it). Needs root and apt; prints why not and exits 1 where it cannot.
set -euo pipefail
for name in chromium chromium-browser google-chrome; do
  if command -v "$name" >/dev/null 2>&1; then command -v "$name"; exit 0; fi
done
if [ "$(id -u)" != 0 ]; then echo "no chromium on PATH and not root: cannot apt-get install chromium" >&2; exit 1; fi
if ! command -v apt-get >/dev/null 2>&1; then echo "no chromium on PATH and no apt-get to install it" >&2; exit 1; fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >&2 && apt-get install -y -q chromium >&2 || { echo "apt-get install chromium failed" >&2; exit 1; }
command -v chromium
