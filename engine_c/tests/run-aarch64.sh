#!/usr/bin/env bash
# Cross-builds the engine and its C tests for aarch64 (the phones' architecture) and runs them
# under qemu-user, twice:
#   1. baseline ARMv8.0-A, what every aarch64 phone runs: the default kernel set must be
#      "neon" (NEON, fp32 accumulation);
#   2. ARMv8.2-A+fp16 (Cortex-A55/A75 and later): the same tests, plus the fp16-arithmetic
#      kernel set "neon-fp16" checked against the scalar reference and its error bound;
#   3. baseline with the phone build options (no O_DIRECT, 16 KiB alignment, no io_uring).
# Installs what it needs from Debian's packages when missing (as root, or through sudo).
# Exits non-zero if anything fails to install, build or pass.
set -euo pipefail
cd "$(dirname "$0")/.."

CROSS=aarch64-linux-gnu
SYSROOT=/usr/$CROSS

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
find_qemu() { command -v qemu-aarch64 || command -v qemu-aarch64-static || true; }

if ! command -v "$CROSS-gcc" >/dev/null || [ ! -e "$SYSROOT/lib/libc.so.6" ] || [ -z "$(find_qemu)" ]; then
    echo "== aarch64: installing the cross compiler and qemu-user"
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get update -q
    as_root apt-get install -y -q --no-install-recommends gcc-aarch64-linux-gnu libc6-dev-arm64-cross
    if [ -z "$(find_qemu)" ]; then
        as_root apt-get install -y -q --no-install-recommends qemu-user \
            || as_root apt-get install -y -q --no-install-recommends qemu-user-static
    fi
fi
QEMU=$(find_qemu)
[ -n "$QEMU" ] || { echo "aarch64: no qemu-aarch64 after installing qemu-user" >&2; exit 1; }
# KVTIER_TEST_NO_FORK: qemu-user forks a multithreaded guest without its own threads' locks
# released, and the child can hang on one of them (seen on a loaded machine); the fork check
# runs natively, plain, under ASan and under valgrind
RUN="env KVTIER_TEST_NO_FORK=1 $QEMU -L $SYSROOT"
echo "== aarch64: $("$CROSS-gcc" --version | head -1); $($QEMU --version | head -1)"

# Builds into build-aarch64<suffix> with extra CFLAGS, runs the tests under qemu, keeps the
# output in $out for the checks below. make's exit status carries the tests' own.
run_build() {
    local suffix=$1 cflags=$2 extra=${3:-}
    echo "== aarch64: build-aarch64$suffix (CFLAGS $cflags${extra:+ $extra})"
    make -j2 CC="$CROSS-gcc" AR="$CROSS-ar" BUILD="build-aarch64$suffix" CFLAGS="$cflags" EXTRA_CFLAGS="$extra" all
    if command -v file >/dev/null; then
        # not `file | grep -q`: an early grep exit can SIGPIPE file, a failure under pipefail
        case "$(file "build-aarch64$suffix/test_kvtier")" in
            *"ARM aarch64"*) ;;
            *) echo "aarch64: the test binary is not an aarch64 ELF" >&2; exit 1 ;;
        esac
    fi
    out=$($RUN "build-aarch64$suffix/test_kvtier" 2>&1) || { echo "$out"; echo "aarch64: tests failed ($suffix)" >&2; exit 1; }
    echo "$out"
}

run_build "" "-O2 -g"
kernel=$(sed -n 's/^kvtier engine tests (kernel: \(.*\))$/\1/p' <<<"$out")
echo "aarch64: SIMD kernel that ran: ${kernel:-none reported}"
[ "$kernel" = neon ] || { echo "aarch64: expected the neon kernels, got '${kernel}'" >&2; exit 1; }

run_build "-fp16" "-O2 -g -march=armv8.2-a+fp16"
grep -q "checked against the reference:.* neon-fp16" <<<"$out" \
    || { echo "aarch64: the fp16-arithmetic kernel set was not built or not checked" >&2; exit 1; }
echo "aarch64: fp16 build checked: $(grep '^simd: neon-fp16' <<<"$out")"

run_build "-phone" "-O2 -g" "-DKVT_NO_DIRECT -DKVT_IO_ALIGN=16384 -DKVT_NO_IO_URING"
grep -q "^io: direct reads off here, alignment 16384$" <<<"$out" \
    || { echo "aarch64: the phone build did not run buffered with 16 KiB alignment" >&2; exit 1; }
echo "aarch64: all passed (default kernel neon; neon-fp16 validated; phone build options)"
