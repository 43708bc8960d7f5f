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
# Needs the domU started with its network: the rig's --env RIG_DOMU_NET=1.
# With ROWS (--env ROWS="none xl-remus castor-remus castor-fgbi", default "none") the same
# ab and wrk load runs once per row, each with the domU protected its way (no network
# buffer in any of them; verdicts apache-ab-ROW, apache-wrk-ROW, apache-protect-ROW):
#   none          unprotected
#   xl-remus      Xen's own Remus, `xl remus -F -n -d -i IV` to an `xl migrate-receive -r`
#                 in this dom0 (-n: no network buffering; Debian's libxl has none, see
#                 docs/XEN.md); stopped by killing the receiver, so the domU goes on
#   castor-MODE   ha-primary --mode MODE --interval IVms streaming to ha-backup over
#                 loopback (rig_start_pair), stopped with SIGTERM (the backup stands down);
#                 castor-MODE+NAME=VALUE (e.g. castor-fgbi+pipeline=1) adds ha-primary's
#                 --NAME VALUE
# Each row also gives the console counter's rate, and for the protected ones what the
# protector reports: Castor's checkpoints/s, bytes and hold (pause) per checkpoint from
# primary.csv, xl remus's checkpoints counted from its debug log.
# Every load is bounded in time (ab -t, wrk -d, each under timeout -s KILL) and every
# wait in tries. AB_SECS (10), WRK_SECS (10), CONNS (4), AB_FILE (/specweb/class1_5, 5 KiB;
# a space-separated list runs ab once per file, e.g. the four classes' /specweb/classC_5),
# DYN (0.1), ROWS and IV (200, ms) may be set with --env.
. "$RIG_LIB"
if [ "${RIG_DOMU_NET:-0}" != 1 ]; then
	rig_fail apache-net-up "the domU was started without its network: run the rig with --env RIG_DOMU_NET=1"
	exit 0
fi
AB_SECS=${AB_SECS:-10}
WRK_SECS=${WRK_SECS:-10}
CONNS=${CONNS:-4}
AB_FILE=${AB_FILE:-/specweb/class1_5}
DYN=${DYN:-0.1}
ROWS=${ROWS:-none}
IV=${IV:-200}
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
grep 'castor-domu:' "$DOMU_CONSOLE_LOG" | tr -d '\r' | sed 's/^/domu-console| /'
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
# apache-wrk-LABEL), their figures appended to $S/rows. (busybox sh has no local
# variables: bench, bench_row and stop_xl_remus use different names.)
bench() {
	_l=$1
	# One ab run per file of AB_FILE (a space-separated list: one file size at a time);
	# with more than one, the verdicts are apache-ab-LABEL-FILE.
	for _file in $AB_FILE; do
		_t=$_l
		case "$AB_FILE" in *" "*) _t="$_l-${_file##*/}" ;; esac
		rig_client timeout -s KILL $((AB_SECS + 30)) ab -k -c "$CONNS" -t "$AB_SECS" -n 1000000 -s 10 \
			"$URL$_file" >"$S/ab-$_t.out" 2>&1
		_n=$(awk '/^Complete requests:/ {print $3}' "$S/ab-$_t.out")
		_f=$(awk '/^Failed requests:/ {print $3}' "$S/ab-$_t.out")
		_x=$(awk '/^Non-2xx responses:/ {print $3}' "$S/ab-$_t.out")
		_rps=$(awk '/^Requests per second:/ {print $4}' "$S/ab-$_t.out")
		_kbs=$(awk '/^Transfer rate:/ {print $3}' "$S/ab-$_t.out")
		_p50=$(awk '$1 == "50%" {print $2}' "$S/ab-$_t.out")
		_p99=$(awk '$1 == "99%" {print $2}' "$S/ab-$_t.out")
		_desc="ab $_file c=$CONNS ${AB_SECS}s: $_rps req/s, p50 ${_p50} ms, p99 ${_p99} ms, $_kbs KB/s, $_n requests, ${_f:-?} failed, ${_x:-0} non-2xx"
		echo "$_t $_desc" >>"$S/rows"
		if [ "${_n:-0}" -gt 0 ] && [ "$_f" = 0 ] && [ "${_x:-0}" = 0 ]; then
			rig_pass "apache-ab-$_t" "$_desc"
		else
			rig_fail "apache-ab-$_t" "$_desc"
			tail -n 15 "$S/ab-$_t.out" | sed 's/^/ab| /'
		fi
	done

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
	_desc="wrk specweb.lua dyn=$DYN c=$CONNS ${WRK_SECS}s: $_rps req/s, p50 $((${_p50:-0} / 1000)) ms, p99 $((${_p99:-0} / 1000)) ms, ${_kbs:-?} KB/s, ${_n:-?} requests, errors connect/read/write/status/timeout ${_e:-?}"
	echo "$_l $_desc" >>"$S/rows"
	if [ "${_n:-0}" -gt 0 ] && [ "$_e" = 0/0/0/0/0 ]; then
		rig_pass "apache-wrk-$_l" "$_desc"
	else
		rig_fail "apache-wrk-$_l" "$_desc"
		tail -n 15 "$S/wrk-$_l.out" | sed 's/^/wrk| /'
	fi
}

# bench_row ROW: bench ROW with the domU protected ROW's way (see the top), plus the
# console counter's rate and the protector's figures.
bench_row() {
	_row=$1
	case "$_row" in
	none) ;;
	xl-remus)
		# With network buffering (no -n) first: Debian's libxl is built without it (see
		# docs/XEN.md); this says what it answers.
		_pp=""
		timeout -s KILL 60 xl remus -F -d -i "$IV" -e -s '' "$DOMU" "xl migrate-receive -r -e" \
			>"$S/xl-remus-netbuf.log" 2>&1
		echo "xl-remus-netbuf: without -n, xl remus exited $?: $(grep -i -m 1 'network buffer\|netbuf' "$S/xl-remus-netbuf.log" | cut -c1-160)"
		stop_xl_remus "$S/xl-remus-netbuf.log"
		# -s '': no ssh; the "host" is the receiver's whole command line, run by sh -c.
		xl -vvv remus -F -n -d -i "$IV" -e -s '' "$DOMU" "xl migrate-receive -r -e" \
			>"$S/xl-remus.log" 2>&1 &
		_pp=$!
		# Checkpointing has begun when libxc reports checkpoints; if it never does in
		# 120 s, the row is measured anyway and says so.
		_i=0
		while [ "$(remus_checkpoints)" -lt 3 ] && kill -0 $_pp 2>/dev/null && [ $_i -lt 120 ]; do
			sleep 1
			_i=$((_i + 1))
		done
		if ! kill -0 $_pp 2>/dev/null; then
			rig_fail apache-protect-xl-remus "xl remus ended after ${_i}s"
			grep -v 'debug' "$S/xl-remus.log" | tail -n 15 | cut -c1-200 | sed 's/^/xl-remus| /'
			stop_xl_remus "$S/xl-remus.log"
			return 0
		fi
		echo "xl-remus: measuring after ${_i}s, $(remus_checkpoints) checkpoints so far"
		;;
	castor-*)
		_mode=${_row#castor-}
		_opt=
		case "$_mode" in
		*+*=*)
			_opt=${_mode#*+}
			_mode=${_mode%%+*}
			set -- "--${_opt%%=*}" "${_opt#*=}"
			;;
		*) set -- ;;
		esac
		rig_start_pair "$_mode" "${IV}ms" --ack-timeout 300s "$@" || {
			rig_fail "apache-protect-$_row" "xen-selftest size failed"
			return 0
		}
		_i=0
		while [ "$(grep -c '"event":"checkpoint"' "$S/backup.events" 2>/dev/null)" -lt 2 ] &&
			kill -0 $ppid 2>/dev/null && [ $_i -lt 300 ]; do
			sleep 1
			_i=$((_i + 1))
		done
		if [ "$(grep -c '"event":"checkpoint"' "$S/backup.events" 2>/dev/null)" -lt 2 ]; then
			rig_fail "apache-protect-$_row" "fewer than 2 checkpoints committed after ${_i}s"
			grep -v ' DEBUG ' "$S/primary.log" | tail -n 8 | cut -c1-300 | sed 's/^/primary| /'
			kill -KILL $ppid $bpid 2>/dev/null
			return 0
		fi
		_l0=$(wc -l <"$S/primary.csv")
		;;
	*)
		rig_fail "apache-protect-$_row" "unknown row '$_row'"
		return 0
		;;
	esac
	_c0=$(rig_counter)
	_t0=$(date +%s)
	_k0=$(remus_checkpoints)
	_w0=$(rig_save_helper_bytes)
	bench "$_row"
	_t1=$(date +%s)
	_c1=$(rig_counter)
	_k1=$(remus_checkpoints)
	_w1=$(rig_save_helper_bytes)
	_rate="console counter $_c0 -> $_c1 in $((_t1 - _t0)) s"
	case "$_row" in
	none) ;;
	xl-remus)
		# Pages per checkpoint: libxc's "Checkpointed save: N/N" of this row's checkpoints.
		_pg=$(grep -o 'Checkpointed save: [0-9]*' "$S/xl-remus.log" | tail -n +"$((_k0 + 1))" | head -n "$((_k1 - _k0))" |
			awk '{ n++; p += $3 } END { if (n) printf "%d pages (%d KiB) per checkpoint", p / n, p * 4 / n }')
		_rate="$_rate; xl remus (measured from ${_i}s after its start): $((_k1 - _k0)) checkpoints ($(awk -v k=$((_k1 - _k0)) -v s=$((_t1 - _t0)) 'BEGIN { printf "%.2f", k / s }')/s), $_pg, $(awk -v w=$((_w1 - _w0)) -v k=$((_k1 - _k0)) 'BEGIN { if (k) printf "%d KiB", w / k / 1024; else printf "?" }') written by its save helper per checkpoint"
		stop_xl_remus "$S/xl-remus.log"
		;;
	castor-*)
		# This row's epochs in primary.csv: checkpoints, their wire bytes and holds.
		_st=$(tail -n +"$((_l0 + 1))" "$S/primary.csv" | awk -F, -v secs=$((_t1 - _t0)) -v holds="$S/holds" '
			$2 == 1 { n++; b += $8; print $3 > holds }
			END { if (n) printf "%d checkpoints (%.2f/s), %d KiB per checkpoint", n, n / secs, b / n / 1024; else print "0 checkpoints" }')
		_h=$(sort -n "$S/holds" 2>/dev/null | awk '{ a[NR] = $1 } END { if (NR) printf "hold p50 %d ms, p99 %d ms", a[int((NR + 1) / 2)] / 1000, a[int((NR * 99 + 99) / 100)] / 1000 }')
		rm -f "$S/holds"
		# Where the hold goes: p50 of each part of the pause (primary.csv's stop_us ..
		# resume_us: the suspend, the output drain, the dirty log, the copy, the saved
		# state, the resume) and of the dirty pages.
		_parts=$(tail -n +"$((_l0 + 1))" "$S/primary.csv" | awk -F, '$2 == 1' | pause_parts)
		_rate="$_rate; Castor: $_st, $_h; p50 $_parts"
		kill -TERM $ppid
		_i=0
		while kill -0 $bpid 2>/dev/null && [ $_i -lt 60 ]; do
			sleep 1
			_i=$((_i + 1))
		done
		kill -KILL $ppid $bpid 2>/dev/null
		wait $ppid $bpid 2>/dev/null
		grep -q '"event":"active"' "$S/backup.events" && _rate="$_rate; THE BACKUP TOOK OVER"
		;;
	esac
	echo "$_row $_rate" >>"$S/rows"
	if [ -n "$(rig_domid)" ] && rig_wait_counter $((_c1 + 2)) 60; then
		rig_pass "apache-protect-$_row" "$_rate; the domU runs on"
	else
		rig_fail "apache-protect-$_row" "$_rate; the domU does not count on (domid '$(rig_domid)')"
	fi
}
# pause_parts: read primary.csv checkpoint rows on stdin, print the p50 of the pause's
# parts (ms), of the dirty pages, of the encoding and of the ack's latency.
pause_parts() {
	awk -F, '
		{ n++; for (c = 21; c <= 39; c++) v[c, n] = $c; d[n] = $4 }
		function p50(c,   i, j, t, a) {
			for (i = 1; i <= n; i++) a[i] = (c ? v[c, i] : d[i]) + 0
			for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
			return a[int((n + 1) / 2)]
		}
		END {
			if (!n) { print "no checkpoints"; exit }
			printf "stop %d ms, drain %d, harvest %d, copy %d, save %d, resume %d; %d dirty pages; encode %d ms, ack latency %d ms",
				p50(34) / 1000, p50(35) / 1000, p50(36) / 1000, p50(37) / 1000, p50(38) / 1000, p50(39) / 1000, p50(0),
				p50(21) / 1000, p50(23) / 1000
		}'
}
# remus_checkpoints: checkpoints xl remus has taken so far: libxc's progress lines
# "Checkpointed save: N/N" in its log, one per checkpoint (0 before it starts).
remus_checkpoints() {
	_k=$(grep -c 'Checkpointed save:' "$S/xl-remus.log" 2>/dev/null)
	echo "${_k:-0}"
}
# stop_xl_remus LOG: end Xen's Remus (the sender $_pp, if any) and keep the primary
# domain: kill the receiver first (the sender then loses its backup and resumes the
# domain), then destroy the receiver's copy; print the end of LOG.
stop_xl_remus() {
	for _p in $(ps -o pid,args | awk '/xl migrate-receive/ && !/awk/ {print $1}'); do
		kill -KILL "$_p"
	done
	_si=0
	while [ -n "$_pp" ] && kill -0 $_pp 2>/dev/null && [ $_si -lt 60 ]; do
		sleep 1
		_si=$((_si + 1))
	done
	[ -n "$_pp" ] && kill -KILL $_pp 2>/dev/null && wait $_pp 2>/dev/null
	for _d in $(xl list | awk 'NR > 1 && $1 != "Domain-0" && $1 != "'"$DOMU"'" {print $1}'); do
		xl destroy "$_d"
	done
	# The sender may have asked the guest to suspend just before it gave up: the guest
	# then suspends after libxl's resume, and stays so. Let it go on.
	echo "xl-remus: the primary domain after the stop: $(xen-selftest resume "$DOMU" 2>&1 | tail -n 1)"
	grep -v 'debug' "$1" | tail -n 6 | cut -c1-200 | sed 's/^/xl-remus| /'
	# What its debug log is made of (numbers masked), for the checkpoint count above.
	sed 's/[0-9][0-9]*/N/g' "$1" | cut -c1-120 | sort | uniq -c | sort -rn |
		head -n 12 | sed 's/^/xl-remus-log| /'
	xl list | sed 's/^/xl-list| /'
}

# 5. The baseline and the protected rows.
for row in $ROWS; do
	bench_row "$row"
done

# 6. The guest's own counter went on through it all.
c1=$(rig_counter)
if [ "$c1" -gt "$c0" ]; then
	rig_pass apache-guest-runs "console counter $c0 -> $c1, web counter now $(dyn_get)"
else
	rig_fail apache-guest-runs "console counter stuck at $c0"
fi
sed 's/^/apache-row| /' "$S/rows"
exit 0
