#!/usr/bin/env bash
# Installs the Debian packages the tests (and training recipes) read or run.
#   dataset-fashion-mnist    Fashion-MNIST, MIT        (tests, fashion_mnist recipe)
#   tuxpaint-stamps-default  Tux Paint stamps, GPL-2   (tests, default recipe)
#   chromium                 headless browser: renders the dedupe HTML report in tests/test_batch.py
#   openclipart-png          Open Clip Art, public domain (default recipe only; 130 MB: pass --train)
#   fonts-dejavu-core        DejaVu fonts, free licence: text overlays of copy-detection queries (tests, bench)
#   fonts-noto-color-emoji   Noto Color Emoji, OFL-1.1: emoji overlays of copy-detection queries (tests, bench)
# --photos: natural photos, one scene per wallpaper (simserve/photos.py; ~150 MB), for
# `simserve bench copydetect` and photo training recipes:
#   plasma-workspace-wallpapers GPL-2+, ukui-wallpapers CC-BY-SA-3.0, lomiri-wallpapers CC-BY / CC-BY-SA / CC0
#   per file, gnome-backgrounds CC-BY-SA-3.0
set -euo pipefail
pkgs=()
[ -d /usr/share/datasets/fashion-mnist ] || pkgs+=(dataset-fashion-mnist)
[ -d /usr/share/tuxpaint/stamps ] || pkgs+=(tuxpaint-stamps-default)
command -v chromium >/dev/null || pkgs+=(chromium)
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf ] || pkgs+=(fonts-dejavu-core)
[ -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] || pkgs+=(fonts-noto-color-emoji)
for arg in "$@"; do
  case "$arg" in
    --train) [ -d /usr/share/openclipart/png ] || pkgs+=(openclipart-png) ;;
    --photos)
      for p in plasma-workspace-wallpapers ukui-wallpapers lomiri-wallpapers gnome-backgrounds; do
        dpkg -s "$p" >/dev/null 2>&1 || pkgs+=("$p")
      done ;;
    *) echo "usage: $0 [--train] [--photos]" >&2; exit 2 ;;
  esac
done
[ ${#pkgs[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing Debian data packages: ${pkgs[*]}" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
