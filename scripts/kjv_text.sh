#!/usr/bin/env bash
# Writes a contiguous passage of the King James Bible (public domain, translated 1611) as plain
# prose: verse references stripped, the verses of a chapter joined into one paragraph, chapters
# separated by a blank line. The text comes from the Debian package bible-kjv-text (a compressed
# data file), read through the `bible` program of the package bible-kjv; setup.sh installs both.
#   bash scripts/kjv_text.sh [RANGE] > out.txt      RANGE default "Gen1:1-Gen5:32"
# examples/data/genesis.txt is the output for the default range (what RESULTS.md and the demo use).
set -euo pipefail
RANGE="${1:-Gen1:1-Gen5:32}"
if ! command -v bible >/dev/null 2>&1; then
    echo "kjv_text.sh: the 'bible' program is missing; install the Debian packages bible-kjv and bible-kjv-text" >&2
    exit 1
fi
# `bible -f` prints one verse per line as "Ge1:1 In the beginning ..."; the reference is dropped
# and a new chapter (verse 1) starts a new paragraph.
bible -f "$RANGE" | awk '
    match($0, /^[A-Za-z0-9]+[0-9]+:[0-9]+ /) {
        ref = substr($0, 1, RLENGTH - 1); text = substr($0, RLENGTH + 1)
        sub(/.*:/, "", ref)
        if (ref == "1" && started) printf "\n\n"
        else if (started) printf " "
        printf "%s", text; started = 1
        next
    }
    { if (NF) { printf "kjv_text.sh: unexpected line from bible: %s\n", $0 > "/dev/stderr"; exit 1 } }
    END { if (started) printf "\n" }'
