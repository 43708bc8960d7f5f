#!/bin/sh
# The rig's smoke test (busybox sh, runs inside dom0): the domU exists, its counter goes
# on, `xl pause` stops it and `xl unpause` resumes it.
# shellcheck source=lib.sh
. "$RIG_LIB"

# 1. xl list shows the domU.
if xl list "$DOMU" >/dev/null 2>&1; then
	rig_pass xl-list "$DOMU is domain $(rig_domid "$DOMU")"
else
	rig_fail xl-list "xl list does not show $DOMU: $(xl list 2>&1 | tr '\n' ';')"
fi

# 2. The counter advances.
c0=$(rig_counter)
if rig_wait_counter $((c0 + 3)) 30; then
	rig_pass counter-runs "counter $c0 -> $(rig_counter)"
else
	rig_fail counter-runs "counter stuck at $(rig_counter) for 30 s (was $c0)"
fi

# 3. Paused, the console log does not grow; unpaused, the counter goes on.
if xl pause "$DOMU"; then
	sleep 1 # let output already in flight reach the log
	s1=$(wc -c <"$DOMU_CONSOLE_LOG")
	p1=$(rig_counter)
	sleep 2
	s2=$(wc -c <"$DOMU_CONSOLE_LOG")
	p2=$(rig_counter)
	state=$(xl list "$DOMU" | awk 'NR == 2 {print $5}')
	if [ "$s1" = "$s2" ] && [ "$p1" = "$p2" ]; then
		rig_pass pause-stops "counter held at $p2 for 2 s, state $state"
	else
		rig_fail pause-stops "log grew $s1 -> $s2 bytes, counter $p1 -> $p2 while paused"
	fi
	xl unpause "$DOMU" || rig_fail unpause "xl unpause failed"
	if rig_wait_counter $((p2 + 3)) 30; then
		rig_pass unpause-resumes "counter $p2 -> $(rig_counter)"
	else
		rig_fail unpause-resumes "counter stuck at $(rig_counter) for 30 s after unpause"
	fi
else
	rig_fail pause-stops "xl pause $DOMU failed"
fi

# 4. dom0 has a loopback interface (Castor's primary and backup talk over TCP).
if ip addr show lo 2>/dev/null | grep -q 'inet 127\.0\.0\.1'; then
	rig_pass loopback "lo is up with 127.0.0.1"
else
	rig_fail loopback "no 127.0.0.1 on lo: $(ip addr show lo 2>&1 | tr '\n' ' ')"
fi

# 5. The counter is strictly increasing by one, starting at 1.
tr -d '\r' <"$DOMU_CONSOLE_LOG" | grep -o 'counter [0-9]*' | cut -d' ' -f2 >"$SCRATCH/counters"
bad=$(awk 'NR != $1 {print NR ": " $1; exit}' "$SCRATCH/counters")
if [ -z "$bad" ]; then
	rig_pass counter-sequence "$(wc -l <"$SCRATCH/counters") lines, 1..$(tail -n 1 "$SCRATCH/counters")"
else
	rig_fail counter-sequence "line $bad"
fi
