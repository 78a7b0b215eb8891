# Shared by .ci/docker-stage (CI stage 2) and .ci/check-images (make check-images): timing of steps, the Docker
# tools, a private dockerd and a debootstrapped base image, on a machine without an image registry.
# The sourcing script sets LABEL (the name in messages), WORK (a short work folder; removed on exit unless
# PCBVLM_CI_KEEP=1), T0, TIMES=() and DOCKERD_PID=, then `trap cleanup EXIT`.
# shellcheck shell=bash

# debootstrap resolves no virtual packages: python3.11-venv needs python3.11-distutils, which python3-distutils
# provides. The Dockerfile installs nothing through apt when all of these are there, so its build needs no network.
BASE_PACKAGES=python3.11,python3.11-venv,python3-distutils,python3.11-dev,make,ca-certificates,gcc,libc6-dev

step() { # step NAME: start timing NAME
  STEP=$1 STEP_T=$(date +%s)
  echo "== $LABEL: $STEP"
}
done_step() {
  local s=$(( $(date +%s) - STEP_T ))
  TIMES+=("$(printf '%-10s %5d s' "$STEP" "$s")")
  echo "== $LABEL: $STEP done in $s s"
  STEP=
}

cleanup() {
  local rc=$?
  set +e
  if [ "$rc" != 0 ] && [ -n "${STEP:-}" ]; then
    TIMES+=("$(printf '%-10s %5d s  FAILED' "$STEP" "$(( $(date +%s) - STEP_T ))")")
  fi
  if [ -n "$DOCKERD_PID" ] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
    kill "$DOCKERD_PID"
    for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 1; done
    if kill -0 "$DOCKERD_PID" 2>/dev/null; then
      echo "dockerd (pid $DOCKERD_PID) did not stop in 60 s; killing it"
      kill -9 "$DOCKERD_PID"
    fi
    wait "$DOCKERD_PID" 2>/dev/null
  fi
  # Mounts the daemon left behind (it removes its own when it stops cleanly), deepest first.
  grep -o " $WORK/[^ ]*" /proc/mounts | sort -r | while read -r m; do umount -l "$m"; done
  if [ "${PCBVLM_CI_KEEP:-0}" = 1 ]; then
    echo "kept $WORK"
  else
    rm -rf "$WORK"
  fi
  if [ ${#TIMES[@]} -gt 0 ]; then
    echo "== $LABEL timings"
    printf '   %s\n' "${TIMES[@]}"
  fi
  echo "== $LABEL $([ "$rc" = 0 ] && echo passed || echo FAILED) in $(( $(date +%s) - T0 )) s"
  exit "$rc"
}
# The Debian mirror the host's apt uses (deb822 .sources or one-line sources.list), for debootstrap and apt.
debian_mirror() {
  local m=""
  if compgen -G '/etc/apt/sources.list.d/*.sources' >/dev/null; then
    m=$(awk -v RS= '/(^|\n)Suites:[^\n]* bookworm([ \n]|$)/ && match($0, /URIs:[ \t]*[^ \t\n]+/) {
          s = substr($0, RSTART, RLENGTH); sub(/URIs:[ \t]*/, "", s); print s; exit }' \
        /etc/apt/sources.list.d/*.sources)
  fi
  if [ -z "$m" ] && [ -f /etc/apt/sources.list ]; then
    m=$(awk '$1 == "deb" { i = 2; if ($i ~ /^\[/) while ($i !~ /\]$/) i++; if ($i ~ /\]$/ && $2 ~ /^\[/) i++;
              if ($(i+1) == "bookworm") { print $i; exit } }' /etc/apt/sources.list)
  fi
  echo "${m:-http://deb.debian.org/debian}"
}
# Debian 12's docker.io (20.10) has a builtin Dockerfile frontend without named build contexts
# (--build-context wheelhouse=DIR) and Debian 12 has neither compose v2 nor buildx. Debian 13's docker.io,
# docker-cli, docker-buildx and docker-compose need only libc6 >= 2.34 and Debian 12's containerd and runc, so
# they are fetched from the same mirror through a private source list (the host's apt sources stay as they are).
install_tools() {
  if command -v dockerd >/dev/null && command -v debootstrap >/dev/null \
      && docker compose version >/dev/null 2>&1 && docker buildx version >/dev/null 2>&1; then
    echo "tools present: $(dockerd --version); $(docker compose version); $(docker buildx version)"
    return
  fi
  local apt_dir=$WORK/apt
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/parts" "$apt_dir/debs"
  chmod 0777 "$apt_dir/debs"  # apt downloads as _apt
  echo "deb $MIRROR trixie main" > "$apt_dir/sources.list"
  local -a private=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o "Dir::Etc::SourceParts=$apt_dir/parts"
                    -o "Dir::State::Lists=$apt_dir/lists")
  apt-get update -qq
  apt-get "${private[@]}" update -qq
  (cd "$apt_dir/debs" && apt-get "${private[@]}" download docker.io docker-cli docker-buildx docker-compose)
  # The packages' scripts would start the system's docker service: not here (policy-rc.d, removed again below).
  local policy_made=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && policy_made=1
  fi
  apt-get install -y -qq --no-install-recommends debootstrap "$apt_dir"/debs/*.deb
  [ "$policy_made" = 0 ] || rm -f /usr/sbin/policy-rc.d
  echo "tools: $(dockerd --version); $(docker compose version); $(docker buildx version)"
}

start_dockerd() {
  echo '{}' > "$WORK/daemon.json"
  dockerd --config-file "$WORK/daemon.json" --data-root "$WORK/docker" --exec-root "$WORK/run" \
    --pidfile "$WORK/dockerd.pid" -H "unix://$WORK/docker.sock" \
    --bridge=none --iptables=false --ip6tables=false >"$WORK/dockerd.log" 2>&1 &
  DOCKERD_PID=$!
  export DOCKER_HOST="unix://$WORK/docker.sock"
  for _ in $(seq 60); do
    if docker version >/dev/null 2>&1; then
      echo "dockerd pid $DOCKERD_PID: $(docker version --format '{{.Server.Version}}')"
      return
    fi
    kill -0 "$DOCKERD_PID" 2>/dev/null || break
    sleep 1
  done
  echo "error: dockerd did not start"; tail -n 30 "$WORK/dockerd.log"; exit 1
}


# debootstrap_base TAG: Debian bookworm with BASE_PACKAGES (Python 3.11 and what the Dockerfile would install),
# from the host's Debian mirror, imported as the image TAG. The stand-in for a registry's base image.
debootstrap_base() {
  echo "debootstrap bookworm from $MIRROR"
  debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -n 30 "$WORK/debootstrap.log"; tail -n 30 "$WORK/rootfs/debootstrap/debootstrap.log" 2>/dev/null; exit 1; }
  rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
  tar -C "$WORK/rootfs" -c . | docker import -c 'CMD ["/bin/bash"]' - "$1" >/dev/null
  rm -rf "$WORK/rootfs"
  docker run --rm --network none "$1" python3.11 --version
}

MIRROR=$(debian_mirror)
