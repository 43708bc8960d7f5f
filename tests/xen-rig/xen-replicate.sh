#!/bin/sh
# ha-primary protects the rig's running PVH domU (--guest xen --xen-domain) and streams
# its checkpoints to ha-backup in the same dom0 over loopback; every VERIFY-th checkpoint
# carries a digest of the whole guest memory that the backup checks against its committed
# image (digest mode; a mismatch makes the backup exit 3 with a verify_failed event).
#   xen-replicate-digest      >= 2 verified checkpoints, no mismatch, backup stopped cleanly
#   xen-replicate-guest-runs  the domU counted on during and after protection
#   xen-replicate-stand-down  when ha-primary ends (--run-for), the domain goes on and the
#                             backup stands down (exit 0) instead of restoring a second copy
# VERIFY (3), RUN (seconds, 60) and MODE (remus) may be set with --env.
. "$RIG_LIB"
VERIFY=${VERIFY:-3}
RUN=${RUN:-60}
MODE=${MODE:-remus}
S=$SCRATCH
rig_start_pair "$MODE" 100ms --verify-every "$VERIFY" --ack-timeout 300s --run-for "${RUN}s" || {
	rig_fail xen-replicate-digest "xen-selftest size failed"
	exit 0
}
c0=$(rig_counter)
echo "replicate: memory size $MEM, mode $MODE, verify every $VERIFY, run ${RUN}s"
# The primary ends by itself (--run-for) and tells the backup to stand down: the domain
# outlives ha-primary, so a takeover would run it twice.
wait $ppid
prc=$?
i=0
while kill -0 $bpid 2>/dev/null && [ $i -lt 30 ]; do
	sleep 1
	i=$((i + 1))
done
kill -TERM $bpid 2>/dev/null
wait $bpid
brc=$?
c1=$(rig_counter)
echo "replicate: backup exit $brc, primary exit $prc, counter $c0 -> $c1"
grep -a 'behind the dirty log' $S/primary.log | sed 's/^/primary| /'
grep -v ' DEBUG ' $S/primary.log | tail -n 6 | cut -c1-300 | sed 's/^/primary| /'
tail -n 4 $S/backup.log | cut -c1-300 | sed 's/^/backup| /'
cut -d, -f1-4,8,21-23 $S/primary.csv | sed 's/^/primary.csv| /'
cut -d, -f1-6 $S/backup.csv | sed 's/^/backup.csv| /'
cps=$(grep -c '"event":"checkpoint"' $S/backup.events)
vf=$(grep -c 'verify_failed' $S/backup.events)
verified=$((cps / VERIFY))
if [ "$brc" = 0 ] && [ "$vf" = 0 ] && [ "$verified" -ge 2 ]; then
	rig_pass xen-replicate-digest "$cps checkpoints committed, $verified of them verified \
against a digest of the whole guest memory (every $VERIFY), no mismatch; backup exit $brc"
else
	rig_fail xen-replicate-digest "$cps checkpoints, $verified verified, verify_failed \
events $vf, backup exit $brc, primary exit $prc"
fi
stood=$(grep -c '"event":"primary_stood_down"' $S/backup.events)
active=$(grep -c '"event":"active"' $S/backup.events)
if [ "$stood" = 1 ] && [ "$active" = 0 ] && [ "$brc" = 0 ] && [ -n "$(rig_domid)" ]; then
	rig_pass xen-replicate-stand-down "backup exit $brc after $(grep '"event":"primary_stood_down"' $S/backup.events | cut -c1-160); domain $(rig_domid) still runs"
else
	rig_fail xen-replicate-stand-down "stood down $stood, active $active, backup exit $brc, domain '$(rig_domid)'"
fi
if [ "$c1" -gt "$c0" ] && rig_wait_counter $((c1 + 2)) 30; then
	rig_pass xen-replicate-guest-runs "counter $c0 -> $c1 during protection, $(rig_counter) after"
else
	rig_fail xen-replicate-guest-runs "counter $c0 -> $c1 during protection, $(rig_counter) after"
fi
exit 0
