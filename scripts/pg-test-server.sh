#!/usr/bin/env bash
# A throwaway PostgreSQL server for the audit-ledger tests, on loopback only.
#
#   scripts/pg-test-server.sh start DIR   # prints the server's URL (postgresql://…) on stdout
#   scripts/pg-test-server.sh stop DIR
#
# Uses the PostgreSQL server binaries already installed (/usr/lib/postgresql/*/bin or PATH); if
# there are none and we are root, installs Debian's `postgresql` package with apt-get first
# (set FEDPACT_NO_APT=1 to forbid that). PostgreSQL refuses to run as root, so as root the
# server runs as the `postgres` user (created by the package). Exit code 3: no server available.
set -euo pipefail

action=${1:-}
dir=${2:-}
if [[ -z "$action" || -z "$dir" ]]; then
  echo "usage: $0 start|stop DIR" >&2
  exit 2
fi

find_bin() {
  local candidate
  for candidate in /usr/lib/postgresql/*/bin; do
    [[ -x "$candidate/initdb" && -x "$candidate/pg_ctl" ]] && { echo "$candidate"; return 0; }
  done
  if command -v initdb >/dev/null && command -v pg_ctl >/dev/null; then
    dirname "$(command -v pg_ctl)"
    return 0
  fi
  return 1
}

as_owner() {
  if [[ $(id -u) -eq 0 ]]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

case "$action" in
  start)
    if ! bin=$(find_bin); then
      if [[ $(id -u) -eq 0 && "${FEDPACT_NO_APT:-0}" != 1 ]]; then
        echo "installing PostgreSQL with apt-get ..." >&2
        { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; } >&2 \
          || { echo "apt-get could not install postgresql" >&2; exit 3; }
        bin=$(find_bin) || { echo "postgresql installed but no server binaries found" >&2; exit 3; }
      else
        echo "no PostgreSQL server binaries (initdb, pg_ctl) found" >&2
        exit 3
      fi
    fi
    if [[ $(id -u) -eq 0 ]] && ! id postgres >/dev/null 2>&1; then
      echo "running as root but there is no 'postgres' user to run the server as" >&2
      exit 3
    fi
    mkdir -p "$dir"
    chmod 755 "$dir"
    data="$dir/data"
    [[ $(id -u) -eq 0 ]] && chown postgres "$dir"
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
    as_owner "$bin/initdb" -D "$data" -U fedpact --auth=trust -E UTF8 --no-sync >"$dir/initdb.log" 2>&1 \
      || { cat "$dir/initdb.log" >&2; exit 3; }
    as_owner "$bin/pg_ctl" -D "$data" -l "$dir/server.log" -w -t 60 \
      -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=on -c max_connections=60" start >&2 \
      || { cat "$dir/server.log" >&2; exit 3; }
    echo "$port" >"$dir/port"
    echo "postgresql://fedpact@127.0.0.1:$port/postgres"
    ;;
  stop)
    bin=$(find_bin) || exit 0
    [[ -d "$dir/data" ]] || exit 0
    as_owner "$bin/pg_ctl" -D "$dir/data" -m immediate -w stop >&2 || true
    ;;
  *)
    echo "unknown action $action" >&2
    exit 2
    ;;
esac
