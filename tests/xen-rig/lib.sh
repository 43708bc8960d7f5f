# Helpers for test scripts running inside the rig's dom0: `. "$RIG_LIB"`.
# (busybox sh; the environment is described in tests/xen-rig/README.md)

# rig_pass NAME [DETAIL...] / rig_fail NAME DETAIL...: print a verdict line.
rig_pass() {
	_n=$1
	shift
	echo "CASTOR-TEST $_n PASS $*"
}
rig_fail() {
	_n=$1
	shift
	echo "CASTOR-TEST $_n FAIL ${*:-failed}"
}

# rig_counter [LOG]: the last counter value the domU printed (0 if none yet).
rig_counter() {
	_v=$(tr -d '\r' <"${1:-$DOMU_CONSOLE_LOG}" 2>/dev/null | grep -o 'counter [0-9][0-9]*' | tail -n 1)
	echo "${_v#counter }" | grep -x '[0-9][0-9]*' || echo 0
}

# rig_wait_counter MIN [SECS [LOG]]: wait until the counter reaches MIN; 1 on timeout.
rig_wait_counter() {
	_min=$1
	_left=$((${2:-30} * 10))
	while [ "$(rig_counter "${3:-$DOMU_CONSOLE_LOG}")" -lt "$_min" ]; do
		_left=$((_left - 1))
		[ "$_left" -le 0 ] && return 1
		sleep 0.1
	done
	return 0
}

# rig_domid [NAME]: the domain id of NAME (default $DOMU), empty if it does not exist.
rig_domid() {
	xl domid "${1:-$DOMU}" 2>/dev/null
}

# rig_start_pair MODE INTERVAL [HA_PRIMARY_OPTION...]: protect $DOMU with ha-primary and
# ha-backup in this dom0 over loopback (--insecure), both with MODE and INTERVAL; the
# backup restores with $DOMU_CFG. Their events, stats and logs go to
# $SCRATCH/{primary,backup}.*, ha-primary's summary to $SCRATCH/primary.json. Sets MEM
# (the memory size both use), bpid and ppid; status 1 if the size cannot be read.
# RIG_BACKUP_OPTS, if set, adds options to ha-backup's command line (split at spaces).
# The domU always has a vif, so ha-primary gets --no-net-buffer unless the options name a
# --net-buffer (a Xen guest with a vif needs one or the other).
rig_start_pair() {
	_mode=$1
	_iv=$2
	shift 2
	# A PVH guest's gfn space reaches 4 GiB (its special frames): the images are sparse
	# allocations that dom0's 768 MB could not back in full.
	echo 1 >/proc/sys/vm/overcommit_memory
	MEM=$(xen-selftest size "$DOMU") || return 1
	ha-backup --listen 127.0.0.1:7700 --memory "$MEM" --guest xen --xen-config "$DOMU_CFG" \
		--insecure --mode "$_mode" --interval "$_iv" --detect-timeout 120s \
		--events "$SCRATCH/backup.events" --stats "$SCRATCH/backup.csv" ${RIG_BACKUP_OPTS:-} \
		2>"$SCRATCH/backup.log" &
	bpid=$!
	sleep 1
	_nb=--no-net-buffer
	for _a in "$@"; do
		[ "$_a" = --net-buffer ] && _nb=
	done
	ha-primary --guest xen --xen-domain "$DOMU" --backup 127.0.0.1:7700 --insecure \
		--mode "$_mode" --interval "$_iv" --events "$SCRATCH/primary.events" \
		--stats "$SCRATCH/primary.csv" $_nb "$@" >"$SCRATCH/primary.json" 2>"$SCRATCH/primary.log" &
	ppid=$!
}

# rig_client CMD...: run CMD in the clients' network namespace ($CLIENT_NS, address
# $CLIENT_IP on the bridge $RIG_BRIDGE), so its traffic to $DOMU_IP takes the vif path.
# (/sbin/ip is iproute2's: busybox sh runs its own ip applet, which has no netns, for a
# bare "ip".)
rig_client() {
	/sbin/ip netns exec "$CLIENT_NS" "$@"
}

# rig_wait_http URL [SECS]: wait (up to SECS, default 60) until URL answers from the
# client namespace (busybox wget, 5 s per try; not wget -T, which crashes
# Debian's static busybox 1.35); 1 on timeout.
rig_wait_http() {
	_end=$(($(date +%s) + ${2:-60}))
	while ! rig_client timeout 5 wget -q -O /dev/null "$1" 2>/dev/null; do
		[ "$(date +%s)" -ge "$_end" ] && return 1
		sleep 1
	done
	return 0
}

# rig_disk_cfg OUT DEVICE [KERNEL_ARGS]: an xl config OUT for $DOMU with DEVICE (a block
# device in dom0: /dev/nbdN, /dev/loopN) as its disk xvda and KERNEL_ARGS added to the
# kernel command line (castor_ip=... for the network, castor_disk=... for domu-init).
# The disk's hotplug script is a minimal one ($SCRATCH/block-phy, written here): Xen's
# own `block` script needs flock(1), which this busybox dom0 lacks, and hangs in its lock.
# Persistent grants are turned off in xen-blkback for the disks created from now on
# (ha-primary refuses a served disk that uses them: blkback's writes into its persistently
# mapped frames bypass Xen's dirty log; docs/XEN.md, "A disk").
rig_disk_cfg() {
	echo N >/sys/module/xen_blkback/parameters/feature_persistent ||
		echo "rig_disk_cfg: cannot turn off xen-blkback's persistent grants"
	grep -v '^extra' "$DOMU_CFG" >"$1"
	echo "extra = \"console=hvc0 rdinit=/init${3:+ $3}\"" >>"$1"
	echo "disk = [ 'phy:$2,xvda,w,script=$SCRATCH/block-phy' ]" >>"$1"
	[ -x "$SCRATCH/block-phy" ] && return 0
	cat >"$SCRATCH/block-phy" <<'EOS'
#!/bin/sh
# libxl's hotplug call: $1 add|remove, XENBUS_PATH the backend's xenstore path.
[ "$1" = add ] || exit 0
dev=$(xenstore-read "$XENBUS_PATH/params") || exit 1
mm=$(stat -L -c '%t:%T' "$dev") || exit 1
xenstore-write "$XENBUS_PATH/physical-device" "$mm" "$XENBUS_PATH/physical-device-path" "$dev" \
	"$XENBUS_PATH/hotplug-status" connected
EOS
	chmod 755 "$SCRATCH/block-phy"
}
# rig_save_helper_bytes: bytes written so far by libxl's save helper (the process that
# writes xl remus's stream: libxc's pages, compressed by default), from /proc/PID/io's
# wchar; 0 when none runs (xen-apache.sh, xen-db-bench.sh).
rig_save_helper_bytes() {
	_sum=0
	for _q in $(ps -o pid,args | awk '/libxl-save-helper --save-domain/ && !/awk/ {print $1}'); do
		_w=$(awk '$1 == "wchar:" {print $2}' "/proc/$_q/io" 2>/dev/null)
		_sum=$((_sum + ${_w:-0}))
	done
	echo "$_sum"
}

# rig_plain FILE: FILE without the colours of the daemons' logs.
rig_plain() { tr -d '\033' <"$1" | sed 's/\[[0-9;]*m//g'; }

# rig_show NAME [N]: the last N (8) lines of $SCRATCH/NAME.log without DEBUG lines,
# indented "NAME| ", for a failed verdict.
rig_show() {
	rig_plain "$SCRATCH/$1.log" 2>/dev/null | grep -v ' DEBUG ' | tail -n "${2:-8}" | cut -c1-400 | sed "s/^/$1| /"
}

# rig_alive PID: yes or no.
rig_alive() { kill -0 "$1" 2>/dev/null && echo yes || echo no; }

# rig_checkpoints: the checkpoints the backup committed so far ($SCRATCH/backup.events).
rig_checkpoints() {
	_c=$(grep -c '"event":"checkpoint"' "$SCRATCH/backup.events" 2>/dev/null)
	echo "${_c:-0}"
}

# rig_wait_checkpoints N [SECS]: wait (up to SECS, default 600) while the backup has
# committed fewer than N checkpoints and the primary ($ppid) lives; 1 if it has fewer.
rig_wait_checkpoints() {
	_i=0
	while [ "$(rig_checkpoints)" -lt "$1" ] && kill -0 $ppid 2>/dev/null && [ $_i -lt "${2:-600}" ]; do
		sleep 1
		_i=$((_i + 1))
	done
	[ "$(rig_checkpoints)" -ge "$1" ]
}

# rig_wait_while SECS CMD...: run CMD once a second while it succeeds, for at most SECS
# tries; 1 if it still succeeded at the end.
rig_wait_while() {
	_n=$1
	shift
	while "$@"; do
		[ "$_n" -le 0 ] && return 1
		sleep 1
		_n=$((_n - 1))
	done
	return 0
}

# rig_refs URL DIR FILE...: fetch each specweb FILE from URL/FILE's path (URL ends in the
# tree's folder) into DIR from the client namespace and check it against the rig's
# manifest; prints the files that are wrong or missing (nothing when all are right).
rig_refs() {
	_url=$1
	_dir=$2
	shift 2
	mkdir -p "$_dir"
	for _f in "$@"; do
		rig_client timeout 120 wget -q -O "$_dir/$_f" "$_url/$_f" 2>/dev/null
		_want=$(awk -v f="specweb/$_f" '$2 == f {print $1}' "$CASTOR_DIR/rig/specweb.manifest")
		_got=$(sha256sum <"$_dir/$_f" | cut -d' ' -f1)
		[ -n "$_want" ] && [ "$_got" = "$_want" ] || printf ' %s' "$_f"
	done
}

# rig_answered: the answers wrk's failover.lua counted so far ($SCRATCH/progress).
rig_answered() { awk -F: '{n += $2} END {print n + 0}' "$SCRATCH/progress" 2>/dev/null || echo 0; }

# rig_wrk_load URL ARG...: wrk (1 thread, $CONNS connections, at most $WRK_SECS s, under
# timeout -s KILL) loads URL from the client namespace with failover.lua, its arguments
# the reference folder $SCRATCH/ref and ARG...; then waits (up to 240 s) until it has had
# $PRE_N answers over at least $PRE s. Sets wpid and tw (when the load began); its output
# goes to $SCRATCH/wrk.out.
rig_wrk_load() {
	_u=$1
	shift
	: >"$SCRATCH/progress"
	tw=$(date +%s)
	rig_client timeout -s KILL $((WRK_SECS + 60)) wrk -t 1 -c "$CONNS" -d "${WRK_SECS}s" --timeout 100s \
		-s "$CASTOR_DIR/rig/failover.lua" "$_u" -- "$SCRATCH/ref" "$@" >"$SCRATCH/wrk.out" 2>&1 &
	wpid=$!
	_i=0
	while [ $_i -lt 240 ] && kill -0 $wpid 2>/dev/null; do
		_t=$(head -n 1 "$SCRATCH/progress" | cut -d: -f1)
		[ -n "$_t" ] && [ "$(rig_answered)" -ge "$PRE_N" ] && [ $(($(date +%s) - _t)) -ge "$PRE" ] && break
		sleep 1
		_i=$((_i + 1))
	done
}

# rig_wait_active: wait (up to 200 s, while the backup, $bpid, lives) for the backup's
# `active` event; sets ta (when the wait ended).
rig_wait_active() {
	_i=0
	while ! grep -q '"event":"active"' "$SCRATCH/backup.events" && kill -0 $bpid 2>/dev/null && [ $_i -lt 200 ]; do
		sleep 1
		_i=$((_i + 1))
	done
	ta=$(date +%s)
}

# rig_wrk_end TK: end the load $POST s after its first answer after TK (the kill; at most
# $POST + 150 s), with SIGINT (wrk still checks and prints everything), and read what
# failover.lua printed: f (its FAILOVER line), series (t:n:m per second with answers:
# the answers and the largest counter of that second), pre_n (answers before TK), pre_s
# (seconds from the first answer to TK), post (answers after TK), first and last (the
# first second with answers after TK, the last at or before it) and seen_max (the largest
# counter received before TK). rig_wrk_val NAME: a field of the FAILOVER line.
rig_wrk_end() {
	_k=$1
	_i=0
	while kill -0 $wpid 2>/dev/null && [ $_i -lt $((POST + 150)) ]; do
		_t=$(awk -F: -v k="$_k" '$1 > k {print $1; exit}' "$SCRATCH/progress")
		[ -n "$_t" ] && [ $(($(date +%s) - _t)) -ge "$POST" ] && break
		sleep 1
		_i=$((_i + 1))
	done
	kill -INT $(pidof wrk) 2>/dev/null
	rig_wait_while 60 kill -0 $wpid 2>/dev/null
	f=$(grep '^FAILOVER ' "$SCRATCH/wrk.out")
	series=$(grep '^SERIES ' "$SCRATCH/wrk.out" | cut -d' ' -f2)
	_s() { echo "$series" | tr ',' '\n' | awk -F: -v k="$_k" "$1"; }
	_p=$(_s '$1 != "" && $1 < k {n += $2; if (!f) f = $1} END {printf "%d %d", n, f ? k - f : 0}')
	pre_n=${_p% *}
	pre_s=${_p#* }
	post=$(_s '$1 > k {n += $2} END {print n + 0}')
	first=$(_s '$1 > k {print $1; exit}')
	last=$(_s '$1 != "" && $1 <= k {l = $1} END {print l + 0}')
	seen_max=$(_s '$1 < k && $3 > m {m = $3} END {print m + 0}')
}
rig_wrk_val() { echo "$f" | tr ' ' '\n' | sed -n "s/^$1=//p"; }

# rig_stop_backup TAG: SIGTERM to the backup ($bpid), waited for up to 30 s; says whether
# it is still alive.
rig_stop_backup() {
	kill -TERM $bpid
	rig_wait_while 30 kill -0 $bpid 2>/dev/null
	echo "$1: backup stopped (alive $(rig_alive $bpid))"
}
