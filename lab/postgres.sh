#!/usr/bin/env bash
# A private PostgreSQL cluster for tests (Debian's postgresql package):
#   lab/postgres.sh start DIR   initdb in DIR (once), start it on 127.0.0.1 and a free
#                               port; prints the catalog URL (user virtkeep, database
#                               virtkeep); the password is in DIR/password, the CA
#                               of its TLS certificate in DIR/ca.pem
#   lab/postgres.sh stop DIR    stops it (fast shutdown)
# As root, the server runs as the postgres user (initdb refuses root). Nothing is
# shared with other clusters: a test owns DIR and removes it afterwards.
set -euo pipefail

cmd=${1:?usage: postgres.sh start|stop DIR}
dir=${2:?usage: postgres.sh start|stop DIR}

bindir=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n 1)
if [[ -z "$bindir" || ! -x "$bindir/initdb" ]]; then
  echo "postgres.sh: PostgreSQL is not installed (lab/install-deps.sh installs it)" >&2
  exit 3
fi

as_owner() {
  if [[ $(id -u) -eq 0 ]]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

case "$cmd" in
start)
  mkdir -p "$dir"
  if [[ $(id -u) -eq 0 ]]; then chown postgres: "$dir"; fi
  if [[ ! -f "$dir/data/PG_VERSION" ]]; then
    head -c 18 /dev/urandom | base64 | tr -d '/+=' > "$dir/password"
    chmod 600 "$dir/password"
    if [[ $(id -u) -eq 0 ]]; then chown postgres: "$dir/password"; fi
    as_owner "$bindir/initdb" -D "$dir/data" -U virtkeep --pwfile="$dir/password" \
      --auth-host=scram-sha-256 --auth-local=trust -E UTF8 --no-sync >"$dir/initdb.log" 2>&1
  fi
  if [[ ! -f "$dir/server.key" ]]; then
    # TLS for clients that ask for it (sslmode=require): a CA (DIR/ca.pem, what
    # catalog_ca_file names) and a server certificate for 127.0.0.1 signed by it.
    (
      cd "$dir"
      openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=virtkeep test CA" \
        -keyout ca.key -out ca.pem 2>/dev/null
      openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" \
        -keyout server.key -out server.csr 2>/dev/null
      printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' > server.ext
      openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 30 \
        -extfile server.ext -out server.crt 2>/dev/null
      chmod 600 server.key ca.key
      if [[ $(id -u) -eq 0 ]]; then chown postgres: server.key server.crt; fi
    )
  fi
  port=$(free_port)
  as_owner "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off -c max_connections=200 -c ssl=on -c ssl_cert_file=$dir/server.crt -c ssl_key_file=$dir/server.key" \
    start >/dev/null
  as_owner "$bindir/psql" -h "$dir" -p "$port" -U virtkeep -d postgres -qAt \
    -c "SELECT 1 FROM pg_database WHERE datname = 'virtkeep'" | grep -q 1 ||
    as_owner "$bindir/createdb" -h "$dir" -p "$port" -U virtkeep virtkeep
  echo "postgres://virtkeep@127.0.0.1:$port/virtkeep"
  ;;
stop)
  if [[ -f "$dir/data/postmaster.pid" ]]; then
    as_owner "$bindir/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null || true
  fi
  ;;
*)
  echo "usage: postgres.sh start|stop DIR" >&2
  exit 2
  ;;
esac
