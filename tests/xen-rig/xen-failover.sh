#!/bin/sh
# Replication and failover of the rig's PVH domU. ha-primary protects it with checkpoints
# of a suspended guest (--xen-hold suspend, the default) and streams them to ha-backup in
# the same dom0 over loopback; every VERIFY-th checkpoint carries a digest of the whole
# guest memory, which the backup checks against its committed image (a mismatch makes it
# exit 3). Then the primary host "dies": ha-primary is frozen, the domU destroyed and
# ha-primary killed. The backup must build a new domain from its last committed
# checkpoint (an xl save file handed to xl restore), and the Linux guest must go on from
# the checkpoint's counter.
#   xen-failover-protected  >= CPS checkpoints committed, >= 2 of them verified, no
#                           mismatch, the domU counting on meanwhile
#   xen-failover-restored   the backup went active: xl restore built the domain
#   xen-failover-continues  the new domain's first counter is after the one seen before
#                           the last CPS/2 commits and at most one past the last one the
#                           dead domain printed, and it counts on from there
# CPS (9), VERIFY (3) and MODE (remus) may be set with --env.
. "$RIG_LIB"
CPS=${CPS:-9}
VERIFY=${VERIFY:-3}
MODE=${MODE:-remus}
S=$SCRATCH
log=$DOMU_CONSOLE_LOG
rig_start_pair "$MODE" 200ms --ack-timeout 300s --verify-every "$VERIFY" || {
	rig_fail xen-failover-protected "xen-selftest size failed"
	exit 0
}
c0=$(rig_counter)
echo "failover: memory size $MEM, mode $MODE"

# Protected: wait (bounded) for CPS/2 checkpoints, note the counter, then CPS in all.
rig_wait_checkpoints $((CPS / 2))
lo=$(rig_counter)
rig_wait_checkpoints "$CPS"
grep -a 'behind the dirty log' $S/primary.log | sed 's/^/primary| /'
cps=$(rig_checkpoints)
vf=$(cat $S/backup.events 2>/dev/null | grep -c verify_failed)
if [ "$cps" -lt "$CPS" ] || [ "$vf" != 0 ] || ! kill -0 $bpid 2>/dev/null; then
	rig_fail xen-failover-protected "$cps checkpoints committed (want $CPS), verify_failed events $vf; primary alive: $(rig_alive $ppid), backup alive: $(rig_alive $bpid)"
	grep -v ' DEBUG ' $S/primary.log | tail -n 8 | cut -c1-300 | sed 's/^/primary| /'
	tail -n 8 $S/backup.log | cut -c1-300 | sed 's/^/backup| /'
	kill -KILL $ppid $bpid 2>/dev/null
	exit 0
fi
c1=$(rig_counter)
rig_pass xen-failover-protected "$cps checkpoints committed, $((cps / VERIFY)) of them verified against a digest of the whole guest memory (every $VERIFY), no mismatch; counter $c0 -> $c1 meanwhile"
cut -d, -f1-6 $S/primary.csv | tail -n 5 | sed 's/^/primary.csv| /'

# The primary host dies: freeze ha-primary (it cannot resume or release anything), destroy
# the domain, kill ha-primary. The backup sees the connection drop.
kill -STOP $ppid
xl destroy "$DOMU"
kill -KILL $ppid
sleep 1
dead=$(rig_counter)
lines=$(wc -l <"$log")
echo "failover: primary killed, domU destroyed at counter $dead (after $(rig_checkpoints) checkpoints)"

i=0
while ! grep -q '"event":"active"' $S/backup.events && kill -0 $bpid 2>/dev/null && [ $i -lt 300 ]; do
	sleep 1
	i=$((i + 1))
done
grep -v ' DEBUG ' $S/backup.log | tail -n 8 | cut -c1-400 | sed 's/^/backup| /'
if grep -q '"event":"active"' $S/backup.events; then
	rig_pass xen-failover-restored "$(grep '"event":"active"' $S/backup.events | cut -c1-200); domain $(rig_domid)"
else
	rig_fail xen-failover-restored "the backup did not go active in ${i}s (alive: $(rig_alive $bpid))"
	exit 0
fi

# The restored guest prints again: its first counter, then it counts on.
first=
i=0
while [ -z "$first" ] && [ $i -lt 120 ]; do
	sleep 1
	i=$((i + 1))
	first=$(tail -n +"$((lines + 1))" "$log" | tr -d '\r' | grep -o 'counter [0-9]*' | head -n 1 | cut -d' ' -f2)
done
if [ -z "$first" ]; then
	rig_fail xen-failover-continues "the restored domain printed no counter in ${i}s"
	tail -n +"$((lines + 1))" "$log" | tail -n 10 | sed 's/^/console| /'
	xl list
	exit 0
fi
more=$(tail -n +"$((lines + 1))" "$log" | tr -d '\r' | grep -o 'counter [0-9]*' | wc -l)
i=0
while [ "$more" -lt 5 ] && [ $i -lt 60 ]; do
	sleep 1
	i=$((i + 1))
	more=$(tail -n +"$((lines + 1))" "$log" | tr -d '\r' | grep -o 'counter [0-9]*' | wc -l)
done
now=$(rig_counter)
if [ "$first" -gt "$lo" ] && [ "$first" -le $((dead + 1)) ] && [ "$more" -ge 5 ] && [ "$now" -ge $((first + 4)) ]; then
	rig_pass xen-failover-continues "counter $lo at an earlier commit, $dead when the domain died; the restored domain printed $first first and counted on to $now"
else
	rig_fail xen-failover-continues "counter $lo at an earlier commit, $dead when the domain died; the restored domain printed $first first, $more counters since, now $now"
fi
tail -n +"$((lines + 1))" "$log" | tr -d '\r' | head -n 4 | sed 's/^/console| /'
kill -TERM $bpid
wait $bpid
echo "failover: backup exit $?"
exit 0
