#!/usr/bin/env bash
# Run a pip command (all arguments) with -q and without the "Location '...' is ignored" warning that
# pip repeats for every requirement when the machine's pip config names a missing index folder.
# Every other line of stderr (real warnings, errors) still shows, and pip's exit status is kept.
set -u
exec 3>&1  # pip's stdout goes straight through; only its stderr passes the filter
"$@" -q 2>&1 1>&3 3>&- | { grep -v "^WARNING: Location '[^']*' is ignored" >&2 || true; }
exit "${PIPESTATUS[0]}"
