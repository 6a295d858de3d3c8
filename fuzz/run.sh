#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time and fails if any of them
# finds a crash (a panic, an abort, an ASan report, a timeout or an
# out-of-memory). Not part of CI's default run (.ci/run); see fuzz/README.md.
#
#   fuzz/run.sh [seconds-per-target]         default 60
#   FUZZ_SANITIZER=none fuzz/run.sh 300      without AddressSanitizer (faster)
#   FUZZ_TARGETS="ws_frames" fuzz/run.sh     only some targets
#
# The committed seeds in fuzz/corpus/<target>/ are read, never written: new
# inputs go to fuzz/target/corpus/<target>/ (kept between runs), crashes to
# fuzz/artifacts/<target>/.
set -euo pipefail

secs="${1:-60}"
case "$secs" in
'' | *[!0-9]*)
    echo "usage: $0 [seconds-per-target]" >&2
    exit 2
    ;;
esac
cd "$(dirname "$0")"

# cargo-fuzz passes nightly-only flags (-Zsanitizer=..., -Cpasses=sancov-module);
# RUSTC_BOOTSTRAP=1 lets the stable toolchain accept them.
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
sanitizer="${FUZZ_SANITIZER:-address}"
targets="${FUZZ_TARGETS:-$(cargo fuzz list)}"

# Default build: optimised, with debug assertions and overflow checks.
cargo fuzz build --sanitizer "$sanitizer"

failed=()
for t in $targets; do
    work="target/corpus/$t"
    mkdir -p "$work" "corpus/$t"
    echo "=== $t: ${secs}s (sanitizer: $sanitizer)"
    set +e
    cargo fuzz run --sanitizer "$sanitizer" "$t" "$work" "corpus/$t" -- \
        -max_total_time="$secs" -max_len=8192 -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 2>&1 | tee "target/fuzz-$t.log" |
        grep --line-buffered -E '^(#[0-9]+[[:space:]]+(INITED|DONE)|==[0-9]+==|stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)|SUMMARY|thread .* panicked|Test unit written|Done )'
    status="${PIPESTATUS[0]}"
    set -e
    if [ "$status" -ne 0 ]; then
        failed+=("$t")
        echo "!!! $t failed: see fuzz/target/fuzz-$t.log and fuzz/artifacts/$t/" >&2
    fi
done

if [ "${#failed[@]}" -ne 0 ]; then
    echo "fuzzing found crashes in: ${failed[*]}" >&2
    exit 1
fi
echo "fuzzing: no crash in ${secs}s per target ($(echo $targets | wc -w) targets)"
