#!/bin/sh
# The dynamic part of the rig domU's web server: /cgi-bin/counter (run by Apache's
# mod_cgid as www-data, with busybox sh). Increments a counter kept in a file on the
# domU's tmpfs and answers "counter N": the answer is guest state, so a domain restored
# from a checkpoint goes on from the checkpoint's value. Concurrent requests take turns
# through a mkdir lock (busybox has no flock); a request that cannot take it in 2 s (its
# holder died holding it) answers 503 instead of waiting on.
d=/dev/shm/www
i=0
while ! mkdir "$d/lock" 2>/dev/null; do
	i=$((i + 1))
	if [ "$i" -gt 2000 ]; then # 2 s: give up with an error rather than hang
		printf 'Status: 503 Service Unavailable\r\nContent-Type: text/plain\r\n\r\ncounter busy\n'
		exit 0
	fi
	usleep 1000
done
n=$(cat "$d/counter" 2>/dev/null)
n=$((${n:-0} + 1))
echo "$n" >"$d/counter"
rmdir "$d/lock"
printf 'Content-Type: text/plain\r\nCache-Control: no-store\r\n\r\ncounter %s\n' "$n"
