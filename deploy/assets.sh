#!/bin/sh
# Writes the shell completions and man pages of certfleet's three binaries,
# generated from their clap definitions (hidden `completions SHELL` and
# `man DIR` subcommands), where the Debian packages take them from:
#
#   OUT/completions/bash/NAME          -> /usr/share/bash-completion/completions/NAME
#   OUT/completions/zsh/_NAME          -> /usr/share/zsh/vendor-completions/_NAME
#   OUT/completions/fish/NAME.fish     -> /usr/share/fish/vendor_completions.d/NAME.fish
#   OUT/man/man1/NAME.1, NAME-SUB.1    -> /usr/share/man/man1/
#
# Usage: deploy/assets.sh [BIN_DIR] [OUT]
#   BIN_DIR: where the built binaries are (default target/release)
#   OUT:     where to write (default target/assets)
set -eu
bin=${1:-target/release}
out=${2:-target/assets}
mkdir -p "$out/completions/bash" "$out/completions/zsh" "$out/completions/fish" "$out/man/man1"
for name in certfleet certfleet-coordinator certfleet-agent; do
    "$bin/$name" completions bash >"$out/completions/bash/$name"
    "$bin/$name" completions zsh >"$out/completions/zsh/_$name"
    "$bin/$name" completions fish >"$out/completions/fish/$name.fish"
    "$bin/$name" man "$out/man/man1"
done
echo "wrote completions and man pages into $out"
