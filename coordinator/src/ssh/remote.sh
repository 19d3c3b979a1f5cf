#!/bin/sh
# certfleet's remote helper: the agent's work on a node reached over SSH.
#
# The coordinator runs it as `sh -c SCRIPT certfleet-remote OP` (or, for a
# non-root login, `sudo -n /usr/local/lib/certfleet/remote.sh OP`). OP is
# the only argument. Everything else (paths, tokens, file contents, argv)
# comes on standard input, one item per line, and is never evaluated: it
# is only ever expanded inside double quotes. File contents travel as one
# base64 line each.
#
# The rules are the agent's: refuse a symlink, never follow one; every
# directory above a target is root's (or the file's dir_owner's) and
# writable by no one else; files are written to a temporary file in the
# target's own directory, given their owner, group and mode, then renamed.
set -eu
umask 077
export LC_ALL=C

fail() {
	printf 'certfleet-remote: %s\n' "$*" >&2
	exit 3
}

# Reads one line of standard input into the variable named $1; fails with
# $2 when input ended.
need() {
	IFS= read -r "$1" || fail "input ended early: expected $2"
}

# No path may hold a newline (it could not travel here) or a `..`.
check_abs() {
	case $1 in
	/*) ;;
	*) fail "$1: not an absolute path" ;;
	esac
	case /$1/ in
	*/../*) fail "$1: holds .." ;;
	esac
}

# Checks the directory $1 and every one above it: none is a symlink, each
# is a directory owned by root or by uid $2 (empty: root only) and
# writable by no other user (a sticky directory of root's excepted, as
# /tmp). Makes the missing ones (root's, 0755).
check_dirs() {
	dir=$1
	allowed=$2
	walked=
	rest=${dir#/}
	while :; do
		case $rest in
		'') break ;;
		*/*) part=${rest%%/*}; rest=${rest#*/} ;;
		*) part=$rest; rest= ;;
		esac
		[ -n "$part" ] || continue
		walked=$walked/$part
		if [ -L "$walked" ]; then
			fail "$walked: is a symlink; refusing to follow it"
		fi
		if [ ! -e "$walked" ]; then
			mkdir -m 0755 -- "$walked" || fail "$walked: cannot make the directory"
		fi
		[ -d "$walked" ] || fail "$walked: not a directory"
		owner=$(stat -c %u -- "$walked")
		perm=$(stat -c %a -- "$walked")
		if [ "$owner" != 0 ] && [ "$owner" != "$allowed" ]; then
			fail "$walked: owned by uid $owner, not root; another user could swap what lies below"
		fi
		# Sticky and root's (/tmp): others cannot rename what is not theirs.
		if [ $((0$perm & 022)) -ne 0 ] && ! { [ "$owner" = 0 ] && [ $((0$perm & 01000)) -ne 0 ]; }; then
			fail "$walked: writable by group or others (mode $perm); another user could swap what lies below"
		fi
	done
}

# Goes into directory $1 without following a symlink on the way, and
# checks it is where it was asked to be.
enter() {
	cd -P -- "$1" || fail "$1: cannot enter"
	[ "$(pwd -P)" = "$1" ] || fail "$1: resolves to $(pwd -P); a symlink lies on the way"
}

# The webroot's .well-known/acme-challenge, entered. The webroot may be
# anyone's (the web server's user owns it on Debian), so every step below
# it is checked for symlinks, made if missing, and entered by `cd -P` with
# the result compared.
challenge_dir() {
	need webroot "the webroot"
	check_abs "$webroot"
	[ -d "$webroot" ] && [ ! -L "$webroot" ] || fail "$webroot: the webroot is missing or a symlink"
	enter "$webroot"
	for d in .well-known acme-challenge; do
		if [ -L "$d" ]; then
			fail "$(pwd -P)/$d: is a symlink; refusing to follow it"
		fi
		[ -d "$d" ] || mkdir -m 0755 -- "$d" || fail "$(pwd -P)/$d: cannot make it"
		expect=$(pwd -P)/$d
		enter "$expect"
	done
}

# A token is base64url (RFC 8555 section 8.1); anything else is refused
# before it could name a path.
check_token() {
	case $1 in
	'' | *[!A-Za-z0-9_-]*) fail "token ${1}: not base64url" ;;
	esac
}

op_place() {
	challenge_dir
	while IFS=' ' read -r token keyauth; do
		check_token "$token"
		case $keyauth in
		"$token".*) ;;
		*) fail "token $token: its key authorization does not start with it" ;;
		esac
		if [ -L "$token" ]; then
			fail "$(pwd -P)/$token: is a symlink; refusing to replace it"
		fi
		tmp=$(mktemp ./.certfleet-token.XXXXXX)
		printf '%s' "$keyauth" >"$tmp"
		chmod 0644 "$tmp"
		mv -f -T -- "$tmp" "$token"
	done
}

op_remove() {
	challenge_dir
	removed=0
	while IFS= read -r token; do
		check_token "$token"
		if [ -L "$token" ]; then
			fail "$(pwd -P)/$token: is a symlink; refusing to touch it"
		fi
		if [ -f "$token" ]; then
			rm -f -- "$token"
			removed=$((removed + 1))
		fi
	done
	echo "$removed"
}

# Input per file: path, owner, group, octal mode, dir_owner (may be
# empty), the content in base64. Every file is written to a temporary file
# beside its target first; only when all are written are they renamed, so
# the certificate and its key change together. Prints "SHA256 PATH" per
# file.
op_install() {
	n=0
	while IFS= read -r path; do
		need owner "the owner of $path"
		need group "the group of $path"
		need mode "the mode of $path"
		need dir_owner "the directory owner of $path"
		need content "the content of $path"
		check_abs "$path"
		case $mode in
		'' | *[!0-7]*) fail "$path: mode $mode is not octal" ;;
		esac
		allowed=
		if [ -n "$dir_owner" ]; then
			allowed=$(id -u -- "$dir_owner") || fail "$path: no user named $dir_owner on this node"
		fi
		dir=${path%/*}
		[ -n "$dir" ] || dir=/
		name=${path##*/}
		check_dirs "$dir" "$allowed"
		enter "$dir"
		if [ -L "$name" ]; then
			fail "$path: is a symlink; refusing to replace it"
		fi
		if [ -e "$name" ] && [ ! -f "$name" ]; then
			fail "$path: is not a regular file"
		fi
		tmp=$(mktemp ./.certfleet-install.XXXXXX)
		printf '%s\n' "$content" | base64 -d >"$tmp" || fail "$path: content is not base64"
		chown -- "$owner:$group" "$tmp" || { rm -f -- "$tmp"; fail "$path: cannot give it to $owner:$group"; }
		chmod -- "$mode" "$tmp"
		n=$((n + 1))
		eval "dir_$n=\$dir; tmp_$n=\${tmp#./}; name_$n=\$name"
	done
	# Each rename happens inside the directory entered and checked above,
	# by name, so a path swapped meanwhile leads nowhere else.
	i=1
	while [ "$i" -le "$n" ]; do
		eval "dir=\$dir_$i; tmp=\$tmp_$i; name=\$name_$i"
		enter "$dir"
		[ ! -L "$name" ] || fail "$dir/$name: became a symlink; refusing to replace it"
		mv -f -T -- "$tmp" "$name"
		i=$((i + 1))
	done
	sync
	i=1
	while [ "$i" -le "$n" ]; do
		eval "dir=\$dir_$i; name=\$name_$i"
		enter "$dir"
		printf '%s %s\n' "$(sha256sum <"$name" | cut -d' ' -f1)" "${dir%/}/$name"
		i=$((i + 1))
	done
}

# Input: paths. Prints "SHA256 PATH", or "- PATH" for a path that is not
# a regular file (missing, a symlink).
op_hash() {
	while IFS= read -r path; do
		check_abs "$path"
		if [ -L "$path" ] || [ ! -f "$path" ]; then
			printf '%s %s\n' - "$path"
		else
			printf '%s %s\n' "$(sha256sum <"$path" | cut -d' ' -f1)" "$path"
		fi
	done
}

# Input: "SHA256 PATH" lines. Removes each file that still has that hash;
# prints "removed PATH" or "kept PATH" for one that changed since.
op_delete() {
	while IFS=' ' read -r want path; do
		check_abs "$path"
		if [ -L "$path" ] || [ ! -f "$path" ]; then
			printf 'kept %s\n' "$path"
			continue
		fi
		have=$(sha256sum <"$path" | cut -d' ' -f1)
		if [ "$have" = "$want" ]; then
			rm -f -- "$path"
			printf 'removed %s\n' "$path"
		else
			printf 'kept %s\n' "$path"
		fi
	done
}

# Input: a timeout in seconds, then one argv element per line. Runs the
# command without a shell, bounded by the timeout.
op_run() {
	need secs "the timeout"
	case $secs in
	'' | *[!0-9]*) fail "timeout $secs: not a number of seconds" ;;
	esac
	set --
	while IFS= read -r arg; do
		set -- "$@" "$arg"
	done
	[ "$#" -gt 0 ] || fail "no command given"
	exec timeout -k 5 "$secs" "$@" </dev/null 2>&1
}

[ "$#" -eq 1 ] || fail "usage: remote.sh place|remove|install|hash|delete|run"
case $1 in
place) op_place ;;
remove) op_remove ;;
install) op_install ;;
hash) op_hash ;;
delete) op_delete ;;
run) op_run ;;
*) fail "unknown operation $1" ;;
esac
