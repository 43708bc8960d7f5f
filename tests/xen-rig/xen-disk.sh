#!/bin/sh
# A protected domU with a disk served by Castor (docs/XEN.md, "A disk"). ha-primary
# serves a 16 MiB image (2 MiB of it random, so the initial sync has blocks to send) over
# NBD to /dev/nbd0 and waits for the domain (--xen-wait); the domU is created with
# phy:/dev/nbd0 as xvda and castor_disk=1 (domu-init's disk loop: a record per 0.3 s,
# each fsynced, the previous one read back from the device). ha-backup keeps the replica
# (empty at start) and serves it to /dev/nbd1 at failover, which its xl config names.
#   xen-disk-protected  >= CPS checkpoints committed, >= 2 verified (memory AND disk
#                       digests: the replica equals the primary's disk), no mismatch, the
#                       initial sync sent only differing blocks, the guest writing
#   xen-disk-failover   the backup restored the domain on its replica: the guest goes on
#                       writing and reading back records with no disk-bad line
# CPS (6), VERIFY (3), MODE (remus) may be set with --env.
. "$RIG_LIB"
CPS=${CPS:-6}
VERIFY=${VERIFY:-3}
MODE=${MODE:-remus}
S=$SCRATCH
log=$DOMU_CONSOLE_LOG
fail_out() {
	rig_fail "$1" "$2"
	grep -v ' DEBUG ' $S/primary.log 2>/dev/null | tail -n 10 | cut -c1-300 | sed 's/^/primary| /'
	grep -v ' DEBUG ' $S/backup.log 2>/dev/null | tail -n 10 | cut -c1-300 | sed 's/^/backup| /'
	tail -n 8 "$log" | sed 's/^/console| /'
	kill -KILL $ppid $bpid 2>/dev/null
	exit 0
}

# The memory size of the rig's domU (the same config but the disk), then the domU goes:
# the one with the disk can start only once /dev/nbd0 is attached.
echo 1 >/proc/sys/vm/overcommit_memory
MEM=$(xen-selftest size "$DOMU") || fail_out xen-disk-protected "xen-selftest size failed"
xl destroy "$DOMU"
rig_disk_cfg $S/primary.cfg /dev/nbd0 castor_disk=1
rig_disk_cfg $S/backup.cfg /dev/nbd1 castor_disk=1
dd if=/dev/zero of=$S/primary.img bs=1M count=0 seek=16 2>/dev/null
dd if=/dev/urandom of=$S/primary.img bs=1M count=2 conv=notrunc 2>/dev/null
dd if=/dev/zero of=$S/backup.img bs=1M count=0 seek=16 2>/dev/null
[ -b /dev/nbd0 ] && [ -b /dev/nbd1 ] || fail_out xen-disk-protected "no /dev/nbd0 or /dev/nbd1 (nbd module)"

ha-backup --listen 127.0.0.1:7700 --memory "$MEM" --guest xen --xen-config $S/backup.cfg \
	--disk $S/backup.img --nbd-device /dev/nbd1 \
	--insecure --mode "$MODE" --interval 200ms --detect-timeout 120s \
	--events $S/backup.events --stats $S/backup.csv 2>$S/backup.log &
bpid=$!
sleep 1
ha-primary --guest xen --xen-domain "$DOMU" --xen-wait 120s --disk $S/primary.img \
	--nbd-device /dev/nbd0 --no-net-buffer --backup 127.0.0.1:7700 --insecure --mode "$MODE" --interval 200ms \
	--ack-timeout 300s --verify-every "$VERIFY" --events $S/primary.events \
	--stats $S/primary.csv >$S/primary.json 2>$S/primary.log &
ppid=$!
i=0
until [ -e /sys/block/nbd0/pid ]; do
	i=$((i + 1))
	[ $i -gt 120 ] || ! kill -0 $ppid 2>/dev/null && fail_out xen-disk-protected "/dev/nbd0 not attached in ${i}s"
	sleep 0.5
done
echo "disk: /dev/nbd0 attached ($(cat /sys/block/nbd0/size) sectors); creating the domU"
lines0=$(wc -l <"$log" 2>/dev/null || echo 0)
if ! xl create $S/primary.cfg; then
	tail -n 30 /var/log/xen/xen-hotplug.log 2>/dev/null | sed 's/^/hotplug| /'
	fail_out xen-disk-protected "xl create with the disk failed"
fi

rig_wait_checkpoints "$CPS"
cps=$(rig_checkpoints)
vf=$(grep -c verify_failed $S/backup.events 2>/dev/null)
vf=${vf:-0}
writes=$(tr -d '\r' <"$log" | grep -c '^disk [0-9]')
bad=$(tr -d '\r' <"$log" | grep -c 'disk-bad\|disk failed')
sync=$(grep -a 'disk sync: sending' $S/primary.log | tail -n 1 | cut -c1-300)
grep -a 'disk sync' $S/primary.log | cut -c1-300 | sed 's/^/primary| /'
if [ "$cps" -lt "$CPS" ] || [ "$vf" != 0 ] || [ "$writes" -lt 3 ] || [ "$bad" != 0 ] || ! kill -0 $bpid 2>/dev/null; then
	fail_out xen-disk-protected "$cps checkpoints (want $CPS), verify_failed $vf, $writes disk records, $bad disk errors"
fi
rig_pass xen-disk-protected "$cps checkpoints committed, $((cps / VERIFY)) verified (memory and disk digests), no mismatch; $writes disk records written by the guest; $sync"

# The primary host dies: the domain destroyed (while ha-primary still serves its disk, so
# blkback's teardown does not wait on a dead server), then ha-primary killed.
xl destroy "$DOMU"
kill -KILL $ppid
lines=$(wc -l <"$log")
last=$(tr -d '\r' <"$log" | grep -o '^disk [0-9]*' | tail -n 1 | cut -d' ' -f2)
echo "disk: primary killed at disk record $last after $(rig_checkpoints) checkpoints"
i=0
while ! grep -q '"event":"active"' $S/backup.events && kill -0 $bpid 2>/dev/null && [ $i -lt 300 ]; do
	sleep 1
	i=$((i + 1))
done
grep -q '"event":"active"' $S/backup.events || fail_out xen-disk-failover "the backup did not go active in ${i}s"
after() { tail -n +"$((lines + 1))" "$log" | tr -d '\r'; }
i=0
while [ "$(after | grep -c '^disk [0-9]')" -lt 5 ] && [ $i -lt 120 ]; do
	sleep 1
	i=$((i + 1))
done
more=$(after | grep -c '^disk [0-9]')
bad=$(after | grep -c 'disk-bad\|disk failed')
first=$(after | grep -o '^disk [0-9]*' | head -n 1 | cut -d' ' -f2)
if [ "$more" -ge 5 ] && [ "$bad" = 0 ]; then
	rig_pass xen-disk-failover "restored on the replica via /dev/nbd1: records $first.. written and read back ($more since), none bad; the dead domain had reached $last"
else
	fail_out xen-disk-failover "$more records after the restore, $bad bad (first $first, the dead domain reached $last)"
fi
after | grep 'disk-bad' | head -n 3 | sed 's/^/console| /'
kill -TERM $bpid
wait $bpid
echo "disk: backup exit $?"
exit 0
