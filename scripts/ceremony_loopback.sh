#!/usr/bin/env bash
# The README's multi-host ceremony ("Running a real federation across hosts"), command by command, on
# loopback: one directory per host (operator, 2 proxies, 3 organizations), each party given only its
# own directory. Checks that no private key file of a party appears (by content) in any other host's
# directory, runs 2 secret-sharing rounds through `fedveil server/proxy/client`, and lists leftovers.
#   bash scripts/ceremony_loopback.sh [WORKDIR]        (~1-2 min; port 19092 must be free)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
B=${FEDVEIL:-$REPO/.venv/bin/fedveil}
PY=$(dirname "$B")/python
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
W=${1:-$(mktemp -d /tmp/fedveil-ceremony-XXXX)}
mkdir -p "$W"; cd "$W"; rm -rf hosts; mkdir -p hosts/op
"$PY" - <<'PYEOF'
import numpy as np
from sklearn.datasets import load_breast_cancer
d = load_breast_cancer(as_frame=True).frame.rename(columns={"target": "label"}).sample(frac=1.0, random_state=0)
for i, idx in enumerate(np.array_split(np.arange(len(d)), 3)):
    d.iloc[idx].to_csv(f"org{i}.csv", index=False)
PYEOF
cat > federation.toml <<'TOML'
[federation]
name = "loopback"
rounds = 2
secure = "secret-sharing"
[data]
label_column = "label"
[evaluation]
source = "none"            # the organizations' CSVs hold all of breast_cancer: no public held-out set here
[server]
superlink = "127.0.0.1:19092"
[proxies]
names = ["proxy-1", "proxy-2"]
[[orgs]]
name = "hospital-a"
[[orgs]]
name = "hospital-b"
[[orgs]]
name = "hospital-c"
TOML
PROXIES="proxy-1 proxy-2"; ORGS="hospital-a hospital-b hospital-c"
for p in $PROXIES; do mkdir -p hosts/$p; (cd hosts/$p && $B keys gen --role proxy --name $p --out keys); done
for o in $ORGS; do mkdir -p hosts/$o; (cd hosts/$o && $B keys gen --role org --name $o --out keys); done
pubs=""
for h in $PROXIES $ORGS; do cp hosts/$h/keys/$h.public.json hosts/op/; pubs="$pubs --public $h.public.json"
  (cd hosts/op && $B keys fingerprint $h.public.json >/dev/null); done
(cd hosts/op && $B keys init --out fed --hosts 127.0.0.1,localhost $pubs) | tee hosts/op/init.out
FP=$(grep -o 'sha256): *[0-9a-f]\{64\}' hosts/op/init.out | grep -o '[0-9a-f]\{64\}')
echo "FP=$FP"
for h in $PROXIES $ORGS; do cp -r hosts/op/fed/handout hosts/$h/handout; cp federation.toml hosts/$h/
  (cd hosts/$h && test "$($B keys fingerprint handout/manifest.json | grep -o '[0-9a-f]\{64\}' | head -1)" = "$FP" \
     && $B keys install --bundle handout --out keys --manifest-fingerprint $FP); done
cp federation.toml hosts/op/
leaks=0
# custody: no private key file of one party (by content) anywhere in another host's directory
for h in $PROXIES $ORGS; do for f in $(find hosts/$h/keys -name '*.key'); do sum=$(sha256sum < $f | cut -d' ' -f1)
  for other in op $PROXIES $ORGS; do [ "$h" = "$other" ] && continue
    if find hosts/$other -type f -exec sha256sum {} + | grep -q $sum; then echo "LEAK: $f found in $other"; leaks=1; fi
  done; done; done
echo "private key files: $(find hosts -name '*.key' | wc -l)"
pids=""
(cd hosts/op && exec $B server --config federation.toml --keys fed/server --superlink 127.0.0.1:19092) > hosts/op/server.log 2>&1 &
SERVER=$!
for p in $PROXIES; do (cd hosts/$p && exec $B proxy --config federation.toml --name $p --keys keys --superlink 127.0.0.1:19092) > hosts/$p/node.log 2>&1 & pids="$pids $!"; done
i=0; for o in $ORGS; do (cd hosts/$o && exec $B client --config federation.toml --org $o --data ../../org$i.csv --keys keys \
   --manifest-fingerprint $FP --superlink 127.0.0.1:19092) > hosts/$o/node.log 2>&1 & pids="$pids $!"; i=$((i+1)); done
start=$(date +%s)
set +e
timeout 600 tail --pid=$SERVER -f /dev/null; rc=$?
wait $SERVER; src=$?
echo "server [ "$leaks" = 0 ] || { echo "private keys leaked across hosts"; exit 1; }
exit $src after $(( $(date +%s) - start ))s"
kill -TERM $pids 2>/dev/null; sleep 5; kill -KILL $pids 2>/dev/null
tail -20 hosts/op/server.log
for h in $PROXIES $ORGS; do echo "== $h"; grep -i "error\|Traceback" hosts/$h/node.log | head -3; done
sleep 10; echo "left running:"; pgrep -fa "$W|19092" | grep -v -e pgrep -e ceremony_loopback || true
[ "$leaks" = 0 ] || { echo "private keys leaked across hosts"; exit 1; }
exit $src
