#!/bin/bash
# What compiling a plugin takes from the rest of the machine (BENCHMARKS.md, "Compiling beside
# running tenants"). Two CPU-bound processes at nice 0 count for 25 s; from their second 2, the
# given tidegate binary compiles the JS example with a fresh compiled-plugin cache. Prints the
# loops' total work and the compile's time; with `none`, the loops alone (the baseline).
#
#   bench/compile-beside/run.sh none
#   bench/compile-beside/run.sh target/release/tidegate [component.wasm]
set -euo pipefail
bin=$1
component=${2:-$(ls "${XDG_CACHE_HOME:-$HOME/.cache}"/tidegate/examples/js-transform-*.wasm | head -1)}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/spin.py" <<'PY'
import time
end = time.time() + 25
n = 0
while time.time() < end:
    for _ in range(10000):
        n += 1
print(n)
PY
echo '{"operationType":"insert","ns":{"db":"a","coll":"b"},"fullDocument":{"x":1}}' > "$work/event.jsonl"
python3 "$work/spin.py" > "$work/spin1" & one=$!
python3 "$work/spin.py" > "$work/spin2" & two=$!
sleep 2
if [ "$bin" != none ]; then
  start=$(date +%s.%N)
  XDG_CACHE_HOME="$work/cache" "$bin" plugin test "$component" --events "$work/event.jsonl" > /dev/null 2>&1 || true
  echo "compile and load: $(echo "$(date +%s.%N) - $start" | bc) s"
fi
wait $one $two
echo "busy loops' work: $(( $(cat "$work/spin1") + $(cat "$work/spin2") ))"
