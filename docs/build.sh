#!/usr/bin/env bash
# Builds the API reference (pdoc, Google-style docstrings) into build/api; fails on any pdoc warning.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-build/api}
rm -rf "$out"
log=$(mktemp)
# PDOC_ALLOW_EXEC: TensorFlow's import calls `uname -p`, which pdoc otherwise suppresses with a warning.
PDOC_ALLOW_EXEC=1 TF_CPP_MIN_LOG_LEVEL=3 python -m pdoc tf_woodfisher '!tf_woodfisher.keras3' --docformat google \
    -o "$out" 2> "$log" || { cat "$log"; exit 1; }
# Keras 3 entry in its own process (the first run has switched its process to tf_keras).
PDOC_ALLOW_EXEC=1 TF_CPP_MIN_LOG_LEVEL=3 python -m pdoc tf_woodfisher.keras3 --docformat google \
    -o "$out/keras3" 2>> "$log" || { cat "$log"; exit 1; }
if grep -E "^Warn|Warning: " "$log" | grep -v "absl::InitializeLog"; then
    echo "pdoc warnings (above): fix the docstrings" >&2
    exit 1
fi
echo "API reference: $out/index.html"
