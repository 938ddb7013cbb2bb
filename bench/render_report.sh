#!/usr/bin/env bash
# Render a run's report.html in headless Chromium and save a screenshot, to check the page by eye.
#
#   bench/render_report.sh runs/demo                 -> runs/demo/report.png
#   bench/render_report.sh runs/demo out.png 1200 2400   (output file, window width, height)
#
# Needs Debian's chromium (`apt-get install -y chromium`). No network is used: the report is self-contained
# (inline CSS, the loss plot embedded as base64), and the flags below switch off Chromium's own background
# traffic. If report.html is missing it is built first with `lorafit report RUN_DIR`.
set -euo pipefail
run_dir=${1:?usage: bench/render_report.sh RUN_DIR [OUT.png] [WIDTH] [HEIGHT]}
out=${2:-$run_dir/report.png}
width=${3:-1200}
height=${4:-2400}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [ -z "$browser" ]; then
  echo "chromium not found: apt-get install -y chromium" >&2
  exit 2
fi
if [ ! -f "$run_dir/report.html" ]; then
  lorafit report "$run_dir"
fi
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
out_abs=$(realpath -m "$out")
"$browser" --headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$profile" \
  --window-size="$width,$height" --screenshot="$out_abs" "file://$(realpath "$run_dir/report.html")" >/dev/null 2>&1
test -s "$out_abs"
echo "$out_abs"
