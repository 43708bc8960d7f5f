#!/bin/sh
# A web service with a database on a disk Castor replicates, failing over under load
# (issue 20). The domU's disk is the rig's ext4 image (/castor/rig/disk.img: the document
# tree under www/, the directory db/), served by ha-primary over NBD to /dev/nbd0 and
# named phy:/dev/nbd0 in its xl config; the domU mounts it (castor_disk=db), keeps a
# sqlite3 database on it, and Apache serves /disk/specweb/... from it and the CGIs
# /cgi-bin/insert (a row per request, answering its id once sqlite3 committed it) and
# /cgi-bin/rows. The network output is held (--net-buffer auto on both sides). The
# backup's replica starts as a copy of the image with 1 MiB overwritten (random), so the
# initial sync has exactly those blocks to send; at failover it is served to /dev/nbd1,
# which the backup's xl config names.
#   db-protected   >= CPS checkpoints committed (with VERIFY=N every Nth verified, memory
#                  AND disk digests, none failing); the initial sync sent the 256 differing
#                  blocks (and no more than 64 others, the writes of the boot before the
#                  comparison); the database up. VERIFY is 0 (off) by default: under
#                  traffic dom0's backends write this domU's memory during nearly every
#                  hold, which puts a digest off (docs/XEN.md, "A disk")
#   db-disk-tree   a file of each size class read from the replicated disk
#                  (/disk/specweb/) has the manifest's sha256 (also wrk's reference)
#   db-restored    the backup went active on its replica (/dev/nbd1) with the network
#                  buffer on the restored domain's vif
#   db-client      wrk (failover.lua with /cgi-bin/insert as its dynamic page, a share
#                  DYN of the requests, the rest static files) across the failover: 0 socket errors and timeouts, 0 non-200
#                  answers, every static body right, no row id received twice (the
#                  database never went back past a row a client saw), answers before the
#                  kill and after the restore
#   db-rows        the restored guest's database: PRAGMA integrity_check is "ok" and every
#                  row id a client received is in it
# MODE (fgbi), IV (200ms), CPS (6), VERIFY (0), CONNS (6), DYN (1: every request an insert;
# below 1 the static answers are checked against the 4 files fetched only), PRE_N (20 answers
# over at least PRE 10 s before the kill), POST (30 s of answers after it), WRK_SECS
# (400: wrk's upper bound) and PRIMARY_OPTS (more ha-primary options) may be set with --env. Needs --env RIG_DOMU_NET=1.
# Every wait is bounded in tries, every load in time (wrk -d, under timeout -s KILL).
. "$RIG_LIB"
if [ "${RIG_DOMU_NET:-0}" != 1 ]; then
	rig_fail db-protected "the domU was started without its network: run the rig with --env RIG_DOMU_NET=1"
	exit 0
fi
MODE=${MODE:-fgbi}
IV=${IV:-200ms}
CPS=${CPS:-6}
VERIFY=${VERIFY:-0}
CONNS=${CONNS:-6}
DYN=${DYN:-1}
PRE=${PRE:-10}
PRE_N=${PRE_N:-20}
POST=${POST:-30}
WRK_SECS=${WRK_SECS:-400}
S=$SCRATCH
URL=http://$DOMU_IP:80
MAC=00:16:3e:ca:57:02
log=$DOMU_CONSOLE_LOG
fail_out() {
	rig_fail "$1" "$2"
	rig_show primary 10
	rig_show backup 10
	rig_plain "$S/backup.log" | grep -a -i -e mismatch -e verif -e error | grep -v ' DEBUG ' | head -n 8 | cut -c1-500 | sed 's/^/backup| /'
	grep -a -v '"event":"checkpoint"' "$S/backup.events" | tail -n 6 | cut -c1-300 | sed 's/^/backup-events| /'
	tr -d '\r' <"$log" | grep 'castor-domu' | tail -n 8 | sed 's/^/console| /'
	kill -KILL $ppid $bpid 2>/dev/null
	exit 0
}

# The memory size of the rig's domU, then that domU goes: the one with the disk can start
# only once /dev/nbd0 is attached. Its config: the rig's, with the disk and castor_disk=db.
echo 1 >/proc/sys/vm/overcommit_memory
MEM=$(xen-selftest size "$DOMU") || fail_out db-protected "xen-selftest size failed"
xl destroy "$DOMU"
rig_disk_cfg $S/primary.cfg /dev/nbd0 "castor_ip=$DOMU_IP/24 castor_disk=db"
rig_disk_cfg $S/backup.cfg /dev/nbd1 "castor_ip=$DOMU_IP/24 castor_disk=db"
cp "$CASTOR_DIR/rig/disk.img" $S/primary.img
cp "$CASTOR_DIR/rig/disk.img" $S/backup.img
dd if=/dev/urandom of=$S/backup.img bs=4096 seek=1024 count=256 conv=notrunc 2>/dev/null
[ -b /dev/nbd0 ] && [ -b /dev/nbd1 ] || fail_out db-protected "no /dev/nbd0 or /dev/nbd1 (nbd module)"

ha-backup --listen 127.0.0.1:7700 --memory "$MEM" --guest xen --xen-config $S/backup.cfg \
	--disk $S/backup.img --nbd-device /dev/nbd1 \
	--net-buffer auto --announce-bridge "$RIG_BRIDGE" --announce-ip "$DOMU_IP" --announce-mac "$MAC" \
	--insecure --mode "$MODE" --interval "$IV" --detect-timeout 120s \
	--events $S/backup.events --stats $S/backup.csv 2>$S/backup.log &
bpid=$!
sleep 1
ha-primary --guest xen --xen-domain "$DOMU" --xen-wait 180s --disk $S/primary.img \
	--nbd-device /dev/nbd0 --net-buffer auto --backup 127.0.0.1:7700 --insecure \
	--mode "$MODE" --interval "$IV" --ack-timeout 300s --verify-every "$VERIFY" \
	--events $S/primary.events --stats $S/primary.csv ${PRIMARY_OPTS:-} >$S/primary.json 2>$S/primary.log &
ppid=$!
i=0
until [ -e /sys/block/nbd0/pid ]; do
	i=$((i + 1))
	[ $i -gt 120 ] || ! kill -0 $ppid 2>/dev/null && fail_out db-protected "/dev/nbd0 not attached in ${i}s"
	sleep 0.5
done
t0=$(date +%s)
xl create $S/primary.cfg || fail_out db-protected "xl create with the disk failed"
domid=$(rig_domid)
echo "db: /dev/nbd0 attached; domU $domid created on it"

# Protected: checkpoints, the database up, the web server answering.
i=0
while { [ "$(rig_checkpoints)" -lt "$CPS" ] || ! grep -q 'castor-domu: database up' "$log"; } &&
	kill -0 $ppid 2>/dev/null && kill -0 $bpid 2>/dev/null && [ $i -lt 400 ]; do
	sleep 1
	i=$((i + 1))
	[ $((i % 30)) = 0 ] && echo "db: ${i}s: $(rig_checkpoints) checkpoints; $(tr -d '\r' <"$log" | grep 'castor-domu' | tail -n 1)"
done
# (each answer waits for its checkpoint's ack, seconds apart under TCG: 60 s a try)
i=0
until rig_client timeout 60 wget -q -O /dev/null "$URL/cgi-bin/rows" 2>/dev/null; do
	i=$((i + 1))
	[ $i -ge 6 ] && fail_out db-protected "no answer from $URL/cgi-bin/rows in 6 tries of 60 s"
	sleep 1
done
tp=$(date +%s)
cps=$(rig_checkpoints)
vf=$(grep -c verify_failed $S/backup.events 2>/dev/null)
vf=${vf:-0}
sync=$(grep -a '"event":"disk_synced"' $S/primary.events | head -n 1)
blocks=$(echo "$sync" | grep -o '"blocks":[0-9]*' | cut -d: -f2)
up=$(tr -d '\r' <"$log" | grep -o 'castor-domu: database up.*' | head -n 1)
ifb=$(ls /sys/class/net | grep -e "^ifb-" | head -n 1)
if [ "$cps" -ge "$CPS" ] && [ "$vf" = 0 ] && [ -n "$blocks" ] && [ "$blocks" -ge 256 ] &&
	[ "$blocks" -le 320 ] && [ -n "$up" ] && [ -n "$ifb" ] && kill -0 $bpid 2>/dev/null; then
	verified="not verified (VERIFY=0)"
	[ "$VERIFY" -gt 0 ] && verified="$((cps / VERIFY)) verified (memory and disk digests), no mismatch"
	rig_pass db-protected "$cps checkpoints committed ($MODE, $IV), $verified; the initial sync sent $blocks blocks of 4096 (the replica differed in 256); ${up#castor-domu: }; buffer $ifb; answering $((tp - t0)) s after xl create"
else
	fail_out db-protected "$cps checkpoints (want $CPS), verify_failed $vf, disk sync '${sync:-none}', '${up:-no database}', IFB '$ifb', backup alive $(rig_alive $bpid)"
fi

# The document tree from the replicated disk: a file of each size class (each answer
# waits for its checkpoint's ack).
wrong=$(rig_refs "$URL/disk/specweb" "$S/ref" class0_5 class1_5 class2_5 class3_5)
if [ -z "$wrong" ]; then
	rig_pass db-disk-tree "4 files of the 4 size classes, $(cat $S/ref/* | wc -c) bytes read from the disk, with the manifest's sha256 ($(($(date +%s) - tp)) s)"
else
	fail_out db-disk-tree "wrong or missing:$wrong"
fi

# Load: wrk with inserts; the primary side dies once the client has had PRE_N answers
# over at least PRE s. Dying: ha-primary frozen, the domU paused (nothing more leaves
# it), the buffer's IFB deleted (the held packets die with the host), ha-primary killed
# (its NBD server with it: /dev/nbd0 fails what is pending, so blkback can let go), the
# domU destroyed.
rig_wrk_load "$URL" "$DYN" 99 "$S/progress" /cgi-bin/insert
cps_before=$(rig_checkpoints)
# (The backup is frozen meanwhile: it would see the link close at once and restore the
# domain while the dead one, still being destroyed, holds its name in this one dom0; on
# two hosts there is no such race. It is thawed once the domain is gone.)
kill -STOP $bpid
kill -STOP $ppid
xl pause "$DOMU"
ifb=$(ls /sys/class/net | grep -e "^ifb-" | head -n 1)
[ -n "$ifb" ] && { /sbin/ip link del "$ifb" || echo "db: cannot delete $ifb"; }
kill -KILL $ppid
timeout 120 xl destroy "$DOMU" || echo "db: xl destroy failed"
kill -CONT $bpid
tk=$(date +%s)
echo "db: primary killed and domU destroyed at $tk ($((tk - tw)) s into the load, $(rig_answered) answers, $cps_before checkpoints committed)"

rig_wait_active
newid=$(rig_domid)
nb=$(rig_plain $S/backup.log | grep -a "network buffer on the restored guest's vif" | grep -o 'vif=[^ ]*' | tr -d '"' | head -n 1)
if grep -q '"event":"active"' $S/backup.events && [ -n "$newid" ] && [ "$nb" = "vif=vif$newid.0" ] &&
	[ "$(cat /sys/block/nbd1/size 2>/dev/null || echo 0)" -gt 0 ]; then
	rig_pass db-restored "active $((ta - tk)) s after the kill on the replica (/dev/nbd1, $(($(cat /sys/block/nbd1/size) / 2048)) MiB); domain $domid -> $newid, buffer on $nb"
else
	rig_fail db-restored "active: $(grep -c '"event":"active"' $S/backup.events) after $((ta - tk)) s; new domain '$newid', buffer on '$nb', nbd1 $(cat /sys/block/nbd1/size 2>/dev/null) sectors; backup alive $(rig_alive $bpid)"
	rig_show backup 12
fi

# The client: POST s after its first answer after the kill (bounded), wrk is ended.
rig_wrk_end "$tk"
grep -v -e '^SERIES' -e '^SEEN' "$S/wrk.out" | tail -n 12 | sed 's/^/wrk| /'
grep '^SEEN ' "$S/wrk.out" | cut -d' ' -f2 | tr ',' '\n' | grep -x '[0-9][0-9]*' >"$S/seen"
errs=$(rig_wrk_val errors)
if [ -n "$f" ] && [ "$errs" = 0/0/0/0/0 ] && [ "$(rig_wrk_val bad_status)" = 0 ] && [ "$(rig_wrk_val bad_body)" = 0 ] &&
	[ "$(rig_wrk_val dup)" = 0 ] && [ "$(rig_wrk_val refs)" = 4 ] && [ "$pre_n" -gt 0 ] && [ "$post" -gt 0 ] &&
	[ "$(rig_wrk_val counter_max)" -gt "$seen_max" ]; then
	rig_pass db-client "$(rig_wrk_val responses) answers ($(rig_wrk_val static) static, all equal to the reference; $(rig_wrk_val dynamic) inserts, row ids $(rig_wrk_val counter_first)..$(rig_wrk_val counter_max), none received twice), $pre_n before the kill and $post after it (the first $((first - tk)) s after it); errors connect/read/write/status/timeout $errs; the largest id received before the kill was $seen_max"
else
	rig_fail db-client "${f:-no FAILOVER line from wrk}; $pre_n answers before the kill, $post after; largest id received before it $seen_max"
	tail -n 20 "$S/wrk.out" | grep -v '^SEEN' | cut -c1-400 | sed 's/^/wrk| /'
fi

# The database on the restored guest: sound, and holding every row a client was told of.
rig_client timeout 120 wget -q -O "$S/rows" "$URL/cgi-bin/rows" 2>/dev/null
integrity=$(sed -n 's/^integrity //p' "$S/rows")
rows=$(sed -n 's/^rows //p' "$S/rows")
sed -n 's/^ids //p' "$S/rows" | tr ' ' '\n' | grep -x '[0-9][0-9]*' >"$S/ids"
missing=$(sort -n "$S/seen" | awk 'NR == FNR {have[$1] = 1; next} !($1 in have) {printf "%s ", $1}' "$S/ids" -)
nseen=$(wc -l <"$S/seen")
if [ "$integrity" = ok ] && [ -n "$rows" ] && [ "$nseen" -gt 0 ] && [ -z "$missing" ]; then
	rig_pass db-rows "integrity_check ok; rows (count, largest id) $rows; all $nseen row ids the client received are in it"
else
	rig_fail db-rows "integrity '$integrity'; rows '$rows'; $nseen ids received, missing from the database: '${missing:-none}'"
	head -c 600 "$S/rows" | sed 's/^/rows| /'
fi
rig_stop_backup db
exit 0
