#!/usr/bin/env bash
# The main job of napari-masksam, from a fresh machine: sets up .venv (shared
# with scripts/test.sh, see scripts/_setup_env.sh), then describes every
# model preset with `masksam-core info`.
set -euo pipefail

# shellcheck source=scripts/_setup_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/_setup_env.sh"
cd "$REPO_ROOT"

masksam_setup_venv

for preset in acdc synapse amos lite tiny; do
    masksam_log "masksam-core info --preset $preset"
    masksam-core info --preset "$preset"
done
masksam_log "Demo finished"
