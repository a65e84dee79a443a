#!/usr/bin/env bash
# The main job of napari-masksam, from a fresh machine: sets up .venv (shared with scripts/test.sh,
# see scripts/_setup_env.sh), then runs `masksam-core demo`: the bundled model `abdomen-ct-lite` on
# the bundled sample CT, writing the labels (NIfTI), a PNG montage and a Dice table to masksam_demo/.
# Extra arguments go to the demo (e.g. --device cuda, --overwrite, --step-size 0.5).
set -euo pipefail

# shellcheck source=scripts/_setup_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/_setup_env.sh"
cd "$REPO_ROOT"

masksam_setup_venv

out=masksam_demo  # the demo's own default; an --out among the arguments wins, as in argparse
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
        --out) out="${args[i + 1]:-$out}" ;;
        --out=*) out="${args[i]#--out=}" ;;
    esac
done

masksam_log "masksam-core demo --out masksam_demo $*"
masksam-core demo --out masksam_demo "$@"
masksam_log "Demo finished: see $out/montage.png and $out/dice.md"
