#!/usr/bin/env bash
# Makes sure the Dovecot IMAP server is installed for the bounce tests (test/support/dovecot.ts).
# Installs Debian's dovecot-imapd when missing, without starting the system service: the tests run
# their own unprivileged-storage instance on 127.0.0.1 with a temporary config. Never fails the
# build: where it cannot install (not root, no apt-get), it prints why and the IMAP tests skip.
set -u

# The server and its IMAP login process (package dovecot-imapd; dovecot-core alone has no IMAP).
find_dovecot() {
  { command -v dovecot >/dev/null 2>&1 || [ -x /usr/sbin/dovecot ]; } && [ -x /usr/lib/dovecot/imap-login ]
}

if find_dovecot; then
  exit 0
fi

if [ "$(id -u)" != "0" ]; then
  echo "ensureDovecot: dovecot is not installed and this is not root; the IMAP (bounce) tests will be skipped."
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "ensureDovecot: dovecot is not installed and apt-get is not available; the IMAP (bounce) tests will be skipped."
  exit 0
fi

echo "ensureDovecot: installing dovecot-imapd with apt-get (for the IMAP bounce tests)..."
started=$(date +%s)

# Keep the package's postinst from starting the system service (it would take ports 143/993).
policy=/usr/sbin/policy-rc.d
policy_created=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && policy_created=1
  trap 'rm -f "$policy"' EXIT
fi
log=/tmp/ensureDovecot.apt.log
: > "$log"

export DEBIAN_FRONTEND=noninteractive
apt_install() {
  apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=120 \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    dovecot-imapd >>"$log" 2>&1
}
if ! apt_install; then
  # A fresh machine may have no package lists yet.
  apt-get update -q -o DPkg::Lock::Timeout=120 >>"$log" 2>&1
  apt_install
fi
status=$?

if [ "$policy_created" = "1" ]; then
  rm -f "$policy"
  trap - EXIT
fi

# Whatever the package did, the system instance must not run: the tests start their own.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  systemctl stop dovecot.service dovecot.socket >/dev/null 2>&1 || true
  systemctl disable dovecot.service dovecot.socket >/dev/null 2>&1 || true
fi
if [ -f /run/dovecot/master.pid ]; then
  kill "$(cat /run/dovecot/master.pid)" 2>/dev/null || true
fi

if [ "$status" != "0" ] || ! find_dovecot; then
  echo "ensureDovecot: could not install dovecot-imapd (see $log); the IMAP (bounce) tests will be skipped."
  exit 0
fi
echo "ensureDovecot: dovecot-imapd installed in $(( $(date +%s) - started ))s."
exit 0
