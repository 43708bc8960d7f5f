#!/bin/sh
# By hand (not in CI): the database workload of xen-db.sh (Apache, /cgi-bin/insert writing
# a sqlite3 row per request on the domU's disk, SPECweb99's static classes) measured once
# per row of ROWS, each row a fresh domU on a fresh copy of the rig's disk image:
#   none           unprotected: the image on a loop device (/dev/loopK)
#   castor-MODE    ha-primary --mode MODE serving the image over NBD (/dev/nbd2K), its
#                  backup's replica a copy of the image (/dev/nbd2K+1 at failover), no
#                  network buffer (as xen-apache.sh's rows, to compare protection alone);
#                  castor-MODE+no-teleport adds --no-teleport, castor-MODE+NAME=VALUE adds
#                  --NAME VALUE
#   xl-remus       for reference, Xen's own Remus on the loop device's domU (`xl remus -F -n
#                  -d -i IV` to an `xl migrate-receive -r` in this dom0, as xen-apache.sh:
#                  no network buffer, and -d: no disk replication, which xl remus cannot do
#                  here); its checkpoints counted from its log, its stream's bytes from its
#                  save helper's wchar
# Per row: the domU boots (castor_disk=db) and serves its document tree from the disk once
# (36 files, /disk/specweb/: its page cache then holds them; and the fill, /disk/fill/blob,
# when the rig was run with CASTOR_XEN_DISK_FILL_MIB); for castor rows the backup
# is then replaced by a fresh one on the same replica (ha-primary --reprotect), so the
# primary pre-copies the guest again, now with the tree in its page cache: the bytes and
# time of that pre-copy and its disk references (page-cache teleportation, issue 18);
# then wrk with failover.lua (a share DYN of inserts) for WRK_SECS s: answers/s, inserts/s,
# errors, and for castor rows the checkpoints' rate and mean bytes per checkpoint, split
# memory / disk, from primary.csv. Verdicts db-bench-ROW.
# ROWS (none castor-remus castor-xbzrle castor-fgbi castor-fgbi+no-teleport xl-remus), IV (200ms),
# CONNS (4), DYN (0.3), WRK_SECS (30) may be set with --env. Needs --env RIG_DOMU_NET=1.
# Every wait is bounded in tries, every load in time.
. "$RIG_LIB"
if [ "${RIG_DOMU_NET:-0}" != 1 ]; then
	rig_fail db-bench "the domU was started without its network: run the rig with --env RIG_DOMU_NET=1"
	exit 0
fi
ROWS=${ROWS:-none castor-remus castor-xbzrle castor-fgbi castor-fgbi+no-teleport xl-remus}
IV=${IV:-200ms}
CONNS=${CONNS:-4}
DYN=${DYN:-0.3}
WRK_SECS=${WRK_SECS:-30}
S=$SCRATCH
URL=http://$DOMU_IP:80
MANIFEST=$CASTOR_DIR/rig/specweb.manifest
plain() { tr -d '\033' <"$1" | sed 's/\[[0-9;]*m//g'; }
show() { plain "$1" 2>/dev/null | grep -v ' DEBUG ' | tail -n "${2:-8}" | cut -c1-400 | sed "s/^/$3| /"; }
# nth_event FILE NAME N FIELD: FIELD of the Nth NAME event in FILE (empty if none).
nth_event() { grep -a "\"event\":\"$2\"" "$1" 2>/dev/null | sed -n "$3p" | grep -o "\"$4\":[0-9]*" | cut -d: -f2; }
count() { _c=$(grep -c "\"event\":\"$2\"" "$1" 2>/dev/null); echo "${_c:-0}"; }
echo 1 >/proc/sys/vm/overcommit_memory
MEM=$(xen-selftest size "$DOMU") || {
	rig_fail db-bench "xen-selftest size failed"
	exit 0
}
xl destroy "$DOMU"

k=0
for row in $ROWS; do
	p=$S/p$k
	cp "$CASTOR_DIR/rig/disk.img" $p.img
	cp "$CASTOR_DIR/rig/disk.img" $p.replica
	pdev=/dev/nbd$((2 * k))
	bdev=/dev/nbd$((2 * k + 1))
	port=$((7700 + k))
	ppid=
	bpid=
	desc=
	case "$row" in
	none | xl-remus)
		pdev=/dev/loop$k
		losetup "$pdev" $p.img || {
			rig_fail "db-bench-$row" "losetup $pdev failed"
			continue
		}
		;;
	castor-*)
		mode=${row#castor-}
		set --
		case "$mode" in
		*+*=*)
			o=${mode#*+}
			mode=${mode%%+*}
			set -- "--${o%%=*}" "${o#*=}"
			;;
		*+*)
			o=${mode#*+}
			mode=${mode%%+*}
			set -- "--$o"
			;;
		esac
		rig_disk_cfg $p-backup.cfg "$bdev" "castor_ip=$DOMU_IP/24 castor_disk=db"
		ha-backup --listen 127.0.0.1:$port --memory "$MEM" --guest xen --xen-config $p-backup.cfg \
			--disk $p.replica --nbd-device "$bdev" --insecure --mode "$mode" --interval "$IV" \
			--detect-timeout 300s --events $p-b1.events 2>$p-b1.log &
		bpid=$!
		sleep 1
		ha-primary --guest xen --xen-domain "$DOMU" --xen-wait 180s --disk $p.img \
			--nbd-device "$pdev" --no-net-buffer --reprotect --backup 127.0.0.1:$port --insecure \
			--mode "$mode" --interval "$IV" --ack-timeout 300s --events $p.events \
			--stats $p.csv "$@" >$p.json 2>$p.log &
		ppid=$!
		i=0
		until [ -e /sys/block/${pdev#/dev/}/pid ] || [ $i -gt 120 ] || ! kill -0 $ppid 2>/dev/null; do
			i=$((i + 1))
			sleep 0.5
		done
		;;
	*)
		rig_fail "db-bench-$row" "unknown row '$row'"
		continue
		;;
	esac
	rig_disk_cfg $p.cfg "$pdev" "castor_ip=$DOMU_IP/24 castor_disk=db"
	t0=$(date +%s)
	if ! xl create $p.cfg >$p-create.log 2>&1 || ! rig_wait_http "$URL/cgi-bin/rows" 400; then
		rig_fail "db-bench-$row" "the domU did not serve in $(($(date +%s) - t0)) s"
		show $p.log 10 primary
		tail -n 5 $p-create.log | sed 's/^/xl-create| /'
		tr -d '\r' <"$DOMU_CONSOLE_LOG" | grep 'castor-domu' | tail -n 5 | sed 's/^/console| /'
		xl destroy "$DOMU" 2>/dev/null
		kill -KILL $ppid $bpid 2>/dev/null
		k=$((k + 1))
		continue
	fi
	# Protected (its first pre-copy done) before the tree is read.
	i=0
	while [ -n "$ppid" ] && [ "$(count $p.events protected)" -lt 1 ] && kill -0 $ppid 2>/dev/null && [ $i -lt 600 ]; do
		sleep 1
		i=$((i + 1))
	done
	tu=$(date +%s)
	# The document tree from the disk, once (and the reference bodies for wrk).
	mkdir -p $p-ref
	wrong=0
	for c in 0 1 2 3; do
		for i in 1 2 3 4 5 6 7 8 9; do
			f=class${c}_$i
			rig_client timeout 60 wget -q -O "$p-ref/$f" "$URL/disk/specweb/$f" 2>/dev/null
			want=$(awk -v f="specweb/$f" '$2 == f {print $1}' "$MANIFEST")
			[ "$(sha256sum <"$p-ref/$f" | cut -d' ' -f1)" = "$want" ] || wrong=$((wrong + 1))
		done
	done
	# The fill (CASTOR_XEN_DISK_FILL_MIB when the rig was built), once: a page cache that
	# dominates the domU.
	# (Counted, not kept: dom0's root file system has no room for it beside the images.)
	fill=$(rig_client timeout 600 wget -q -O - "$URL/disk/fill/blob" 2>$p-fill.err | wc -c)
	if [ "${fill:-0}" -gt 0 ]; then
		fill=", fill of $((fill >> 20)) MiB read once"
	else
		fill=
		if grep -q -v '404' $p-fill.err; then
			echo "db-bench-$row: the fill could not be read: $(head -c 300 $p-fill.err)"
			tr -d '\r' <"$DOMU_CONSOLE_LOG" | tail -n 5 | sed 's/^/console| /'
		fi
	fi
	tr=$(date +%s)
	desc="serving $((tu - t0)) s after xl create; tree read once$fill in $((tr - tu)) s ($wrong wrong)"
	case "$row" in castor-*)
		# Re-protection with the tree in the page cache: the backup replaced by a fresh one
		# on the same replica; ha-primary pre-copies the guest again.
		p1=$(nth_event $p.events protected 1 precopy_wire_bytes)
		kill -KILL $bpid
		wait $bpid 2>/dev/null
		l0=$(wc -l <$p.csv)
		ha-backup --listen 127.0.0.1:$port --memory "$MEM" --guest xen --xen-config $p-backup.cfg \
			--disk $p.replica --nbd-device "$bdev" --insecure --mode "$mode" --interval "$IV" \
			--detect-timeout 300s --events $p-b2.events 2>$p-b2.log &
		bpid=$!
		i=0
		while [ "$(count $p.events protected)" -lt 2 ] && kill -0 $ppid 2>/dev/null && [ $i -lt 600 ]; do
			sleep 1
			i=$((i + 1))
		done
		p2=$(nth_event $p.events protected 2 precopy_wire_bytes)
		ms=$(nth_event $p.events protected 2 sync_ms)
		refs=$(tail -n +"$((l0 + 1))" $p.csv | awk -F, '$2 == 0 { r += $40; n++ } END { printf "%d disk references in %d pre-copy epochs", r, n }')
		synced=$(grep -a '"event":"synced"' $p.events | sed -n 2p | grep -o '"pages":[0-9]*' | cut -d: -f2)
		if [ -n "$p2" ]; then
			desc="$desc; re-protection pre-copy $(((p2 - ${p1:-0}) / 1024)) KiB (${synced:-?} pages, $refs) in ${ms:-?} ms"
		else
			desc="$desc; re-protection did not end in ${i}s"
		fi
		;;
	esac
	rpid=
	if [ "$row" = xl-remus ]; then
		xl -vvv remus -F -n -d -i "${IV%ms}" -e -s '' "$DOMU" "xl migrate-receive -r -e" >$p-remus.log 2>&1 &
		rpid=$!
		i=0
		while [ "$(grep -c 'Checkpointed save:' $p-remus.log)" -lt 3 ] && kill -0 $rpid 2>/dev/null && [ $i -lt 180 ]; do
			sleep 1
			i=$((i + 1))
		done
		desc="$desc; xl remus checkpointing after ${i}s"
	fi
	k0=$(grep -c 'Checkpointed save:' $p-remus.log 2>/dev/null)
	w0=$(rig_save_helper_bytes)
	# The load.
	l1=0
	[ -f $p.csv ] && l1=$(wc -l <$p.csv)
	ts=$(date +%s)
	rig_client timeout -s KILL $((WRK_SECS + 60)) wrk -t 1 -c "$CONNS" -d "${WRK_SECS}s" --timeout 60s \
		-s "$CASTOR_DIR/rig/failover.lua" "$URL" -- "$p-ref" "$DYN" 7 /dev/null /cgi-bin/insert >$p-wrk.out 2>&1
	te=$(date +%s)
	f=$(grep '^FAILOVER ' $p-wrk.out)
	val() { echo "$f" | tr ' ' '\n' | sed -n "s/^$1=//p"; }
	secs=$((te - ts))
	desc="$desc; wrk c=$CONNS dyn=$DYN ${secs}s: $(awk -v n="$(val responses)" -v s=$secs 'BEGIN { printf "%.1f", n / s }') answers/s, $(awk -v n="$(val dynamic)" -v s=$secs 'BEGIN { printf "%.2f", n / s }') inserts/s, bad status $(val bad_status), bad body $(val bad_body), errors $(val errors)"
	if [ -n "$rpid" ]; then
		k1=$(grep -c 'Checkpointed save:' $p-remus.log)
		w1=$(rig_save_helper_bytes)
		desc="$desc; xl remus: $((k1 - ${k0:-0})) checkpoints ($(awk -v k=$((k1 - ${k0:-0})) -v s=$secs 'BEGIN { printf "%.2f", k / s }')/s), $(awk -v w=$((w1 - w0)) -v k=$((k1 - ${k0:-0})) 'BEGIN { if (k) printf "%d KiB", w / k / 1024; else printf "?" }') written by its save helper per checkpoint"
		# Stop it, keeping the primary domain: the receiver first, then the sender.
		for q in $(ps -o pid,args | awk '/xl migrate-receive/ && !/awk/ {print $1}'); do
			kill -KILL "$q"
		done
		i=0
		while kill -0 $rpid 2>/dev/null && [ $i -lt 60 ]; do
			sleep 1
			i=$((i + 1))
		done
		kill -KILL $rpid 2>/dev/null
		for dd in $(xl list | awk 'NR > 1 && $1 != "Domain-0" && $1 != "'"$DOMU"'" {print $1}'); do
			xl destroy "$dd"
		done
	fi
	case "$row" in castor-*)
		desc="$desc; $(tail -n +"$((l1 + 1))" $p.csv | awk -F, -v s=$secs '$2 == 1 { n++; w += $8; d += $30; dw += $28 }
			END { if (n) printf "%d checkpoints (%.2f/s), per checkpoint %d KiB: memory %d KiB, disk %d KiB (%.1f writes)", n, n / s, w / n / 1024, (w - d) / n / 1024, d / n / 1024, dw / n; else print "no checkpoints" }')"
		;;
	esac
	echo "db-bench-$row $desc"
	if [ -n "$f" ] && [ "$(val responses)" -gt 0 ] && [ "$(val bad_status)" = 0 ] && [ "$(val bad_body)" = 0 ] && [ "$wrong" = 0 ]; then
		rig_pass "db-bench-$row" "$desc"
	else
		rig_fail "db-bench-$row" "$desc"
		grep -v -e '^SEEN' -e '^SERIES' $p-wrk.out | tail -n 5 | sed 's/^/wrk| /'
		[ -n "$ppid" ] && show $p.log 12 primary
	fi
	# Teardown: the backup first (so nothing takes over), the domU, then its server.
	[ -n "$bpid" ] && kill -KILL $bpid 2>/dev/null
	xl destroy "$DOMU"
	if [ -n "$ppid" ]; then
		kill -TERM $ppid
		i=0
		while kill -0 $ppid 2>/dev/null && [ $i -lt 30 ]; do
			sleep 1
			i=$((i + 1))
		done
		kill -KILL $ppid 2>/dev/null
	fi
	[ "$ppid" ] || losetup -d "$pdev"
	rm -f $p.img $p.replica
	k=$((k + 1))
done
exit 0
