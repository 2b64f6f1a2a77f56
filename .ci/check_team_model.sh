#!/usr/bin/env bash
# Checks the Promela model of the thread team's job posting and barrier (csrc/fusedrnn/cpu/threads.pml) with
# SPIN. The protocol of threads.cpp must pass an exhaustive safety search (assertions, invalid end states)
# and a liveness search (the `terminates` claim); the protocol it replaced (-DOLD_PROTOCOL) must fail,
# so the model demonstrably can (the check's time: bench/NOTES.md, "CI's time, stage by stage").
# Installs the Debian package spin when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
model="$PWD/csrc/fusedrnn/cpu/threads.pml"

if ! command -v spin >/dev/null 2>&1; then
  sudo=()
  if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then sudo=(sudo -n); fi
  { "${sudo[@]}" apt-get update -qq && "${sudo[@]}" apt-get install -y -qq spin; } >/dev/null 2>&1 || true
  if ! command -v spin >/dev/null 2>&1; then
    echo "check_team_model: spin is missing and 'apt-get install spin' failed; install SPIN (spinroot.com)" >&2
    exit 1
  fi
fi
if ! command -v gcc >/dev/null 2>&1; then
  echo "check_team_model: gcc is needed to compile SPIN's verifier" >&2
  exit 1
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp "$model" "$work/threads.pml"
cd "$work"

# pan's report says the search covered the whole state space.
complete() { ! grep -q -e "Search not completed" -e "max search depth too small" -e "out of memory" "$1"; }
first() { sed -n "$2" "$1" | head -n 1; }
fail() {
  cat "$1"
  echo "check_team_model: $2" >&2
  exit 1
}

# The protocol as it is: every state, no assertion fails, no invalid end state (deadlock).
spin -a threads.pml >/dev/null
gcc -O2 -DSAFETY -DNOCLAIM -o pan_safety pan.c
./pan_safety -m1000000 >safety.txt 2>&1 || true
if ! grep -q "errors: 0" safety.txt || ! complete safety.txt; then
  [ -f threads.pml.trail ] && spin -t -p threads.pml | tail -n 60 >>safety.txt
  fail safety.txt "the safety search of the team protocol failed"
fi
states=$(first safety.txt 's/^ *\([0-9]*\) states, stored.*/\1/p')
depth=$(first safety.txt 's/.*depth reached \([0-9]*\),.*/\1/p')

# Liveness, <> finished over every run: an acceptance cycle would be a run that never finishes (a
# deadlock counts, as a run stuck in its last state).
gcc -O2 -o pan_live pan.c
./pan_live -a -m2000000 >live.txt 2>&1 || true
if ! grep -q "errors: 0" live.txt || ! complete live.txt; then
  fail live.txt "the liveness search of the team protocol failed"
fi

# The old protocol (the generation, then job_threads_ and job_ in later loads) must give a
# counterexample; -i shortens it to the fewest steps.
spin -a -DOLD_PROTOCOL threads.pml >/dev/null
gcc -O2 -DSAFETY -DNOCLAIM -DREACH -o pan_old pan.c
rm -f threads.pml.trail
./pan_old -i -m1000000 >old.txt 2>&1 || true
if grep -q "errors: 0" old.txt || [ ! -f threads.pml.trail ]; then
  fail old.txt "the old protocol shows no error, so the model cannot tell the protocols apart"
fi
spin -DOLD_PROTOCOL -t -p threads.pml >trail.txt 2>&1 || true
steps=$(first trail.txt 's/^spin: trail ends after \([0-9]*\) steps.*/\1/p')
echo "old protocol counterexample, $steps steps; those on team state (pids 1-3 are ranks 1-3;"
echo "ran[j] = ...: a rank starts job j):"
shared='post = |job_ = |job_threads = |pending = |\(\(\(n==1|seen = |\(\(rank<|j = job_|ran\[j\] = '
step='^ *([0-9]+):\s+proc +([0-9]+) \(([a-z]+):1\) threads\.pml:([0-9]+) \(state [0-9]+\)\s+'
grep -E "\[($shared)|Error" trail.txt | sed -E "s/$step/  \1: \3 \2, line \4: /" || true
grep -m 1 "text of failed assertion" trail.txt || true

echo "team model: $states states (depth $depth), 0 errors, liveness 0 errors;" \
  "old protocol: counterexample found ($steps steps)"
