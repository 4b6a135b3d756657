#!/usr/bin/env bash
# Installs what the end-to-end tests and the demo need. Idempotent; safe to re-run.
#  - Debian packages: InspIRCd, Atheme services, ngIRCd, Prosody (and its community modules),
#    ejabberd, Kannel, Net::SMPP (their system services are stopped: the tests run their own instances
#    on free ports), openssl (test certificates), python3-venv.
#  - Synapse in a virtualenv at ${TRESTLE_E2E_HOME:-<repo>/.e2e}/venv.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
home=${TRESTLE_E2E_HOME:-$repo/.e2e}
mkdir -p "$home"
log() { printf '[install-deps] %s\n' "$*"; }

packages=(inspircd atheme-services ngircd prosody prosody-modules ejabberd kannel kannel-extras libnet-smpp-perl openssl python3-venv)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  log "installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  for svc in inspircd atheme-services ngircd prosody ejabberd kannel; do
    $sudo service "$svc" stop >/dev/null 2>&1 || true
  done
else
  log "Debian packages present"
fi

venv="$home/venv"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import synapse' 2>/dev/null; then
  log "Synapse present ($("$venv/bin/python" -c 'import synapse; print(synapse.__version__)'))"
else
  log "installing Synapse into $venv (about a minute)"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q matrix-synapse
  log "Synapse $("$venv/bin/python" -c 'import synapse; print(synapse.__version__)') installed"
fi
