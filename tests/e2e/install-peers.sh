#!/usr/bin/env bash
# Exim and OpenSMTPD, the real peers of tests/e2e/test_exim.py and test_opensmtpd.py, without
# installing them: both conflict with the installed postfix package (all three provide
# mail-transport-agent). Their .debs (and those of any library they need that is not installed)
# are fetched with `apt-get download` into target/peers/debs and unpacked with `dpkg -x` into
# target/peers/root; the tests run the binaries from there (LD_LIBRARY_PATH for the libraries).
# Also makes the system users the packages' maintainer scripts would make (Debian-exim,
# opensmtpd, opensmtpq) and OpenSMTPD's compiled-in directories /var/spool/smtpd,
# /var/lib/opensmtpd/empty and /usr/libexec/opensmtpd, empty: mount points only, over which
# tests/e2e/opensmtpd.py bind-mounts private ones in a mount namespace of its own.
#
# Idempotent and quick when everything is there (a stamp file plus an ldd check). Runs
# `apt-get update` only if a download fails. Exits 0 even if the packages cannot be fetched:
# the tests then skip with the reason written to target/peers/unavailable.
set -uo pipefail
cd "$(dirname "$0")/../.."

PEERS="$PWD/target/peers"
DEBS="$PEERS/debs"
ROOTDIR="$PEERS/root"
STAMP="$ROOTDIR/.unpacked"
LIBDIR="$ROOTDIR/usr/lib/x86_64-linux-gnu"
PKGS=(exim4-daemon-light opensmtpd)
BINS=(usr/sbin/exim4 usr/sbin/smtpd usr/libexec/opensmtpd/mail.maildir)

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo -n "$@"; else
        echo "install-peers: need root (or sudo) for: $*" >&2; return 1; fi
}

unavailable() {
    mkdir -p "$PEERS"
    echo "$*" >"$PEERS/unavailable"
    echo "install-peers: $* (the Exim and OpenSMTPD tests will skip)" >&2
    exit 0
}

missing_libs() {  # prints the libraries the unpacked binaries cannot find
    local b
    for b in "${BINS[@]}"; do
        [ -x "$ROOTDIR/$b" ] || { echo "$b"; continue; }
        LD_LIBRARY_PATH="$LIBDIR" ldd "$ROOTDIR/$b" 2>/dev/null | awk '/not found/ {print $1}'
    done | sort -u
}

ensure_users() {
    getent group Debian-exim >/dev/null || as_root groupadd --system Debian-exim
    getent passwd Debian-exim >/dev/null ||
        as_root useradd --system --gid Debian-exim --home-dir /var/spool/exim4 --no-create-home \
            --shell /usr/sbin/nologin --comment "Exim (tests)" Debian-exim
    local u
    for u in opensmtpd opensmtpq; do
        getent group "$u" >/dev/null || as_root groupadd --system "$u"
        getent passwd "$u" >/dev/null ||
            as_root useradd --system --gid "$u" --home-dir /var/lib/opensmtpd/empty \
                --no-create-home --shell /usr/sbin/nologin --comment "OpenSMTPD (tests)" "$u"
    done
    # OpenSMTPD's compiled-in spool and chroot: mount points only (see opensmtpd.py).
    [ -d /var/spool/smtpd ] || as_root install -d -m 0711 /var/spool/smtpd
    [ -d /var/lib/opensmtpd/empty ] || as_root install -d -m 0755 /var/lib/opensmtpd/empty
    [ -d /usr/libexec/opensmtpd ] || as_root install -d -m 0755 /usr/libexec/opensmtpd
}

download() {  # apt-get download into $DEBS; apt-get update and retry once on failure
    (cd "$DEBS" && apt-get download -q "$@" >/dev/null 2>"$PEERS/download.err") && return 0
    as_root apt-get update -qq >/dev/null 2>&1 || true
    (cd "$DEBS" && apt-get download -q "$@" >/dev/null 2>"$PEERS/download.err")
}

ensure_users
if [ -f "$STAMP" ] && [ -z "$(missing_libs)" ]; then
    rm -f "$PEERS/unavailable"
    exit 0
fi

echo "install-peers: fetching ${PKGS[*]} into $DEBS (apt-get download; not installed)"
mkdir -p "$DEBS"
have_deb() { compgen -G "$DEBS/${1}_*.deb" >/dev/null; }
need=()
for p in "${PKGS[@]}"; do have_deb "$p" || need+=("$p"); done
if [ "${#need[@]}" -gt 0 ]; then
    download "${need[@]}" || unavailable "apt-get download ${need[*]} failed: $(tail -n 3 "$PEERS/download.err")"
fi
# The libraries they depend on that are not installed (e.g. libidn12 for Exim).
libs=()
for p in "${PKGS[@]}"; do
    deb=$(compgen -G "$DEBS/${p}_*.deb" | head -n 1)
    for dep in $(dpkg-deb -f "$deb" Depends | tr ',|' '\n\n' | sed 's/(.*)//; s/:any//' | awk '{print $1}'); do
        case "$dep" in lib*) ;; *) continue ;; esac
        [ "$(dpkg-query -W -f='${Status}' "$dep" 2>/dev/null)" = "install ok installed" ] && continue
        have_deb "$dep" || libs+=("$dep")
    done
done
if [ "${#libs[@]}" -gt 0 ]; then
    download "${libs[@]}" || unavailable "apt-get download ${libs[*]} failed: $(tail -n 3 "$PEERS/download.err")"
fi

rm -rf "$ROOTDIR"
mkdir -p "$ROOTDIR"
for deb in "$DEBS"/*.deb; do
    dpkg -x "$deb" "$ROOTDIR" || unavailable "dpkg -x $deb failed"
done
# Exim re-executes itself for deliveries: a setuid binary would lose LD_LIBRARY_PATH (secure
# mode), and the tests run it as root anyway.
chmod u-s,g-s "$ROOTDIR/usr/sbin/exim4"
left=$(missing_libs)
[ -z "$left" ] || unavailable "still missing after unpacking: $(echo $left)"
ls "$DEBS" >"$STAMP"
rm -f "$PEERS/unavailable"
echo "install-peers: unpacked $(ls "$DEBS" | tr '\n' ' ')into $ROOTDIR"
