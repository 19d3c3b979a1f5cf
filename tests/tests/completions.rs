//! What tab completion and the man pages offer an admin, for each of the
//! three binaries, checked against what the binary's own `--help` lists at
//! every level: the hidden `completions` and `man` subcommands (and any
//! hidden flag) must never be offered, and every visible subcommand and flag
//! must be.
//!
//! bash is run for real, in a shell without bash-completion. The zsh and
//! fish scripts are read: CI has neither shell.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use certfleet_tests::process::bin;

const BINARIES: [&str; 3] = ["certfleet", "certfleet-coordinator", "certfleet-agent"];

/// Subcommands no completion and no man page may offer, whatever `--help`
/// says.
const HIDDEN: [&str; 2] = ["completions", "man"];

/// One level of a binary's command tree, as `NAME PATH… --help` shows it.
#[derive(Debug)]
struct Level {
    path: Vec<String>,
    commands: BTreeSet<String>,
    flags: BTreeSet<String>,
    /// The `[possible values: …]` of its positional arguments.
    values: BTreeSet<String>,
}

/// The lines of `help`'s section `title` (`Commands:`, `Options:`).
fn section<'a>(help: &'a str, title: &str) -> Vec<&'a str> {
    help.lines()
        .skip_while(|l| *l != title)
        .skip(1)
        .take_while(|l| l.starts_with(' '))
        .collect()
}

/// `name`'s levels, from its top down, as its `--help` lists them. The
/// `help` subcommand is offered but not descended into.
fn levels(name: &str) -> Vec<Level> {
    let mut levels = Vec::new();
    let mut todo = vec![Vec::<String>::new()];
    while let Some(path) = todo.pop() {
        let out = Command::new(bin(name))
            .args(&path)
            .arg("--help")
            .output()
            .unwrap();
        let help = String::from_utf8(out.stdout).unwrap();
        assert!(out.status.success(), "{name} {path:?} --help: {help}");
        // `  issue   Obtain…`; a wrapped description is indented further.
        let commands: BTreeSet<String> = section(&help, "Commands:")
            .into_iter()
            .filter(|l| !l.starts_with("   "))
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_owned)
            .collect();
        // `  -v, --verbose  Show…` or `      --socket <PATH>  The…`.
        let flags: BTreeSet<String> = section(&help, "Options:")
            .into_iter()
            .filter(|l| l.starts_with("  -") || l.starts_with("      --"))
            .flat_map(|l| {
                l.split_whitespace()
                    .take_while(|w| w.starts_with('-') || w.starts_with('<'))
                    .filter(|w| w.starts_with('-'))
                    .map(|w| w.trim_end_matches(',').to_owned())
                    .collect::<Vec<_>>()
            })
            .collect();
        assert!(flags.contains("--help"), "{name} {path:?} --help:\n{help}");
        let values: BTreeSet<String> = section(&help, "Arguments:")
            .into_iter()
            .filter_map(|l| l.split_once("[possible values: "))
            .flat_map(|(_, list)| {
                let list = list.split(']').next().unwrap_or_default();
                list.split(", ").map(str::to_owned).collect::<Vec<_>>()
            })
            .collect();
        for command in commands.iter().filter(|c| *c != "help") {
            let mut next = path.clone();
            next.push(command.clone());
            todo.push(next);
        }
        levels.push(Level {
            path,
            commands,
            flags,
            values,
        });
    }
    levels
}

/// The output of `name completions shell`.
fn script(name: &str, shell: &str) -> String {
    let out = Command::new(bin(name))
        .args(["completions", shell])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{name} completions {shell}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `line` in bash without any startup file, so without
/// bash-completion's helpers, and returns what it printed.
fn bash(line: &str) -> String {
    let out = Command::new("bash")
        .args(["--norc", "--noprofile", "-c", line])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bash -c {line}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// What bash offers after `name PATH… ` (an empty word to complete), less
/// the `<NAME>` placeholders it shows for positional arguments.
fn bash_offers(script: &Path, name: &str, path: &[String]) -> BTreeSet<String> {
    let words: Vec<String> = std::iter::once(name)
        .chain(path.iter().map(String::as_str))
        .map(|w| format!("'{w}'"))
        .collect();
    let line = format!(
        "source '{}'; COMP_WORDS=({} ''); COMP_CWORD={}; _{} {name} '' {}; \
         printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script.display(),
        words.join(" "),
        words.len(),
        name.replace('-', "__"),
        words[words.len() - 1],
    );
    bash(&line)
        .lines()
        .filter(|w| !w.is_empty() && !w.starts_with('<') && !w.starts_with('['))
        .map(str::to_owned)
        .collect()
}

#[test]
fn bash_offers_exactly_what_help_lists_at_every_level() {
    let dir = tempfile::tempdir().unwrap();
    for name in BINARIES {
        let file = dir.path().join(name);
        std::fs::write(&file, script(name, "bash")).unwrap();
        let levels = levels(name);
        assert!(levels.len() > 3, "{name}: {levels:?}");
        for level in levels {
            let offered = bash_offers(&file, name, &level.path);
            let listed: BTreeSet<String> = [&level.commands, &level.flags, &level.values]
                .into_iter()
                .flatten()
                .cloned()
                .collect();
            assert_eq!(
                offered,
                listed,
                "`{} <TAB>` in bash against its --help",
                [vec![name.to_owned()], level.path.clone()]
                    .concat()
                    .join(" ")
            );
            for hidden in HIDDEN {
                assert!(!offered.contains(hidden), "{name} {:?}", level.path);
            }
        }
    }
    // The admin's daily commands, spelled out.
    let top = bash_offers(&dir.path().join("certfleet"), "certfleet", &[]);
    for command in ["issue", "rollout", "node", "status", "help", "--verbose"] {
        assert!(top.contains(command), "certfleet <TAB> lacks {command}");
    }
}

#[test]
fn the_bash_scripts_register_without_bash_completion() {
    let dir = tempfile::tempdir().unwrap();
    for name in BINARIES {
        let file = dir.path().join(name);
        std::fs::write(&file, script(name, "bash")).unwrap();
        let registered = bash(&format!("source '{}'; complete -p {name}", file.display()));
        let function = format!("_{}", name.replace('-', "__"));
        assert!(
            registered.contains(&format!("-F {function} "))
                && registered.trim_end().ends_with(name),
            "{registered}"
        );
    }
    // Past the subcommand, too: the subcommand's own flags, for a binary
    // whose name has a hyphen.
    let file = dir.path().join("certfleet-agent");
    let run = bash_offers(&file, "certfleet-agent", &["run".to_owned()]);
    assert!(run.contains("--log-format"), "{run:?}");
    let init = bash_offers(
        &dir.path().join("certfleet-coordinator"),
        "certfleet-coordinator",
        &["init".to_owned()],
    );
    assert!(init.contains("--agree-tos"), "{init:?}");
}

/// Subcommand names and flags a zsh script offers anywhere: the
/// `'name:about'` entries of its `commands=(…)` lists, and the
/// `'--long[…]'`, `'-s+[…]'`, `'*--long=[…]'` specs of `_arguments`.
fn zsh_offers(script: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let (mut commands, mut flags) = (BTreeSet::new(), BTreeSet::new());
    let mut in_commands = false;
    for line in script.lines() {
        if line.trim_end().ends_with("commands=(") {
            in_commands = true;
            continue;
        }
        if in_commands && line.trim() == ")" {
            in_commands = false;
            continue;
        }
        let Some(spec) = line.strip_prefix('\'') else {
            continue;
        };
        if in_commands {
            if let Some((command, _)) = spec.split_once(':') {
                commands.insert(command.to_owned());
            }
            continue;
        }
        // An exclusion list `(-a --b)` and a repeat `*` may come first.
        let spec = match spec.strip_prefix('(') {
            Some(rest) => rest.split_once(')').map_or("", |(_, s)| s),
            None => spec,
        };
        let spec = spec.trim_start_matches('*');
        if spec.starts_with('-') {
            let flag: String = spec
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            flags.insert(flag);
        }
    }
    (commands, flags)
}

/// Subcommand names and flags a fish script offers anywhere: `-a "name"`
/// of a `complete` line that offers no flag, and `-l long` / `-s x`.
fn fish_offers(script: &str, name: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let (mut commands, mut flags) = (BTreeSet::new(), BTreeSet::new());
    let prefix = format!("complete -c {name} ");
    for line in script.lines().filter(|l| l.starts_with(&prefix)) {
        let words: Vec<&str> = line.split(' ').collect();
        let mut offers_flag = false;
        for pair in words.windows(2) {
            match pair[0] {
                "-l" => flags.insert(format!("--{}", pair[1])),
                "-s" => flags.insert(format!("-{}", pair[1])),
                _ => continue,
            };
            offers_flag = true;
        }
        if !offers_flag && let Some((_, rest)) = line.split_once(" -a \"") {
            let command = rest.split('"').next().unwrap_or_default();
            commands.insert(command.to_owned());
        }
    }
    (commands, flags)
}

#[test]
fn zsh_and_fish_offer_only_and_all_of_what_help_lists() {
    for name in BINARIES {
        let levels = levels(name);
        let listed_commands: BTreeSet<String> =
            levels.iter().flat_map(|l| l.commands.clone()).collect();
        let listed_flags: BTreeSet<String> = levels.iter().flat_map(|l| l.flags.clone()).collect();
        for hidden in HIDDEN {
            assert!(
                !listed_commands.contains(hidden),
                "{name} --help lists {hidden}"
            );
        }
        let zsh = script(name, "zsh");
        let fish = script(name, "fish");
        for (shell, (commands, flags)) in [
            ("zsh", zsh_offers(&zsh)),
            ("fish", fish_offers(&fish, name)),
        ] {
            assert_eq!(commands, listed_commands, "{name}'s {shell} subcommands");
            assert_eq!(flags, listed_flags, "{name}'s {shell} flags");
        }
    }
}

/// The entries of a man page's SUBCOMMANDS section (`certfleet\-node(1)`
/// gives `node`), for the page of `prefix`.
fn man_subcommands(page: &str, prefix: &str) -> BTreeSet<String> {
    let escaped = format!("{}\\-", prefix.replace('-', "\\-"));
    page.lines()
        .skip_while(|l| *l != ".SH SUBCOMMANDS")
        .skip(1)
        .take_while(|l| !l.starts_with(".SH"))
        .filter_map(|l| l.strip_prefix(&escaped)?.strip_suffix("(1)"))
        .map(|c| c.replace("\\-", "-"))
        .collect()
}

#[test]
fn man_pages_exist_for_and_list_exactly_the_visible_subcommands() {
    for name in BINARIES {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(bin(name))
            .arg("man")
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pages: BTreeSet<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        let levels = levels(name);
        let expected: BTreeSet<String> = levels
            .iter()
            .map(|l| {
                let stem: Vec<&str> = std::iter::once(name)
                    .chain(l.path.iter().map(String::as_str))
                    .collect();
                format!("{}.1", stem.join("-"))
            })
            .collect();
        assert_eq!(pages, expected, "{name}'s man pages");
        for level in &levels {
            let stem: Vec<&str> = std::iter::once(name)
                .chain(level.path.iter().map(String::as_str))
                .collect();
            let stem = stem.join("-");
            let page = std::fs::read_to_string(dir.path().join(format!("{stem}.1"))).unwrap();
            let mut commands = level.commands.clone();
            commands.remove("help");
            assert_eq!(man_subcommands(&page, &stem), commands, "{stem}.1");
            for hidden in HIDDEN {
                assert!(
                    !page.contains(&format!("{}\\-{hidden}(1)", stem.replace('-', "\\-"))),
                    "{stem}.1 lists {hidden}"
                );
            }
        }
    }
}
