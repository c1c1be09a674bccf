#!/usr/bin/env bash
# Real peers for the integration tests, from Debian's packages (no Docker here).
set -euo pipefail
need=()
command -v Orthanc >/dev/null || need+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
command -v storescu >/dev/null || need+=(dcmtk)
command -v dciodvfy >/dev/null || need+=(dicom3tools)
command -v node >/dev/null || need+=(nodejs npm)
[ -x /usr/bin/chromium ] || need+=(chromium)  # the browser tests (tests/viewer): Debian's build, never a download
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need+=(postgresql)  # the PostgreSQL outbox tests
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != "0" ]; then echo "install as root: apt-get install ${need[*]}" >&2; exit 1; fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# A real FHIR R4 server for the EMR tests (Medplum's FHIR router) and the offline FHIR validator
# FHIR.js (npm `fhir`), pinned by the lockfile.
here="$(cd "$(dirname "$0")/.." && pwd)"
if [ ! -d "$here/tests/fhir_server/node_modules/@medplum/fhir-router" ] || [ ! -d "$here/tests/fhir_server/node_modules/fhir" ]; then
  (cd "$here/tests/fhir_server" && npm ci --no-audit --no-fund --loglevel=error)
fi

# The pinned OHIF viewer for tests/viewer (its prebuilt dist, ~200 MB unpacked, never committed).
OHIF_VERSION=3.13.2
if [ ! -f "$here/tests/viewer/.ohif/package/dist/index.html" ]; then
  mkdir -p "$here/tests/viewer/.ohif"
  (cd "$here/tests/viewer/.ohif" && npm pack "@ohif/app@$OHIF_VERSION" --loglevel=error >/dev/null \
    && tar xzf "ohif-app-$OHIF_VERSION.tgz" && rm "ohif-app-$OHIF_VERSION.tgz")
fi

# The pinned Larvitar (npm `larvitar`, MIT): its GSPS tool is the presentation-state renderer of
# tests/viewer/test_gsps_render.py (OHIF 3.13 has none). Its prebuilt single-file dist, checked
# against the registry's published sha512 before unpacking.
LARVITAR_VERSION=3.8.7
LARVITAR_SHA512=IF8NaUCJJMsYDlxrKaSVGze7YULJuAgKOFnU5//ivADCO/qbssAVTl7V3QPzEtUcwUoPVt5IW0V539M4tebDoQ==
if [ ! -f "$here/tests/viewer/.larvitar/package/dist/larvitar.js" ]; then
  mkdir -p "$here/tests/viewer/.larvitar"
  (cd "$here/tests/viewer/.larvitar" && npm pack "larvitar@$LARVITAR_VERSION" --loglevel=error >/dev/null \
    && [ "$(openssl dgst -sha512 -binary "larvitar-$LARVITAR_VERSION.tgz" | base64 -w0)" = "$LARVITAR_SHA512" ] \
    && tar xzf "larvitar-$LARVITAR_VERSION.tgz" package/dist/larvitar.js package/dist/larvitar.js.LICENSE.txt package/package.json \
    && rm "larvitar-$LARVITAR_VERSION.tgz")
fi
