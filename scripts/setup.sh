#!/usr/bin/env bash
# Installs what normvision's main job and tests need on a fresh Debian machine of this project's kind:
# the Fashion-MNIST package (read from /usr/share/datasets/fashion-mnist). Idempotent and quiet when done.
set -euo pipefail
need=()
[ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing ${need[*]} with apt-get" >&2
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >&2
fi
