#!/usr/bin/env bash
# Builds and runs tests/compile/task_switches.c with every context switch:
# the native assembly, ucontext, a switch of the user's, FLASH_NO_TASKS, and
# the AArch64 assembly under qemu-user when its cross compiler is installed
# (tests/deps.sh installs gcc-aarch64-linux-gnu and qemu-user). Also checks
# that the header's ucontext path compiles as C++. Called by `make headers`.
set -euo pipefail
cd "$(dirname "$0")/../.."
CC="${CC:-cc}"
CXX="${CXX:-c++}"
out=${BUILD:-build}/headers
mkdir -p "$out"
strict="-std=c11 -Wall -Wextra -Wpedantic -Werror -O2 -I."
for variant in native:"" ucontext:-DFLASH_TASK_UCONTEXT user:-DBYO_SWITCH none:-DFLASH_NO_TASKS; do
    name=${variant%%:*}
    flags=${variant#*:}
    # shellcheck disable=SC2086
    "$CC" $strict $flags tests/compile/task_switches.c -o "$out/task_switches_$name" -lm -lpthread
    "./$out/task_switches_$name"
done
printf '#define FLASH_IMPLEMENTATION\n#define FLASH_TASK_UCONTEXT\n#include "flash.h"\n' > "$out/ucontext.cc"
"$CXX" -std=c++17 -Wall -Wextra -Wpedantic -Werror -I. -fsyntax-only "$out/ucontext.cc"
if command -v aarch64-linux-gnu-gcc >/dev/null && command -v qemu-aarch64 >/dev/null; then
    # shellcheck disable=SC2086
    aarch64-linux-gnu-gcc $strict -static tests/compile/task_switches.c -o "$out/task_switches_aarch64" -lm
    qemu-aarch64 "./$out/task_switches_aarch64"
else
    echo "tasks (AArch64 assembly): skipped, no aarch64-linux-gnu-gcc and qemu-aarch64 (tests/deps.sh installs them)"
fi
