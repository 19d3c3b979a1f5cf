//! Completions and man pages: `deploy/assets.sh` (what packaging runs)
//! writes them for all three binaries, and each one knows every
//! subcommand the binary's own `--help` lists.

use std::path::Path;
use std::process::Command;

use certfleet_tests::process::bin;

const BINARIES: [&str; 3] = ["certfleet", "certfleet-coordinator", "certfleet-agent"];

/// The subcommands `NAME --help` lists (without `help`).
fn subcommands(name: &str) -> Vec<String> {
    let out = Command::new(bin(name)).arg("--help").output().unwrap();
    assert!(out.status.success(), "{name} --help");
    let help = String::from_utf8(out.stdout).unwrap();
    let listed: Vec<String> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_owned)
        .collect();
    assert!(!listed.is_empty(), "no commands in {name} --help:\n{help}");
    listed
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn every_binary_has_completions_and_man_pages_naming_every_subcommand() {
    let out = tempfile::tempdir().unwrap();
    let bin_dir = bin("certfleet").parent().unwrap().to_owned();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/assets.sh");
    let run = Command::new("sh")
        .arg(&script)
        .arg(&bin_dir)
        .arg(out.path())
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let at = |p: &str| out.path().join(p);
    for name in BINARIES {
        let commands = subcommands(name);
        let files = [
            at(&format!("completions/bash/{name}")),
            at(&format!("completions/zsh/_{name}")),
            at(&format!("completions/fish/{name}.fish")),
            at(&format!("man/man1/{name}.1")),
        ];
        for file in &files {
            let text = read(file);
            for command in &commands {
                assert!(
                    text.contains(command.as_str()),
                    "{} does not mention `{name} {command}`",
                    file.display()
                );
            }
        }
        // The hidden generators stay out of what users read.
        let page = read(&files[3]);
        assert!(
            !page.contains("completions") && !page.contains("Print the man page"),
            "{page}"
        );
        // A page for each subcommand, named like git's.
        for command in &commands {
            let page = at(&format!("man/man1/{name}-{command}.1"));
            assert!(
                read(&page).contains(".TH"),
                "{} is no man page",
                page.display()
            );
        }
    }
    // The bash completion really completes a subcommand.
    let bash = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source {}; COMP_WORDS=(certfleet rollo); COMP_CWORD=1; _certfleet certfleet rollo certfleet; echo \"${{COMPREPLY[@]}}\"",
            at("completions/bash/certfleet").display()
        ))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&bash.stdout).trim(),
        "rollout",
        "{}",
        String::from_utf8_lossy(&bash.stderr)
    );
}
