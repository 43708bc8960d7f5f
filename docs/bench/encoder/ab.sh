#!/bin/sh
# A/B of the encode stage on the same saved epochs: the build before issue 17 item 3
# (hb-base) against this one (hb-new), alternating, each pass --repeat 5.
set -e
out=$(dirname "$0")
: > $out/ab.jsonl
for pass in 1 2 3; do
  for b in base new; do
    /tmp/hb-$b encoder --load /tmp/traces --repeat 5 --json | sed "s/^{/{\"build\":\"$b\",\"pass\":$pass,/" >> $out/ab.jsonl
  done
done
