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
