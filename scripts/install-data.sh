#!/usr/bin/env bash
# Installs the Debian packages the tests (and training recipes) read or run.
#   dataset-fashion-mnist    Fashion-MNIST, MIT        (tests, fashion_mnist recipe)
#   tuxpaint-stamps-default  Tux Paint stamps, GPL-2   (tests, default recipe)
#   chromium                 headless browser: renders the dedupe HTML report in tests/test_batch.py
#   openclipart-png          Open Clip Art, public domain (default recipe only; 130 MB: pass --train)
set -euo pipefail
pkgs=()
[ -d /usr/share/datasets/fashion-mnist ] || pkgs+=(dataset-fashion-mnist)
[ -d /usr/share/tuxpaint/stamps ] || pkgs+=(tuxpaint-stamps-default)
command -v chromium >/dev/null || pkgs+=(chromium)
if [ "${1:-}" = "--train" ]; then
  [ -d /usr/share/openclipart/png ] || pkgs+=(openclipart-png)
fi
[ ${#pkgs[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing Debian data packages: ${pkgs[*]}" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
