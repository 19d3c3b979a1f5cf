//! Shell completions and man pages for every certfleet binary, generated
//! from the same clap definitions that parse their arguments, so they can
//! never disagree with `--help`.
//!
//! Each binary flattens [`Docs`] into its subcommands, hidden from `--help`
//! and the man pages (clap_complete still offers them in completions). `deploy/assets.sh` runs all three
//! binaries and writes what the Debian packages install into
//! `target/assets/`:
//!
//! - `completions/bash/NAME`, `completions/zsh/_NAME`,
//!   `completions/fish/NAME.fish` for NAME in `certfleet`,
//!   `certfleet-coordinator` and `certfleet-agent`;
//! - `man/man1/NAME.1`, and `NAME-SUBCOMMAND.1` for every subcommand.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::builder::TypedValueParser;
use clap_complete::Shell;

/// The hidden subcommands that print or write these files.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Docs {
    /// Print the completion script for SHELL (bash, zsh or fish).
    #[command(hide = true)]
    Completions {
        #[arg(value_parser = clap::builder::PossibleValuesParser::new(SHELLS)
            .map(|s| s.parse::<Shell>().expect("one of SHELLS")))]
        shell: Shell,
    },
    /// Print the man page, or write one per (sub)command into DIR.
    #[command(hide = true)]
    Man {
        /// Where to write NAME.1 and NAME-SUBCOMMAND.1; without it, NAME.1
        /// goes to standard output.
        dir: Option<PathBuf>,
    },
}

/// The shells completions are generated for.
pub const SHELLS: [&str; 3] = ["bash", "zsh", "fish"];

impl Docs {
    /// Prints or writes what was asked for `cmd` (the binary's
    /// `Args::command()`); an error names what could not be written.
    pub fn run(&self, cmd: clap::Command) -> Result<(), String> {
        match self {
            Self::Completions { shell } => write_stdout(&completion_script(cmd, *shell)),
            Self::Man { dir: None } => {
                let mut out = Vec::new();
                clap_mangen::Man::new(cmd)
                    .render(&mut out)
                    .map_err(|e| format!("rendering the man page: {e}"))?;
                write_stdout(&out)
            }
            Self::Man { dir: Some(dir) } => man_pages(cmd, dir),
        }
    }
}

/// The completion script of `cmd` for `shell`.
fn completion_script(cmd: clap::Command, shell: Shell) -> Vec<u8> {
    // clap's `help` subcommand would list the hidden ones in completions;
    // `--help` is completed all the same.
    let mut cmd = cmd.disable_help_subcommand(true);
    let name = cmd.get_name().to_owned();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, &name, &mut out);
    out
}

/// Writes NAME.1 and a page per visible subcommand, named like `git`'s
/// (`certfleet-node-add.1`), into `dir`.
fn man_pages(cmd: clap::Command, dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    clap_mangen::generate_to(cmd, dir)
        .map_err(|e| format!("writing man pages into {}: {e}", dir.display()))
}

/// A closed pipe (`| head`) is no failure.
fn write_stdout(bytes: &[u8]) -> Result<(), String> {
    match std::io::stdout().lock().write_all(bytes) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(format!("writing to standard output: {e}"))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser, Subcommand};

    #[derive(Parser)]
    #[command(name = "demo")]
    struct Args {
        #[command(subcommand)]
        command: Command,
    }

    #[derive(Subcommand)]
    enum Command {
        /// Do a thing.
        Thing,
        #[command(flatten)]
        Docs(Docs),
    }

    #[test]
    fn the_hidden_subcommands_parse_and_stay_out_of_the_pages() {
        let args = Args::try_parse_from(["demo", "completions", "zsh"]).unwrap();
        assert!(matches!(
            args.command,
            Command::Docs(Docs::Completions { shell: Shell::Zsh })
        ));
        assert!(Args::try_parse_from(["demo", "completions", "tcsh"]).is_err());
        let dir = tempfile::tempdir().unwrap();
        man_pages(Args::command(), dir.path()).unwrap();
        let mut pages: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        pages.sort();
        assert_eq!(pages, ["demo-thing.1", "demo.1"]);
        let bash = String::from_utf8(completion_script(Args::command(), Shell::Bash)).unwrap();
        assert!(bash.contains("thing"), "{bash}");
    }
}
