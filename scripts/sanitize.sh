#!/usr/bin/env bash
# The engine under sanitizers and valgrind, apart from the regular build:
#  1. builds the Python extension with AddressSanitizer + UndefinedBehaviorSanitizer in a copy
#     of the tree in a temporary directory (the editable install, kvtier/*.so and
#     engine_c/build are not touched), then runs the engine-heavy Python tests against that
#     build with libasan preloaded (the interpreter itself is not instrumented);
#  2. builds the C unit tests without sanitizers (valgrind and ASan do not mix) and runs them
#     under valgrind memcheck.
# Fails on any sanitizer report (in the tests or in any process they start) or valgrind error.
#
#   scripts/sanitize.sh                  both parts
#   scripts/sanitize.sh tests/test_x.py  part 1 on other test files, then part 2
#   PYTHON=...            the interpreter (default: .venv/bin/python, else python3)
#   KVTIER_SANITIZE_KEEP=1  keep the temporary directory (build and sanitizer logs)
#   KVTIER_SANITIZE_SKIP=valgrind|python  run only the other part
# Leak detection is off for the Python part: CPython keeps objects alive until exit by design.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=$(command -v python3); fi
fi
# absolute, without resolving the venv's symlink (the venv is found through its own path)
PY="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")"
CC=${CC:-gcc}
TESTS=("$@")
# the engine-heavy tests: API, model, faults, budget, and the reliability suites whose damaged
# files and injected faults drive the engine's error paths (the crash tests only kill it)
[ ${#TESTS[@]} -gt 0 ] || TESTS=(tests/test_api.py tests/test_model.py tests/test_faults.py tests/test_budget.py
                                 tests/test_concurrency.py tests/test_fault_sweep.py tests/test_fuzz.py
                                 tests/test_format_fixture.py tests/test_multiprocess.py tests/test_virtualize.py
                                 tests/test_layout.py tests/test_prefetch.py)
TMP=$(mktemp -d -t kvtier-sanitize.XXXXXX)
trap '[ -n "${KVTIER_SANITIZE_KEEP:-}" ] && echo "sanitize: kept $TMP" || rm -rf "$TMP"' EXIT
start=$(date +%s)

echo "== sanitize: copying the tree"
mkdir -p "$TMP/src"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # tracked files and new ones not ignored: what a clean clone would hold, plus work in progress
    git ls-files -z -co --exclude-standard | while IFS= read -r -d '' f; do [ ! -e "$f" ] || printf '%s\0' "$f"; done \
        | tar --null -T - -cf - | tar -xf - -C "$TMP/src"
else
    tar --exclude=./.venv --exclude='./engine_c/build*' --exclude='*.so' --exclude=__pycache__ -cf - . \
        | tar -xf - -C "$TMP/src"
fi
rm -f "$TMP"/src/kvtier/*.so

fail() { echo "sanitize: FAILED: $*" >&2; exit 1; }

if [ "${KVTIER_SANITIZE_SKIP:-}" != python ]; then
    echo "== sanitize: Python extension with ASan + UBSan"
    LIBASAN=$("$CC" -print-file-name=libasan.so)
    [ -f "$LIBASAN" ] || fail "$CC has no libasan.so (install the compiler's libasan)"
    BUILD_PATH=""
    if ! "$PY" -c "import Cython" 2>/dev/null; then  # a build tool only: kept out of the venv
        "$PY" -m pip install -q --target "$TMP/tools" "Cython>=3.0"
        BUILD_PATH="$TMP/tools"
    fi
    (
        cd "$TMP/src"
        export KVTIER_CFLAGS="-O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all"
        export KVTIER_LDFLAGS="-fsanitize=address,undefined"
        PYTHONPATH="$BUILD_PATH" "$PY" setup.py -q build_ext --inplace
    ) >"$TMP/build.log" 2>&1 || { tail -40 "$TMP/build.log"; fail "building the sanitized extension"; }
    SO=$(ls "$TMP"/src/kvtier/_engine*.so)
    # not `ldd | grep -q`: grep quitting early can SIGPIPE ldd, which pipefail counts as failure
    case "$(ldd "$SO")" in *libasan*) ;; *) fail "$SO is not linked against libasan" ;; esac
    mkdir -p "$TMP/reports"
    (
        cd "$TMP/src"
        # log_path: every process (the tests start children) writes its report to a file, so
        # that none is lost to pytest's output capture or to an aborted process
        export LD_PRELOAD="$LIBASAN"
        export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:log_path=$TMP/reports/asan"
        export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$TMP/reports/ubsan"
        export PYTHONPATH="$TMP/src" HF_HUB_OFFLINE=1
        "$PY" -c "import kvtier._engine as e, sys; sys.exit(not e.__file__.startswith('$TMP'))" \
            || fail "the tests would not import the sanitized build"
        # --capture=sys: C code writes its reports to file descriptor 2, which pytest's
        # default capture would swallow when the process aborts
        "$PY" -m pytest -q -p no:cacheprovider --capture=sys "${TESTS[@]}" 2>&1 | tee "$TMP/pytest.log"
        exit "${PIPESTATUS[0]}"
    ) || status=$?
    if ls "$TMP"/reports/* >/dev/null 2>&1; then
        for f in "$TMP"/reports/*; do echo "---- $f"; head -60 "$f"; done
        fail "sanitizer reports above"
    fi
    if grep -qE "ERROR: (Address|Leak)Sanitizer|runtime error:|SUMMARY: [A-Za-z]+Sanitizer" "$TMP/pytest.log"; then
        grep -E -A30 "ERROR: (Address|Leak)Sanitizer|runtime error:" "$TMP/pytest.log" | head -80
        fail "sanitizer reports above"
    fi
    [ "${status:-0}" -eq 0 ] || fail "tests under ASan + UBSan (exit ${status})"
    echo "sanitize: Python tests clean under ASan + UBSan (${TESTS[*]})"
fi

if [ "${KVTIER_SANITIZE_SKIP:-}" != valgrind ]; then
    echo "== sanitize: C unit tests under valgrind memcheck"
    command -v valgrind >/dev/null || fail "valgrind is not installed (apt-get install valgrind)"
    make -s -C "$TMP/src/engine_c" BUILD=build-valgrind CFLAGS="-O1 -g" -j2 build-valgrind/test_kvtier \
        >"$TMP/make.log" 2>&1 || { tail -40 "$TMP/make.log"; fail "building the C tests"; }
    (cd "$TMP/src/engine_c" && valgrind -q --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite,possible \
        --track-origins=yes ./build-valgrind/test_kvtier) || fail "valgrind memcheck"
    echo "sanitize: C tests clean under valgrind"
fi
echo "== sanitize done in $(( $(date +%s) - start )) s"
