# Shared harness of the end-to-end benchmark scripts (sourced, not run).
#
# What every script that sources it gets, so that a figure measures the
# switch and not the harness:
# - Cores assigned explicitly: the traffic generator on GEN_CPU, whatever
#   forwards (vswitch processes, the kernel's softirqs, a bare forwarder)
#   on SW_CPU. `h_pin_sw PID` pins a process and all its threads; the
#   kernel's receive work is steered with RPS (`h_rps`) and, for veth
#   devices with XDP (whose NAPI runs where the sender runs), with threaded
#   NAPI pinned to SW_CPU (`h_napi_threaded`).
# - A paced generator and the RFC 2544 search: `h_search TRIAL` steps the
#   offered rate (binary search) and keeps the highest with < LOSS_PCT
#   (0.1 %) loss. TRIAL RATE must print "offered delivered busy" where
#   busy is the share of SW_CPU in use during the trial (from /proc/stat,
#   `h_busy_start`/`h_busy_end`). A trial whose generator could not offer
#   the rate is reported, never counted as the switch's loss.
# - Repetition: `h_stats V...` prints "median spread_pct" (spread =
#   (max − min) / median).
#
# Tunables: GEN_CPU (0), SW_CPU (1), TRIAL_SECS (2), SEARCH_STEPS (7),
# LOSS_PCT (0.1), RUNS (3).

GEN_CPU=${GEN_CPU:-0}
SW_CPU=${SW_CPU:-1}
TRIAL_SECS=${TRIAL_SECS:-2}
SEARCH_STEPS=${SEARCH_STEPS:-7}
LOSS_PCT=${LOSS_PCT:-0.1}
RUNS=${RUNS:-3}

h_cpu_mask() { printf '%x' $((1 << $1)); }

# Pin process $1 and every thread it has now or makes later to SW_CPU.
h_pin_sw() { taskset -a -p -c "$SW_CPU" "$1" >/dev/null; }

# Steer the receive processing of device $2 in namespace $1 to CPU $3 (RPS
# on every receive queue).
h_rps() { # ns dev cpu
  local q
  for q in $(ip netns exec "$1" sh -c "ls -d /sys/class/net/$2/queues/rx-*"); do
    ip netns exec "$1" sh -c "echo $(h_cpu_mask "$3") > $q/rps_cpus"
  done
}

# Threaded NAPI for device $2 in namespace $1, its kthreads pinned to
# SW_CPU. A veth with an XDP program receives in NAPI, scheduled on the CPU
# that transmitted: without this, the XDP program and AF_XDP copy of a
# frame the generator sent would run on the generator's core.
h_napi_threaded() { # ns dev
  ip netns exec "$1" sh -c "echo 1 > /sys/class/net/$2/threaded" 2>/dev/null || return 0
  local p
  for p in $(pgrep -f "^napi/$2-" || true); do taskset -p -c "$SW_CPU" "$p" >/dev/null; done
}

# Busy jiffies of SW_CPU (everything but idle and iowait).
h_cpu_jiffies() {
  awk -v c="cpu$SW_CPU" '$1 == c { print $2 + $3 + $4 + $7 + $8 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat
}
h_busy_start() { read -r H_B0 H_T0 < <(h_cpu_jiffies); }
# Share of SW_CPU busy since h_busy_start, 0..1.
h_busy_end() {
  local b1 t1
  read -r b1 t1 < <(h_cpu_jiffies)
  python3 -c "print('%.3f' % (($b1 - $H_B0) / max($t1 - $H_T0, 1)))"
}

# RFC 2544 search. $1 is a function: `$1 RATE` runs one trial at RATE
# offered packets per second and prints "offered delivered busy". Searches
# between LO (default 10 000) and HI (default 2 000 000) pps; prints
# "rate busy trials limited" — the highest delivered rate of a trial with
# loss under LOSS_PCT, the SW_CPU share in that trial, the number of
# trials, and 1 if the generator, not the path, was the limit (else 0). A
# trial is logged to stderr.
h_search() { # trial-fn [lo] [hi]
  local fn=$1 lo=${2:-10000} hi=${3:-2000000} best=0 best_busy=0 n=0 rate out limited=0
  # First: is the low end clean at all?
  for _ in $(seq "$SEARCH_STEPS"); do
    rate=$(( (lo + hi) / 2 ))
    [ $n -eq 0 ] && rate=$lo
    out=$($fn "$rate")
    n=$((n + 1))
    read -r offered delivered busy <<<"$out"
    local ok
    # 2: the generator could not offer the rate (its own limit, not the
    # switch's): what it did offer is judged, and no higher rate is tried.
    ok=$(python3 -c "
r, o, d = $rate, $offered, $delivered
clean = o > 0 and d >= o * (1 - $LOSS_PCT / 100)
print(0 if not clean else 2 if o < r * 0.97 else 1)")
    printf '  trial %8d pps: offered %9d delivered %9d busy %s %s\n' "$rate" "$offered" "$delivered" "$busy" \
      "$(case $ok in 1) echo ok;; 2) echo 'ok (generator-limited)';; *) echo loss;; esac)" >&2
    if [ "$ok" = 2 ]; then
      if [ "$delivered" -gt "$best" ]; then best=$delivered best_busy=$busy; fi
      limited=1
      break
    elif [ "$ok" = 1 ]; then
      if [ "$delivered" -gt "$best" ]; then best=$delivered best_busy=$busy; fi
      lo=$rate
    else
      [ $n -eq 1 ] && break   # lossy at the low end already
      hi=$rate
    fi
  done
  echo "$best $best_busy $n $limited"
}

# "median spread_pct" of the values given.
h_stats() {
  python3 -c "
import statistics, sys
v = [float(x) for x in sys.argv[1:]]
m = statistics.median(v)
print('%.0f %.1f' % (m, (max(v) - min(v)) / m * 100 if m else 0))" "$@"
}
