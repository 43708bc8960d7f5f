#!/bin/sh
# /cgi-bin/insert of the rig domU's web server (xen-db.sh): inserts a row into the sqlite3
# database on the domU's disk (/srv/db/rows.db, on xvda: the disk Castor replicates) and
# answers "row ID" with the new row's id. sqlite3 commits the row (journal, fsync) before
# it prints the id, so an id a client received names a row on the disk. Concurrent
# requests wait for the database's lock (up to 20 s); a failure answers 500 with sqlite3's
# words.
out=$(sqlite3 -cmd '.timeout 20000' /srv/db/rows.db \
	"INSERT INTO rows(at) VALUES (strftime('%s', 'now')); SELECT last_insert_rowid();" 2>&1)
case $out in
'' | *[!0-9]*)
	printf 'Status: 500 Internal Server Error\r\nContent-Type: text/plain\r\n\r\ninsert failed: %s\n' "$out"
	;;
*)
	printf 'Content-Type: text/plain\r\nCache-Control: no-store\r\n\r\nrow %s\n' "$out"
	;;
esac
