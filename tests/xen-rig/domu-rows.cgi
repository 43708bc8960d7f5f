#!/bin/sh
# /cgi-bin/rows of the rig domU's web server (xen-db.sh): what the database on the disk
# holds, for a client to check against the ids it received:
#   integrity RESULT      (PRAGMA integrity_check: "ok" for a sound database)
#   rows COUNT MAX        (rows, largest id)
#   ids ID ID ...         (every id, ascending)
db=/srv/db/rows.db
q() { sqlite3 -cmd '.timeout 20000' "$db" "$1" 2>&1 | tr '\n' ' ' | sed 's/ *$//'; }
printf 'Content-Type: text/plain\r\nCache-Control: no-store\r\n\r\n'
echo "integrity $(q 'PRAGMA integrity_check;')"
echo "rows $(q "SELECT count(*) || ' ' || coalesce(max(id), 0) FROM rows;")"
echo "ids $(q 'SELECT id FROM rows ORDER BY id;')"
