#!/bin/sh
# pg_dump on a schedule, for docker-compose.yml's `backup` profile (service pg-backup).
#
# Runs in the PostgreSQL server image, so pg_dump's major version is the server's.
# Connection: the libpq variables PGHOST, PGPORT, PGUSER, PGDATABASE, PGPASSWORD
# (never printed). Writes BACKUP_DIR/kotonoha-YYYYmmddTHHMMSSZ.dump (custom format,
# restore with pg_restore), checks each file with `pg_restore --list` before it
# counts, and keeps the newest BACKUP_KEEP files.
#
#   BACKUP_DIR             where dumps go                      (default /backups)
#   BACKUP_INTERVAL_HOURS  hours between dumps, may be 0.5     (default 24)
#   BACKUP_KEEP            dumps kept                          (default 7)
#   BACKUP_ONCE=1          one dump, then exit (status 0 only when it worked)
set -eu

BACKUP_DIR=${BACKUP_DIR:-/backups}
INTERVAL_HOURS=${BACKUP_INTERVAL_HOURS:-24}
KEEP=${BACKUP_KEEP:-7}
ONCE=${BACKUP_ONCE:-0}

log() { printf '%s pg-backup: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2; }

# Started as root (the image default): own the directory, then drop to postgres.
if [ "$(id -u)" = 0 ] && command -v gosu >/dev/null 2>&1; then
    mkdir -p "$BACKUP_DIR"
    chown postgres:postgres "$BACKUP_DIR"
    chmod 700 "$BACKUP_DIR"
    exec gosu postgres /bin/sh "$0" "$@"
fi

case "$KEEP" in
    '' | *[!0-9]* | 0) log "BACKUP_KEEP must be a positive integer, got '$KEEP'"; exit 2 ;;
esac
if ! SECONDS_BETWEEN=$(awk -v h="$INTERVAL_HOURS" \
        'BEGIN { if (h !~ /^[0-9]+(\.[0-9]+)?$/ || h * 3600 < 60) exit 1; printf "%d", h * 3600 }'); then
    log "BACKUP_INTERVAL_HOURS must be a number of hours (at least one minute), got '$INTERVAL_HOURS'"
    exit 2
fi

umask 077
mkdir -p "$BACKUP_DIR"

prune() {
    # Names sort chronologically; drop everything past the newest $KEEP.
    for path in "$BACKUP_DIR"/kotonoha-*.dump; do
        [ -e "$path" ] && printf '%s\n' "${path##*/}"
    done | grep -E '^kotonoha-[0-9]{8}T[0-9]{6}Z(-[0-9]+)?\.dump$' | sort -r \
        | tail -n +"$((KEEP + 1))" | while read -r old; do
            rm -f -- "$BACKUP_DIR/$old"
            log "removed old backup $old"
        done
}

backup_once() {
    stamp=$(date -u +%Y%m%dT%H%M%SZ)
    final="$BACKUP_DIR/kotonoha-$stamp.dump"
    [ -e "$final" ] && final="$BACKUP_DIR/kotonoha-$stamp-$$.dump"
    partial="$final.partial"
    if ! pg_dump --format=custom --no-password --file="$partial"; then
        rm -f -- "$partial"
        log "FAILED: pg_dump of ${PGDATABASE:-?} on ${PGHOST:-?}:${PGPORT:-5432}"
        return 1
    fi
    if ! pg_restore --list "$partial" >/dev/null; then
        rm -f -- "$partial"
        log "FAILED: the dump is not readable by pg_restore"
        return 1
    fi
    mv -- "$partial" "$final"
    log "backup written: $final ($(wc -c <"$final" | tr -d ' ') bytes)"
    prune
}

if [ "$ONCE" = 1 ]; then
    backup_once
    exit $?
fi

trap 'log "stopping"; exit 0' TERM INT
log "every $INTERVAL_HOURS h into $BACKUP_DIR, keeping $KEEP"
while :; do
    backup_once || log "will retry at the next interval"
    sleep "$SECONDS_BETWEEN" &
    wait $! || true
done
