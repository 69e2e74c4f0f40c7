#!/bin/sh
# Chaos for the compose swarm: every CHAOS_INTERVAL_S seconds, take the next action of
# CHAOS_ACTIONS (in turn) against one running container of CHAOS_TARGET picked at random,
# hold the fault for CHAOS_DOWN_S seconds, then undo it.
#
#   kill        docker kill -s KILL   (the crash path: no drain, no LEAVING record), then docker start
#   term        docker kill -s TERM   (graceful drain, exit 0, so restart: on-failure does not restart
#                                      it), then docker start: same container, same identity
#   pause       docker pause / unpause (alive but unresponsive: peers must evict, then re-admit it)
#   disconnect  docker network disconnect / connect (a partition with the process alive)
#   restart     docker restart -t CHAOS_STOP_TIMEOUT_S (drain, then start again)
#
# Environment (all optional):
#   CHAOS_INTERVAL_S      seconds between faults (default 60)
#   CHAOS_ACTIONS         comma list of the actions above (default kill,term,pause,disconnect,restart)
#   CHAOS_TARGET          comma list of compose services to pick from (default peer)
#   CHAOS_DOWN_S          how long a fault lasts before it is undone (default 20)
#   CHAOS_START_DELAY_S   quiet period before the first fault, for the swarm to form (default 120)
#   CHAOS_STOP_TIMEOUT_S  `docker restart -t`: must exceed the node's --shutdown-grace-s (default 30)
#   CHAOS_ITERATIONS      faults to inject, then exit 0 (default 0 = forever)
#   CHAOS_PROJECT         compose project whose containers are targets (default: this container's own)
#
# Invariants: only containers of this compose project and of the target services are ever
# touched; a fault in progress is undone when chaos itself is stopped (no peer is left paused
# or disconnected); a bad setting exits 2 before anything is touched. POSIX sh: it runs in the
# docker:cli image (busybox) and under dash in the tests.
set -eu

CHAOS_INTERVAL_S=${CHAOS_INTERVAL_S:-60}
CHAOS_ACTIONS=${CHAOS_ACTIONS:-kill,term,pause,disconnect,restart}
CHAOS_TARGET=${CHAOS_TARGET:-peer}
CHAOS_DOWN_S=${CHAOS_DOWN_S:-20}
CHAOS_START_DELAY_S=${CHAOS_START_DELAY_S:-120}
CHAOS_STOP_TIMEOUT_S=${CHAOS_STOP_TIMEOUT_S:-30}
CHAOS_ITERATIONS=${CHAOS_ITERATIONS:-0}
CHAOS_PROJECT=${CHAOS_PROJECT:-}

log() { echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) chaos: $*"; }
die() { echo "chaos: $*" >&2; exit 2; }

for pair in "CHAOS_INTERVAL_S=$CHAOS_INTERVAL_S" "CHAOS_DOWN_S=$CHAOS_DOWN_S" \
            "CHAOS_START_DELAY_S=$CHAOS_START_DELAY_S" "CHAOS_STOP_TIMEOUT_S=$CHAOS_STOP_TIMEOUT_S" \
            "CHAOS_ITERATIONS=$CHAOS_ITERATIONS"; do
  case "${pair#*=}" in
    ''|*[!0-9]*) die "${pair%%=*} must be a whole number of seconds/iterations, got '${pair#*=}'" ;;
  esac
done

actions=$(echo "$CHAOS_ACTIONS" | tr ',' ' ')
[ "$(echo $actions | wc -w)" -gt 0 ] || die "CHAOS_ACTIONS names no action"
for a in $actions; do
  case "$a" in
    kill|term|pause|disconnect|restart) ;;
    *) die "unknown action '$a' in CHAOS_ACTIONS (use kill, term, pause, disconnect, restart)" ;;
  esac
done
services=$(echo "$CHAOS_TARGET" | tr ',' ' ')
[ "$(echo $services | wc -w)" -gt 0 ] || die "CHAOS_TARGET names no compose service"

if [ -z "$CHAOS_PROJECT" ]; then
  # Docker names a container's hostname after its id: read our own compose project label.
  CHAOS_PROJECT=$(docker inspect -f '{{ index .Config.Labels "com.docker.compose.project" }}' "$(hostname)") \
    || die "cannot find this container's compose project; set CHAOS_PROJECT"
  [ -n "$CHAOS_PROJECT" ] || die "this container has no compose project label; set CHAOS_PROJECT"
fi

# The undo of the fault in progress, run on exit so that stopping chaos heals the swarm.
UNDO=""
heal() {
  if [ -n "${NAP_PID:-}" ]; then kill "$NAP_PID" 2>/dev/null || true; fi   # leave no sleep behind
  if [ -n "$UNDO" ]; then
    log "healing on exit: docker $UNDO"
    # shellcheck disable=SC2086  # UNDO is a docker argument list built below
    docker $UNDO >/dev/null 2>&1 || true
    UNDO=""
  fi
}
trap heal EXIT
trap 'exit 0' INT TERM

pick_target() {
  ids=""
  for s in $services; do
    ids="$ids $(docker ps -q --filter "label=com.docker.compose.project=$CHAOS_PROJECT" \
                            --filter "label=com.docker.compose.service=$s")"
  done
  n=$(echo $ids | wc -w)
  [ "$n" -gt 0 ] || return 1
  r=$(od -An -N2 -tu2 /dev/urandom | tr -d ' ')
  echo $ids | tr ' ' '\n' | sed -n "$((r % n + 1))p"
}

# Sleep in the background and wait: a trapped TERM interrupts `wait` at once, whereas a
# foreground sleep would delay it past `docker stop`'s timeout (then KILL, and no heal).
NAP_PID=""
nap() { [ "$1" -eq 0 ] || { sleep "$1" & NAP_PID=$!; wait "$NAP_PID"; NAP_PID=""; }; }
hold() { nap "$CHAOS_DOWN_S"; }

inject() {
  action=$1 c=$2
  case "$action" in
    kill|term)
      sig=KILL; [ "$action" = term ] && sig=TERM
      log "$action: docker kill -s $sig $c"
      docker kill -s "$sig" "$c" >/dev/null
      UNDO="start $c"; hold
      log "$action: docker start $c"
      docker start "$c" >/dev/null; UNDO="" ;;
    pause)
      log "pause: docker pause $c"
      docker pause "$c" >/dev/null
      UNDO="unpause $c"; hold
      log "pause: docker unpause $c"
      docker unpause "$c" >/dev/null; UNDO="" ;;
    disconnect)
      net=$(docker inspect -f '{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}' "$c" | awk '{print $1}')
      [ -n "$net" ] || { log "disconnect: $c has no network, skipped"; return 0; }
      log "disconnect: docker network disconnect $net $c"
      docker network disconnect "$net" "$c" >/dev/null
      UNDO="network connect $net $c"; hold
      log "disconnect: docker network connect $net $c"
      docker network connect "$net" "$c" >/dev/null; UNDO="" ;;
    restart)
      log "restart: docker restart -t $CHAOS_STOP_TIMEOUT_S $c"
      docker restart -t "$CHAOS_STOP_TIMEOUT_S" "$c" >/dev/null ;;
  esac
}

log "project=$CHAOS_PROJECT targets=[$services] actions=[$actions] every ${CHAOS_INTERVAL_S}s, faults last ${CHAOS_DOWN_S}s"
nap "$CHAOS_START_DELAY_S"
i=0
while [ "$CHAOS_ITERATIONS" -eq 0 ] || [ "$i" -lt "$CHAOS_ITERATIONS" ]; do
  # Actions go in turn, so a short run still exercises each of them.
  n_actions=$(echo $actions | wc -w)
  action=$(echo $actions | tr ' ' '\n' | sed -n "$((i % n_actions + 1))p")
  if c=$(pick_target); then
    # A target may vanish between ps and the action (chaos races restarts): log, go on.
    inject "$action" "$c" || log "$action on $c failed; continuing"
  else
    log "no running container of [$services] in project $CHAOS_PROJECT; waiting"
  fi
  i=$((i + 1))
  if [ "$CHAOS_ITERATIONS" -eq 0 ] || [ "$i" -lt "$CHAOS_ITERATIONS" ]; then
    nap "$CHAOS_INTERVAL_S"
  fi
done
log "done after $i faults"
