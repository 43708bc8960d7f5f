#!/bin/sh
# The networked domU: its vif on dom0's bridge, Apache httpd in it, and the clients ab and
# wrk in dom0's client namespace (their packets take the bridge/netback/netfront path a
# remote client's would). Checks, then a short bounded load (the unprotected baseline):
#   apache-net-up        the vif is a port of $RIG_BRIDGE, up, its hotplug script
#                        reported "connected", the frontend is connected (state 4), and
#                        the client's veth is on the bridge too
#   apache-ping          the domU answers ping from the client namespace
#   apache-static        files of every size class fetched with busybox wget have the
#                        sha256 of the rig's manifest
#   apache-dynamic       /cgi-bin/counter answers with a counter that goes up
#   apache-ab-none       `ab -k` (keep-alive, one file, AB_FILE) for AB_SECS s: no failed
#                        or non-2xx request; prints requests/s, p50/p99, transfer rate
#   apache-wrk-none      `wrk` with specweb.lua (SPECweb99's size classes, a share DYN of
#                        dynamic requests) for WRK_SECS s: no socket or status error;
#                        prints requests/s, p50/p99, transfer rate
#   apache-guest-runs    the console counter went on meanwhile
# Every load is bounded in time (ab -t, wrk -d, each under timeout -s KILL) and every
# wait in tries. AB_SECS (10), WRK_SECS (10), CONNS (4), AB_FILE (/specweb/class1_5, 5 KiB)
# and DYN (0.1) may be set with --env.
. "$RIG_LIB"
AB_SECS=${AB_SECS:-10}
WRK_SECS=${WRK_SECS:-10}
CONNS=${CONNS:-4}
AB_FILE=${AB_FILE:-/specweb/class1_5}
DYN=${DYN:-0.1}
S=$SCRATCH
# (with the port: wrk resolves a service name, and dom0 has no /etc/services)
URL=http://$DOMU_IP:80
MANIFEST=$CASTOR_DIR/rig/specweb.manifest
c0=$(rig_counter)
domid=$(rig_domid)

# 1. The vif and the bridge.
vif=vif$domid.0
hp=$(xenstore-read "/local/domain/0/backend/vif/$domid/0/hotplug-status" 2>/dev/null)
fe=$(xenstore-read "/local/domain/$domid/device/vif/0/state" 2>/dev/null)
op=$(cat "/sys/class/net/$vif/operstate" 2>/dev/null)
if [ -e "/sys/class/net/$RIG_BRIDGE/brif/$vif" ] && [ -e "/sys/class/net/$RIG_BRIDGE/brif/vc0" ] &&
	[ "$hp" = connected ] && [ "$fe" = 4 ] && [ "$op" = up ]; then
	rig_pass apache-net-up "$vif and vc0 on $RIG_BRIDGE ($(/sbin/ip -4 -o addr show dev "$RIG_BRIDGE" | awk '{print $4}')), $vif $op, hotplug-status $hp, frontend state $fe"
else
	rig_fail apache-net-up "$vif: on $RIG_BRIDGE $([ -e "/sys/class/net/$RIG_BRIDGE/brif/$vif" ] && echo yes || echo no), operstate '$op', hotplug-status '$hp', frontend state '$fe'; ports: $(ls "/sys/class/net/$RIG_BRIDGE/brif" 2>/dev/null | tr '\n' ' ')"
	tail -n 20 /var/log/xen/xen-hotplug.log 2>/dev/null | sed 's/^/hotplug| /'
fi

# 2. Ping (the domU may still be bringing eth0 up: a few tries).
i=0
while ! rig_client ping -c 3 -W 3 "$DOMU_IP" >"$S/ping.out" 2>&1 && [ $i -lt 10 ]; do
	i=$((i + 1))
	sleep 2
done
if grep -q ' 0% packet loss' "$S/ping.out"; then
	rig_pass apache-ping "$(grep -o 'min/avg/max = [0-9./]* ms' "$S/ping.out") from $CLIENT_IP to $DOMU_IP"
else
	rig_fail apache-ping "$(tail -n 2 "$S/ping.out" | tr '\n' ' ')"
	grep 'castor-domu:' "$DOMU_CONSOLE_LOG" | sed 's/^/domu-console| /'
fi

# 3. Static files: httpd up (it starts in the background of the domU's init), then the
# first, fifth and ninth file of each class checked against the manifest.
if ! rig_wait_http "$URL/specweb/class0_1" 90; then
	rig_fail apache-static "no answer from $URL in 90 s"
	grep 'castor-domu:' "$DOMU_CONSOLE_LOG" | sed 's/^/domu-console| /'
	exit 0
fi
bad=""
n=0
for c in 0 1 2 3; do
	for i in 1 5 9; do
		f=specweb/class${c}_$i
		want=$(awk -v f="$f" '$2 == f {print $1}' "$MANIFEST")
		got=$(rig_client timeout 30 wget -q -O - "$URL/$f" 2>/dev/null | sha256sum | cut -d' ' -f1)
		n=$((n + 1))
		[ -n "$want" ] && [ "$got" = "$want" ] || bad="$bad $f"
	done
done
if [ -z "$bad" ]; then
	rig_pass apache-static "$n files (102 B to 900 KiB) with the manifest's sha256"
else
	rig_fail apache-static "wrong or missing bodies:$bad"
fi

# 4. The dynamic counter goes up.
dyn_get() { rig_client timeout 30 wget -q -O - "$URL/cgi-bin/counter" 2>/dev/null | sed -n 's/^counter \([0-9][0-9]*\)$/\1/p'; }
d1=$(dyn_get)
d2=$(dyn_get)
d3=$(dyn_get)
if [ -n "$d1" ] && [ -n "$d2" ] && [ -n "$d3" ] && [ "$d2" -gt "$d1" ] && [ "$d3" -gt "$d2" ]; then
	rig_pass apache-dynamic "/cgi-bin/counter answered $d1, $d2, $d3"
else
	rig_fail apache-dynamic "/cgi-bin/counter answered '$d1', '$d2', '$d3'"
fi

# bench LABEL: one ab row and one wrk row against the domU (verdicts apache-ab-LABEL and
# apache-wrk-LABEL), their figures appended to $S/rows.
bench() {
	_l=$1
	rig_client timeout -s KILL $((AB_SECS + 30)) ab -k -c "$CONNS" -t "$AB_SECS" -n 1000000 -s 10 \
		"$URL$AB_FILE" >"$S/ab-$_l.out" 2>&1
	_n=$(awk '/^Complete requests:/ {print $3}' "$S/ab-$_l.out")
	_f=$(awk '/^Failed requests:/ {print $3}' "$S/ab-$_l.out")
	_x=$(awk '/^Non-2xx responses:/ {print $3}' "$S/ab-$_l.out")
	_rps=$(awk '/^Requests per second:/ {print $4}' "$S/ab-$_l.out")
	_kbs=$(awk '/^Transfer rate:/ {print $3}' "$S/ab-$_l.out")
	_p50=$(awk '$1 == "50%" {print $2}' "$S/ab-$_l.out")
	_p99=$(awk '$1 == "99%" {print $2}' "$S/ab-$_l.out")
	_row="ab $AB_FILE c=$CONNS ${AB_SECS}s: $_rps req/s, p50 ${_p50} ms, p99 ${_p99} ms, $_kbs KB/s, $_n requests, ${_f:-?} failed, ${_x:-0} non-2xx"
	echo "$_l $_row" >>"$S/rows"
	if [ "${_n:-0}" -gt 0 ] && [ "$_f" = 0 ] && [ "${_x:-0}" = 0 ]; then
		rig_pass "apache-ab-$_l" "$_row"
	else
		rig_fail "apache-ab-$_l" "$_row"
		tail -n 15 "$S/ab-$_l.out" | sed 's/^/ab| /'
	fi

	rig_client timeout -s KILL $((WRK_SECS + 30)) wrk -t 1 -c "$CONNS" -d "${WRK_SECS}s" --timeout 10s \
		-s "$CASTOR_DIR/rig/specweb.lua" "$URL" -- "$DYN" >"$S/wrk-$_l.out" 2>&1
	_w=$(grep '^SPECWEB ' "$S/wrk-$_l.out")
	_n=$(echo "$_w" | sed -n 's/.* requests=\([0-9]*\).*/\1/p')
	_e=$(echo "$_w" | sed -n 's/.* errors=\([0-9/]*\).*/\1/p')
	_rps=$(echo "$_w" | sed -n 's/.* rps=\([0-9.]*\).*/\1/p')
	_p50=$(echo "$_w" | sed -n 's/.* p50_us=\([0-9]*\).*/\1/p')
	_p99=$(echo "$_w" | sed -n 's/.* p99_us=\([0-9]*\).*/\1/p')
	_b=$(echo "$_w" | sed -n 's/.* bytes=\([0-9]*\).*/\1/p')
	_us=$(echo "$_w" | sed -n 's/.* duration_us=\([0-9]*\).*/\1/p')
	_kbs=$([ "${_us:-0}" -gt 0 ] && echo $((${_b:-0} * 1000000 / 1024 / _us)))
	_row="wrk specweb.lua dyn=$DYN c=$CONNS ${WRK_SECS}s: $_rps req/s, p50 $((${_p50:-0} / 1000)) ms, p99 $((${_p99:-0} / 1000)) ms, ${_kbs:-?} KB/s, ${_n:-?} requests, errors connect/read/write/status/timeout ${_e:-?}"
	echo "$_l $_row" >>"$S/rows"
	if [ "${_n:-0}" -gt 0 ] && [ "$_e" = 0/0/0/0/0 ]; then
		rig_pass "apache-wrk-$_l" "$_row"
	else
		rig_fail "apache-wrk-$_l" "$_row"
		tail -n 15 "$S/wrk-$_l.out" | sed 's/^/wrk| /'
	fi
}

# 5. The unprotected baseline.
bench none

# 6. The guest's own counter went on through it all.
c1=$(rig_counter)
if [ "$c1" -gt "$c0" ]; then
	rig_pass apache-guest-runs "console counter $c0 -> $c1, web counter now $(dyn_get)"
else
	rig_fail apache-guest-runs "console counter stuck at $c0"
fi
sed 's/^/apache-row| /' "$S/rows"
exit 0
