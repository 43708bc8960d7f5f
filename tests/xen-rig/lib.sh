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
