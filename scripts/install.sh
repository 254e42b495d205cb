#!/usr/bin/env bash
# Install Relaylab on this host, next to its Postfix (as root; safe to run again, which
# also upgrades the package from this checkout):
#
#   * the system user that runs the services (default relaylab)
#   * PREFIX (/opt/relaylab): a virtualenv built with the system Python, holding the
#     package; the documentation the units point at under share/doc/relaylab
#   * ETC (/etc/relaylab): the example policy (only if there is none yet) and keys/, a
#     directory the service user can read (root:USER 2750; key files root:USER 0640)
#   * systemd units for the milter, policyd, the tracker, logd, webhooks, bounces and the API in UNIT_DIR
#   * `relaylab` on PATH: BIN_DIR/relaylab, a wrapper that runs the venv's with
#     RELAYLAB_CONFIG=ETC/relaylab.yaml unless it is set (else a conf/relaylab.yaml in
#     the current directory, as in a checkout, would win)
#
# --uninstall removes all of that except ETC (the policy and the keys are yours) and
# the user only if this script created it. Nothing is started or enabled: see README.md,
# "Deploying next to an existing Postfix".
#
# Paths are options so that a test can install into a scratch directory (--root DIR puts
# every default under DIR; the units then name the paths under DIR).
set -euo pipefail

usage() {
    cat <<EOF
usage: $0 [--uninstall] [--root DIR] [--prefix DIR] [--etc DIR] [--unit-dir DIR]
          [--bin-dir DIR] [--user NAME] [--python PATH] [--source DIR]
defaults: --prefix ROOT/opt/relaylab --etc ROOT/etc/relaylab
          --unit-dir ROOT/etc/systemd/system --bin-dir ROOT/usr/local/bin
          --user relaylab --python /usr/bin/python3 --source (this checkout)
EOF
}

src=$(cd "$(dirname "$0")/.." && pwd)
root="" prefix="" etc="" unit_dir="" bin_dir="" user=relaylab python=/usr/bin/python3
action=install
while [ $# -gt 0 ]; do
    case "$1" in
        --uninstall) action=uninstall ;;
        --root) root=${2:?}; shift ;;
        --prefix) prefix=${2:?}; shift ;;
        --etc) etc=${2:?}; shift ;;
        --unit-dir) unit_dir=${2:?}; shift ;;
        --bin-dir) bin_dir=${2:?}; shift ;;
        --user) user=${2:?}; shift ;;
        --python) python=${2:?}; shift ;;
        --source) src=${2:?}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
root=${root%/}
prefix=${prefix:-$root/opt/relaylab}
etc=${etc:-$root/etc/relaylab}
unit_dir=${unit_dir:-$root/etc/systemd/system}
bin_dir=${bin_dir:-$root/usr/local/bin}
services=(milter policyd tracker logd webhooks bounces api)
marker=$prefix/.relaylab-install   # what this script made: only then does it delete

[ "$(id -u)" = 0 ] || { echo "install.sh: run as root" >&2; exit 1; }

say() { echo "install.sh: $*"; }

# Single-quoted for sh.
shq() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }

# The `relaylab` this script puts on PATH (or the symlink earlier versions put there).
command_line() { printf 'exec %s "$@"\n' "$(shq "$prefix/venv/bin/relaylab")"; }
is_our_command() {
    if [ -L "$1" ]; then
        [ "$(readlink "$1")" = "$prefix/venv/bin/relaylab" ]
    else
        [ -f "$1" ] && grep -qxF "$(command_line)" "$1"
    fi
}

# systemctl only for the real unit directory on a host where systemd runs.
systemd_live() { [ "$unit_dir" = /etc/systemd/system ] && [ -d /run/systemd/system ]; }

if [ "$action" = uninstall ]; then
    if systemd_live; then
        systemctl disable --now "${services[@]/#/relaylab-}" 2>/dev/null || true
    fi
    for s in "${services[@]}"; do
        rm -f "$unit_dir/relaylab-$s.service"
    done
    systemd_live && systemctl daemon-reload
    if is_our_command "$bin_dir/relaylab"; then
        rm -f "$bin_dir/relaylab"
    fi
    created_user=""
    if [ -f "$marker" ]; then
        created_user=$(sed -n 's/^created_user=//p' "$marker")
        rm -rf "$prefix"
        say "removed $prefix"
    elif [ -e "$prefix" ]; then
        say "left $prefix alone: it has no $marker"
    fi
    if [ -n "$created_user" ] && getent passwd "$created_user" >/dev/null; then
        userdel "$created_user"
        getent group "$created_user" >/dev/null && groupdel "$created_user"
        say "removed user $created_user"
    fi
    [ -e "$etc" ] && say "kept $etc (your policy and keys): remove it yourself if you mean to"
    exit 0
fi

# --- the user ------------------------------------------------------------------------
created_user=""
[ -f "$marker" ] && created_user=$(sed -n 's/^created_user=//p' "$marker")
if ! getent passwd "$user" >/dev/null; then
    useradd --system --user-group --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin "$user"
    created_user=$user
    say "created system user $user"
fi

# --- the virtualenv ------------------------------------------------------------------
mkdir -p "$prefix"
printf 'created_user=%s\n' "$created_user" > "$marker"
if [ ! -x "$prefix/venv/bin/python" ]; then
    "$python" -m venv "$prefix/venv"
fi
say "installing the relaylab package from $src into $prefix/venv"
# Build the wheel once; --force-reinstall --no-deps then replaces the code even when a
# rerun from an updated checkout carries the same version number.
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
pip=("$prefix/venv/bin/pip" --quiet --disable-pip-version-check)
"${pip[@]}" wheel --no-deps --wheel-dir "$build" "$src"
"${pip[@]}" install "$build"/relaylab-*.whl
"${pip[@]}" install --force-reinstall --no-deps "$build"/relaylab-*.whl

doc=$prefix/share/doc/relaylab
install -d -m 0755 "$doc" "$doc/policyd" "$doc/tracker"
install -m 0644 "$src/README.md" "$doc/README.md"
install -m 0644 "$src/policyd/README.md" "$doc/policyd/README.md"
install -m 0644 "$src/tracker/README.md" "$doc/tracker/README.md"
install -m 0644 "$src/conf/relaylab.yaml" "$doc/relaylab.yaml.example"

# --- /etc/relaylab -------------------------------------------------------------------
# The services run as $user: the directories are root:$user, group-readable, and keys/
# is setgid so that files created in it (relaylab dkim keygen, or by hand) are group
# $user too. Existing key files get that group and lose any world access.
install -d -m 0750 -o root -g "$user" "$etc"
install -d -m 2750 -o root -g "$user" "$etc/keys"
if [ ! -e "$etc/relaylab.yaml" ]; then
    install -m 0640 -o root -g "$user" "$src/conf/relaylab.yaml" "$etc/relaylab.yaml"
    say "wrote the example policy $etc/relaylab.yaml: edit it"
    # The example's tracker key: a fresh random secret, never the same on two hosts.
    secret=$etc/keys/tracker.k2026a.secret
    if [ ! -e "$secret" ]; then
        (umask 027; head -c 48 /dev/urandom | base64 -w0 > "$secret"; echo >> "$secret")
        chown root:"$user" "$secret"
    fi
else
    say "kept the existing policy $etc/relaylab.yaml"
fi
find "$etc/keys" -mindepth 1 -maxdepth 1 -type f -exec chgrp "$user" {} + \
    -exec chmod g+r,o-rwx {} +

# --- units and PATH ------------------------------------------------------------------
install -d -m 0755 "$unit_dir"
for s in "${services[@]}"; do
    sed -e "s|/opt/relaylab|$prefix|g" -e "s|/etc/relaylab|$etc|g" \
        -e "s|^User=relaylab\$|User=$user|" -e "s|^Group=relaylab\$|Group=$user|" \
        "$src/conf/relaylab-$s.service" > "$unit_dir/relaylab-$s.service.tmp"
    chmod 0644 "$unit_dir/relaylab-$s.service.tmp"
    mv "$unit_dir/relaylab-$s.service.tmp" "$unit_dir/relaylab-$s.service"
done
systemd_live && systemctl daemon-reload
install -d -m 0755 "$bin_dir"
{
    echo '#!/bin/sh'
    echo '# relaylab as installed by scripts/install.sh: the installed policy unless'
    echo '# RELAYLAB_CONFIG (or --config) names another, whatever the current directory.'
    printf 'RELAYLAB_CONFIG=${RELAYLAB_CONFIG:-%s}\n' "$(shq "$etc/relaylab.yaml")"
    echo 'export RELAYLAB_CONFIG'
    command_line
} > "$bin_dir/relaylab.tmp"
chmod 0755 "$bin_dir/relaylab.tmp"
mv -f "$bin_dir/relaylab.tmp" "$bin_dir/relaylab"   # replaces an earlier symlink, not its target

say "done. Next: edit $etc/relaylab.yaml, make DKIM keys (relaylab dkim keygen ... --out"
say "$etc/keys/DOMAIN.SELECTOR.key), relaylab check, systemctl enable --now"
say "relaylab-milter relaylab-policyd relaylab-tracker relaylab-logd relaylab-webhooks (and"
say "relaylab-bounces with bounces.domain set, relaylab-api with api.clients set),"
say "relaylab postfix config --apply"
