#!/bin/sh
# By hand (not in CI), a diagnosis: the database domU (castor_disk=db) on a plain loop
# device, loaded by a client (inserts and reads of the disk's document tree), while
# `xen-selftest shadow` keeps a copy of its memory from the dirty log alone and names the
# frames that changed behind it (ROUNDS, 30). Verdict xen-shadow. Needs RIG_DOMU_NET=1.
. "$RIG_LIB"
ROUNDS=${ROUNDS:-30}
S=$SCRATCH
URL=http://$DOMU_IP:80
xl destroy "$DOMU"
cp "$CASTOR_DIR/rig/disk.img" $S/d.img
losetup /dev/loop0 $S/d.img || { rig_fail xen-shadow "losetup failed"; exit 0; }
rig_disk_cfg $S/d.cfg /dev/loop0 "castor_ip=$DOMU_IP/24 castor_disk=db"
xl create $S/d.cfg
rig_wait_http "$URL/cgi-bin/rows" 300 || { rig_fail xen-shadow "no http"; exit 0; }
echo "shadow: persistent grants: backend $(xenstore-read /local/domain/0/backend/vbd/$(rig_domid)/51712/feature-persistent 2>&1), frontend $(xenstore-read /local/domain/$(rig_domid)/device/vbd/51712/feature-persistent 2>&1)"
(
	n=0
	while [ $n -lt 400 ]; do
		n=$((n + 1))
		rig_client timeout 20 wget -q -O /dev/null "$URL/cgi-bin/insert" 2>/dev/null
		rig_client timeout 20 wget -q -O /dev/null "$URL/disk/specweb/class$((n % 4))_$((n % 9 + 1))" 2>/dev/null
	done
) &
cpid=$!
sleep 5
timeout 600 xen-selftest shadow "$DOMU" "$ROUNDS"
kill $cpid 2>/dev/null
exit 0
