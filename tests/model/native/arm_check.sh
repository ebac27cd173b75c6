#!/usr/bin/env bash
# The ARM kernels (model/matching/_mnn_arm.c) checked bit for bit against a scalar reference
# (arm_check.c) under qemu-user, on emulated CPUs with NEON only, with the dot product, and with i8mm:
# each run also checks that the library detects exactly those features. No ARM machine runs the tests;
# `make arm-check` installs Debian's cross compiler and qemu-user. Exit 77: those tools are absent.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
CC="${AARCH64_CC:-aarch64-linux-gnu-gcc}"
QEMU="${QEMU_AARCH64:-qemu-aarch64}"
for tool in "$CC" "$QEMU"; do
    command -v "$tool" >/dev/null 2>&1 || { echo "arm_check: $tool not found (make arm-check installs it)"; exit 77; }
done
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
matching="$here/../../../model/matching"
# The library as pip builds it on ARM (both sources; the x86 kernels compile to nothing there) ...
"$CC" -O3 -Wall -Wextra -Werror -shared -fPIC -o "$out/lib.so" "$matching/_mnn_cpu.c" "$matching/_mnn_arm.c"
# ... and the kernels with the checking driver, static so that qemu needs no ARM libraries.
"$CC" -O3 -Wall -Wextra -Werror -static -o "$out/arm_check" "$here/arm_check.c" -lm
for cpu in "cortex-a53 neon" "cortex-a76 neon,dotprod" "max neon,dotprod,i8mm"; do
    set -- $cpu
    echo "== qemu -cpu $1 (expects $2)"
    "$QEMU" -cpu "$1" "$out/arm_check" "$2"
done
