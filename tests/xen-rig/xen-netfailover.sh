#!/bin/sh
# Failover under load with the guest's network output held (issue 16, items 3 and 6).
# ha-primary protects the networked domU with a network buffer on its vif (--net-buffer
# vifD.0: an IFB with a plug qdisc, released at each checkpoint's ack), ha-backup waits in
# the same dom0 with --net-buffer auto (the restored domain's own vif, vifN.0 with its new
# domain id) and the gratuitous ARP on the bridge. wrk in the client namespace loads the
# domU's Apache; the primary side dies as in xen-failover.sh (ha-primary frozen, the domU
# destroyed, ha-primary killed: one dom0 cannot hold two domains with the same MAC on one
# bridge); the backup restores the last committed checkpoint and the client goes on.
#   netbuf-modules        ifb, sch_plug, sch_ingress, act_mirred and cls_u32 are loaded
#   netbuf-bad-input      before any checkpoint, each start stops with an error naming
#                         what is missing: a vif that does not exist or none given for
#                         the guest's vif (ha-primary), the
#                         plug qdisc unloaded (ha-primary and ha-backup), a bridge that
#                         does not exist (ha-backup); nothing is left on the vif
#   netfailover-refs      the 36 files of the document tree, fetched, have the manifest's
#                         sha256 (they are the reference wrk compares every body with)
#   netfailover-protected the pair runs with the buffer on the vif (its IFB exists), and
#                         CPS checkpoints are committed
#   netbuf-held           an answer reaches the client while the backup acknowledges; with
#                         the backup frozen (SIGSTOP) the next one does not arrive for
#                         FREEZE s (at least twice the first one's time, up to 45 s),
#                         and arrives once the backup runs again
#   netfailover-restored  the backup went active; the restored domain's vif (a new name)
#                         got a buffer before the guest ran, and the guest was announced
#   netfailover-client    wrk (failover.lua) across the failover: 0 socket errors, 0
#                         timeouts, 0 non-200 answers, every static body equal to the
#                         reference, no counter value seen twice (the counter never went
#                         back past a value the client saw), answers before the kill and
#                         after the restore
#   netfailover-recovery  (measured, not judged) the gap in answers and the time until the
#                         answer rate is back to half of the protected rate before the kill
# MODE (remus), IV (200ms), CPS (2), CONNS (8), DYN (0.2), PRE_N and PRE (20 answers over
# at least 10 s before the kill), POST (30: s of answers after it), WRK_SECS (400: wrk's
# upper bound), FREEZE (6) may be set with --env. Needs --env RIG_DOMU_NET=1.
# Every wait is bounded in tries, every load in time (wrk -d, under timeout -s KILL).
. "$RIG_LIB"
if [ "${RIG_DOMU_NET:-0}" != 1 ]; then
	rig_fail netbuf-modules "the domU was started without its network: run the rig with --env RIG_DOMU_NET=1"
	exit 0
fi
MODE=${MODE:-remus}
IV=${IV:-200ms}
CPS=${CPS:-2}
CONNS=${CONNS:-8}
DYN=${DYN:-0.2}
PRE=${PRE:-10}
PRE_N=${PRE_N:-20}
POST=${POST:-30}
WRK_SECS=${WRK_SECS:-400}
FREEZE=${FREEZE:-6}
S=$SCRATCH
URL=http://$DOMU_IP:80
MAC=00:16:3e:ca:57:02
domid=$(rig_domid)
vif=vif$domid.0

# 1. The modules.
miss=""
for m in ifb sch_plug sch_ingress act_mirred cls_u32; do
	[ -d "/sys/module/$m" ] || miss="$miss $m"
done
if [ -z "$miss" ]; then
	rig_pass netbuf-modules "ifb sch_plug sch_ingress act_mirred cls_u32 loaded; the domU's vif is $vif"
else
	rig_fail netbuf-modules "not loaded:$miss"
fi

# 2. Bad input: each start must stop with an error naming what is missing, before any
# checkpoint (no backup listens on 7799: a start that got past its checks would try it).
echo 1 >/proc/sys/vm/overcommit_memory
MEM=$(xen-selftest size "$DOMU")
# refused NAME WANT CMD...: run CMD (bounded), which must exit non-zero with WANT in its
# output; appends to $bad what went wrong.
bad=""
badn=0
refused() {
	_name=$1
	_want=$2
	shift 2
	timeout -s KILL 60 "$@" >"$S/bad-$_name.out" 2>&1
	_st=$?
	badn=$((badn + 1))
	if [ "$_st" = 0 ] || [ "$_st" = 137 ] || ! grep -q -- "$_want" "$S/bad-$_name.out"; then
		bad="$bad $_name(exit $_st)"
		tail -n 3 "$S/bad-$_name.out" | cut -c1-300 | sed "s/^/$_name| /"
	else
		echo "bad-input $_name: $(rig_plain "$S/bad-$_name.out" | grep -m 1 -o -- "[^ ]*$_want.*" | cut -c1-240)"
	fi
}
# (split at spaces: none of the values has one)
prim="ha-primary --guest xen --xen-domain $DOMU --backup 127.0.0.1:7799 --insecure"
back="ha-backup --listen 127.0.0.1:7799 --memory $MEM --guest xen --xen-config $DOMU_CFG --insecure"
refused primary-no-vif "interface vif99.0 does not exist" $prim --net-buffer vif99.0
refused primary-no-buffer "but no --net-buffer" $prim
refused backup-no-bridge "interface xenbr9 does not exist" $back --net-buffer auto \
	--announce-bridge xenbr9 --announce-ip "$DOMU_IP" --announce-mac "$MAC"
if rmmod sch_plug; then
	refused primary-no-plug "load the sch_plug module" $prim --net-buffer "$vif"
	refused backup-no-plug "load the sch_plug module" $back --net-buffer auto
	insmod /modules/sch_plug.ko || bad="$bad insmod-sch_plug"
else
	bad="$bad rmmod-sch_plug"
fi
left=$(ls /sys/class/net | grep -e '^ifb-' -e '^ifbprobe' | tr '\n' ' ')
if [ -z "$bad" ] && [ -z "$left" ]; then
	rig_pass netbuf-bad-input "$badn starts refused with the missing piece named (vif99.0, no --net-buffer for a guest with a vif, xenbr9, sch_plug for both daemons); no IFB left"
else
	rig_fail netbuf-bad-input "wrong:$bad; IFBs left: '$left'"
fi

# 3. The reference bodies: every file of the tree, checked against the manifest.
if ! rig_wait_http "$URL/specweb/class0_1" 90; then
	rig_fail netfailover-refs "no answer from $URL in 90 s"
	grep 'castor-domu:' "$DOMU_CONSOLE_LOG" | sed 's/^/domu-console| /'
	exit 0
fi
wrong=$(rig_refs "$URL/specweb" "$S/ref" $(for c in 0 1 2 3; do for i in 1 2 3 4 5 6 7 8 9; do echo class${c}_$i; done; done))
if [ -z "$wrong" ]; then
	rig_pass netfailover-refs "36 files, $(cat $S/ref/* | wc -c) bytes, with the manifest's sha256"
else
	rig_fail netfailover-refs "wrong or missing:$wrong"
	exit 0
fi

# 4. The pair, with the buffer on the vif (primary) and on the restored domain's (backup).
RIG_BACKUP_OPTS="--net-buffer auto --announce-bridge $RIG_BRIDGE --announce-ip $DOMU_IP --announce-mac $MAC"
rig_start_pair "$MODE" "$IV" --net-buffer "$vif" --pipeline 1 --ack-timeout 300s || {
	rig_fail netfailover-protected "xen-selftest size failed"
	exit 0
}
i=0
while [ "$(rig_checkpoints)" -lt "$CPS" ] && kill -0 $ppid 2>/dev/null && [ $i -lt 400 ]; do
	sleep 1
	i=$((i + 1))
done
ifb=$(ls /sys/class/net | grep -e "^ifb-" | head -n 1)
if [ "$(rig_checkpoints)" -ge "$CPS" ] && [ -n "$ifb" ]; then
	rig_pass netfailover-protected "$(rig_checkpoints) checkpoints committed ($MODE, $IV, --pipeline 1) in ${i}s; buffer $ifb on $vif"
else
	rig_fail netfailover-protected "$(rig_checkpoints) checkpoints committed in ${i}s (want $CPS); IFBs '$ifb'; primary alive $(rig_alive $ppid), backup alive $(rig_alive $bpid)"
	rig_show primary
	rig_show backup
	kill -KILL $ppid $bpid 2>/dev/null
	exit 0
fi

# 5. Held until the ack: one answer with the backup acknowledging, then one with the
# backup frozen (it must not arrive), then the backup thawed (it must arrive).
get_at() { # get_at FILE [SECS]: fetch the counter (for up to SECS, 90), then write the clock (s) into FILE
	rig_client timeout "${2:-90}" wget -q -O "$1.body" "$URL/cgi-bin/counter" 2>/dev/null && date +%s >"$1"
}
t0=$(date +%s)
get_at "$S/held0"
t1=$(cat "$S/held0" 2>/dev/null)
# Frozen for longer than an answer took with acks (a checkpoint's round), so that an
# answer let out without its ack would arrive before the thaw.
if [ -n "$t1" ] && [ $((2 * (t1 - t0) + 4)) -gt "$FREEZE" ]; then
	FREEZE=$((2 * (t1 - t0) + 4))
	[ "$FREEZE" -gt 45 ] && FREEZE=45
fi
kill -STOP $bpid
tf=$(date +%s)
# The fetch outlives the freeze by 120 s: its SYN's retransmissions back off (the next
# one may come ~30 s after the thaw), then the SYN-ACK and the answer each wait for an
# ack, seconds apart under TCG.
get_at "$S/held1" $((FREEZE + 120)) &
gpid=$!
sleep "$FREEZE"
early=$(cat "$S/held1" 2>/dev/null)
kill -CONT $bpid
tc=$(date +%s)
i=0
while kill -0 $gpid 2>/dev/null && [ $i -lt 130 ]; do
	sleep 1
	i=$((i + 1))
done
t2=$(cat "$S/held1" 2>/dev/null)
if [ -n "$t1" ] && [ -z "$early" ] && [ -n "$t2" ]; then
	rig_pass netbuf-held "with acks: '$(cat $S/held0.body)' in $((t1 - t0)) s; backup frozen: nothing in ${FREEZE} s, '$(cat $S/held1.body)' $((t2 - tc)) s after it was thawed ($((t2 - tf)) s after the request)"
else
	rig_fail netbuf-held "with acks: answer at '${t1:-none}' (asked at $t0); backup frozen at $tf: answer at '${early:-none}' before the thaw at $tc, '${t2:-none}' after"
fi

# 6. Load, then the primary side dies once the client has had PRE_N answers over at
# least PRE s (under TCG a protected epoch takes seconds: the first answers come a few
# epochs in). wrk's -d is only an upper bound: it is ended with SIGINT (it still checks
# and prints everything) POST s after its first answer after the kill.
lines=$(wc -l <"$DOMU_CONSOLE_LOG")
rig_wrk_load "$URL" "$DYN" 99 "$S/progress"
cps_before=$(rig_checkpoints)
# The primary host dies with what its kernel held: the packets in the plug go with it.
# (Here they must be dropped by hand: netback maps the guest's packets, and a domain whose
# packets are still held cannot be destroyed: libxl gives up on its vif after 10 s.)
kill -STOP $ppid
/sbin/ip link del "$ifb" || echo "netfailover: cannot delete $ifb"
xl destroy "$DOMU"
kill -KILL $ppid
tk=$(date +%s)
echo "netfailover: primary killed and domU destroyed at $tk ($((tk - tw)) s into the load, $(rig_answered) answers, $cps_before checkpoints committed)"

rig_wait_active
newid=$(rig_domid)
rig_show backup 10
nb=$(rig_plain $S/backup.log | grep -a "network buffer on the restored guest's vif" | grep -o 'vif=[^ ]*' | tr -d '"' | head -n 1)
nerr=$(grep -a -c -e "cannot put the network buffer" -e "cannot announce" -e "net-buffer auto:" $S/backup.log)
if grep -q '"event":"active"' $S/backup.events && [ -n "$newid" ] && [ "$nb" = "vif=vif$newid.0" ] && [ "$nerr" = 0 ]; then
	rig_pass netfailover-restored "active $((ta - tk)) s after the kill; domain $domid -> $newid, buffer put on $nb before it ran, announced on $RIG_BRIDGE"
else
	rig_fail netfailover-restored "active: $(grep -c '"event":"active"' $S/backup.events) after $((ta - tk)) s; new domain '$newid', buffer on '$nb', $nerr network errors; backup alive $(rig_alive $bpid)"
fi

# 7. The client's view: POST s after its first answer after the kill (bounded), wrk is
# ended.
rig_wrk_end "$tk"
grep -v '^SERIES' "$S/wrk.out" | tail -n 12 | sed 's/^/wrk| /'
echo "netfailover: kill at $tk, active at $ta; answers per second: $series"
errs=$(rig_wrk_val errors)
if [ -n "$f" ] && [ "$errs" = 0/0/0/0/0 ] && [ "$(rig_wrk_val bad_status)" = 0 ] && [ "$(rig_wrk_val bad_body)" = 0 ] &&
	[ "$(rig_wrk_val dup)" = 0 ] && [ "$(rig_wrk_val refs)" = 36 ] && [ "${pre_n:-0}" -gt 0 ] && [ "${post:-0}" -gt 0 ] &&
	[ "$(rig_wrk_val counter_max)" -gt "$seen_max" ]; then
	rig_pass netfailover-client "$(rig_wrk_val responses) answers ($(rig_wrk_val static) static, all equal to the reference; $(rig_wrk_val dynamic) counters from $(rig_wrk_val counter_first) to $(rig_wrk_val counter_max), none seen twice, $(rig_wrk_val behind) behind a larger one), $pre_n before the kill and $post after it; errors connect/read/write/status/timeout $errs; the largest counter seen before the kill was $seen_max"
else
	rig_fail netfailover-client "${f:-no FAILOVER line from wrk}; $pre_n answers before the kill, $post after; largest counter seen before it $seen_max"
	tail -n 20 "$S/wrk.out" | sed 's/^/wrk| /'
fi
# Recovery: the first second after the kill from which 3 s hold at least half the
# protected rate (answers per second from the first answer to the kill).
rec=$(echo "$series" | tr ',' '\n' | awk -F: -v k="$tk" -v n="${pre_n:-0}" -v s="${pre_s:-1}" '
	$1 != "" { c[$1] = $2; if ($1 > e) e = $1 }
	END {
		r = (s > 0) ? n / s : 0
		for (t = k + 1; t <= e - 2; t++)
			if (c[t] + c[t + 1] + c[t + 2] >= 1.5 * r && c[t] > 0) { print t; exit }
	}')
rate=$(awk -v n="${pre_n:-0}" -v s="${pre_s:-1}" 'BEGIN {printf "%.1f", (s > 0) ? n / s : 0}')
if [ -n "$first" ] && [ -n "$rec" ]; then
	rig_pass netfailover-recovery "protected rate $rate answers/s; kill at 0 s, backup active at $((ta - tk)) s, first answer after the kill at $((first - tk)) s, rate back to half at $((rec - tk)) s (last answer before the kill at $((last - tk)) s)"
else
	rig_fail netfailover-recovery "protected rate $rate answers/s; first answer after the kill at '${first:+$((first - tk))}' s; the rate did not come back to half within the load"
fi
c=$(tail -n +"$((lines + 1))" "$DOMU_CONSOLE_LOG" | tr -d '\r' | grep -c 'counter [0-9]')
echo "netfailover: the guest printed $c console counters since the load started; now at $(rig_counter)"
rig_stop_backup netfailover
exit 0
