#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Installs the Debian 12 packages autoglm builds, tests and benchmarks with; only what is missing.
set -euo pipefail
pkgs=(build-essential cmake ninja-build ccache libeigen3-dev libtbb-dev libfmt-dev catch2
      libbenchmark-dev nlohmann-json3-dev libopenblas-dev clang libclang-rt-14-dev
      libdnnl-dev)  # libdnnl-dev: benchmark only (bench_qgemm reference)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "install_deps: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
