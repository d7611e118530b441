#!/bin/sh
# Install the hybridml edge (onnxruntime + numpy + requests + cryptography) into a virtual
# environment, on a Raspberry Pi or any 64-bit Linux, without building anything from source.
#
#   sh scripts/install-edge.sh [VENV] [PACKAGE]     # defaults: /opt/hybridml, this checkout
#   PYTHON=python3.11 sh scripts/install-edge.sh
#
# It first asks hybridml/preflight.py whether this Python can run the edge at all (64-bit,
# CPython >= 3.10, x86_64 or aarch64, wheels on the index) and stops with the reason and
# what to do when it cannot: a 32-bit Raspberry Pi OS gets "install the 64-bit OS", not
# pip's "no matching distribution" or an hour of compiling numpy.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-/opt/hybridml}
package=${2:-$here}
python=${PYTHON:-python3}

if ! command -v "$python" >/dev/null 2>&1; then
    echo "hybridml: $python not found; install Python 3.10 or newer (apt-get install python3 python3-venv)" >&2
    exit 1
fi
"$python" "$here/hybridml_pkg/preflight.py" || exit $?
if ! "$python" -m venv "$venv"; then
    echo "hybridml: could not create $venv; on Debian/Raspberry Pi OS: apt-get install python3-venv" >&2
    exit 1
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
# Every dependency from a binary wheel; only hybridml itself (pure Python) may be built.
"$venv/bin/python" -m pip install --disable-pip-version-check \
    --only-binary=:all: --no-binary=hybridml "$package"
echo "hybridml: installed; run $venv/bin/hybridml-edge doctor --store DIR"
