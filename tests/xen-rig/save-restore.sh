#!/bin/sh
# Checks that xl save / xl restore work on the rig's domU and keep its counter, and that a
# domain restored from a checkpoint goes back to the checkpoint's counter (failover's
# semantics). Not in CI (one more boot); run it with:
#   tests/xen-rig/run --payload "$(mktemp -d)" --test tests/xen-rig/save-restore.sh
# shellcheck source=lib.sh
. "$RIG_LIB"
log=$DOMU_CONSOLE_LOG
rig_wait_counter 5 60

# 1. xl save (the domain goes away), xl restore: the counter goes on.
if xl save "$DOMU" "$SCRATCH/a.save"; then
	c=$(rig_counter)
	sleep 2
	c2=$(rig_counter)
	if xl list "$DOMU" >/dev/null 2>&1; then
		rig_fail save-destroys "$DOMU still exists after xl save"
	fi
	if xl restore "$SCRATCH/a.save"; then
		if rig_wait_counter $((c + 5)) 60; then
			rig_pass save-restore "counter $c at save, $c2 2 s later, $(rig_counter) after restore"
		else
			rig_fail save-restore "counter stuck at $(rig_counter) after restore (saved at $c)"
		fi
	else
		rig_fail save-restore "xl restore failed"
	fi
else
	rig_fail save-restore "xl save failed"
fi
rm -f "$SCRATCH/a.save"

# 2. xl save -c (checkpoint, the domain goes on), run on, destroy, restore: back to it.
if xl save -c "$DOMU" "$SCRATCH/b.save"; then
	c=$(rig_counter)
	rig_wait_counter $((c + 10)) 60
	c2=$(rig_counter)
	xl destroy "$DOMU"
	lines=$(wc -l <"$log")
	if xl restore "$SCRATCH/b.save"; then
		rig_wait_counter 1 30 # (the log already holds larger values; just give it time)
		sleep 5
		first=$(tail -n +"$((lines + 1))" "$log" | tr -d '\r' | grep -o 'counter [0-9]*' | head -n 1 | cut -d' ' -f2)
		if [ -n "$first" ] && [ "$first" -le $((c + 2)) ]; then
			rig_pass checkpoint-restore "checkpoint at $c, ran to $c2, the restored domain printed $first first, now $(rig_counter)"
		else
			rig_fail checkpoint-restore "checkpoint at $c, ran to $c2, the restored domain printed '$first' first"
		fi
	else
		rig_fail checkpoint-restore "xl restore failed"
	fi
else
	rig_fail checkpoint-restore "xl save -c failed"
fi
exit 0
