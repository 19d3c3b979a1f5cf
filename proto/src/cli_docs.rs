//! Shell completions and man pages for every certfleet binary, generated
//! from the same clap definitions that parse their arguments, so they can
//! never disagree with `--help`.
//!
//! Each binary flattens [`Docs`] into its subcommands, hidden from `--help`,
//! the man pages and the completions (see [`visible`]). `deploy/assets.sh`
//! runs all three binaries and writes what the Debian packages install into
//! `target/assets/`:
//!
//! - `completions/bash/NAME`, `completions/zsh/_NAME`,
//!   `completions/fish/NAME.fish` for NAME in `certfleet`,
//!   `certfleet-coordinator` and `certfleet-agent`;
//! - `man/man1/NAME.1`, and `NAME-SUBCOMMAND.1` for every visible
//!   subcommand.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::builder::TypedValueParser;
use clap::{Arg, ArgGroup, Command};
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
    pub fn run(&self, cmd: Command) -> Result<(), String> {
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
fn completion_script(cmd: Command, shell: Shell) -> Vec<u8> {
    let mut cmd = visible(cmd);
    let name = cmd.get_name().to_owned();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, &name, &mut out);
    if shell == Shell::Bash {
        out = one_spelling_of_bash_states(&out, &name);
    }
    out
}

/// The bash script of a binary whose name has a hyphen, with every state
/// spelled one way.
///
/// clap_complete 4.6's bash script walks the words into a state named
/// after the path (`certfleet__agent__subcmd__run`), but spells the case
/// arm that completes that state with the binary's hyphen turned into the
/// subcommand separator (`certfleet__subcmd__agent__subcmd__run`). No arm
/// matches, so `certfleet-agent run --<TAB>` completes nothing. Every
/// occurrence is rewritten, so the script stays consistent should a later
/// clap_complete use either spelling throughout.
fn one_spelling_of_bash_states(script: &[u8], name: &str) -> Vec<u8> {
    const SEP: &str = "__subcmd__";
    let script = String::from_utf8_lossy(script);
    if !name.contains('-') {
        return script.into_owned().into_bytes();
    }
    let wrong = format!("{}{SEP}", name.replace('-', SEP));
    let right = format!("{}{SEP}", name.replace('-', "__"));
    script.replace(&wrong, &right).into_bytes()
}

/// `cmd` without its hidden subcommands and hidden arguments, at every
/// level, for the completion generators.
///
/// clap_complete offers every subcommand and flag a `Command` holds, hidden
/// or not (clap_mangen and `--help` leave them out), and clap can add to a
/// `Command` but not take anything out of it. So a level that hides
/// something is rebuilt from its visible parts ([`rebuilt`]); the other
/// levels are kept whole and only their subcommands are looked into. The
/// `help` subcommand clap adds when the copy is built then lists only what
/// is left.
///
/// `cmd` is unbuilt, as `CommandFactory::command()` returns it. A visible
/// argument that requires or conflicts with a hidden one would make clap's
/// debug assertions fail on the copy: hidden flags stand alone.
fn visible(cmd: Command) -> Command {
    let hides = cmd.get_subcommands().any(Command::is_hide_set)
        || cmd.get_arguments().any(Arg::is_hide_set);
    if hides {
        rebuilt(&cmd)
    } else {
        cmd.mut_subcommands(visible)
    }
}

/// A copy of `cmd` with what the completion generators read (name,
/// version, about, visible aliases, the settings that shape parsing, the
/// visible arguments and groups, the visible subcommands, each through
/// [`visible`]), without the hidden subcommands and arguments. What only
/// `--help` shows (headings, templates, author) is left out: the copy is
/// only ever turned into a completion script.
fn rebuilt(cmd: &Command) -> Command {
    let hidden: Vec<&clap::Id> = cmd
        .get_arguments()
        .filter(|a| a.is_hide_set())
        .map(Arg::get_id)
        .collect();
    let mut out = Command::new(leak(cmd.get_name()))
        .version(cmd.get_version().map(leak))
        .long_version(cmd.get_long_version().map(leak))
        .visible_aliases(cmd.get_visible_aliases().map(leak))
        .short_flag(cmd.get_short_flag())
        .visible_short_flag_aliases(cmd.get_visible_short_flag_aliases())
        .visible_long_flag_aliases(cmd.get_visible_long_flag_aliases().map(leak))
        .external_subcommand_value_parser(cmd.get_external_subcommand_value_parser().cloned())
        .no_binary_name(cmd.is_no_binary_name_set())
        .multicall(cmd.is_multicall_set())
        .propagate_version(cmd.is_propagate_version_set())
        .disable_version_flag(cmd.is_disable_version_flag_set())
        .disable_help_flag(cmd.is_disable_help_flag_set())
        .disable_help_subcommand(cmd.is_disable_help_subcommand_set())
        .arg_required_else_help(cmd.is_arg_required_else_help_set())
        .subcommand_required(cmd.is_subcommand_required_set())
        .allow_external_subcommands(cmd.is_allow_external_subcommands_set())
        .args_conflicts_with_subcommands(cmd.is_args_conflicts_with_subcommands_set())
        .subcommand_negates_reqs(cmd.is_subcommand_negates_reqs_set())
        .subcommand_precedence_over_arg(cmd.is_subcommand_precedence_over_arg_set())
        .args_override_self(cmd.is_args_override_self())
        .allow_missing_positional(cmd.is_allow_missing_positional_set())
        .dont_delimit_trailing_values(cmd.is_dont_delimit_trailing_values_set())
        .args(cmd.get_arguments().filter(|a| !a.is_hide_set()).cloned())
        .groups(cmd.get_groups().filter_map(|g| without_args(g, &hidden)))
        .subcommands(
            cmd.get_subcommands()
                .filter(|s| !s.is_hide_set())
                .cloned()
                .map(visible),
        );
    if let Some(long) = cmd.get_long_flag() {
        out = out.long_flag(leak(long));
    }
    if let Some(about) = cmd.get_about() {
        out = out.about(about.clone());
    }
    if let Some(about) = cmd.get_long_about() {
        out = out.long_about(about.clone());
    }
    if let Some(bin_name) = cmd.get_bin_name() {
        out = out.bin_name(bin_name.to_owned());
    }
    out
}

/// `group` without the arguments in `hidden`, or nothing if none is left.
/// Rebuilt only when it names a hidden one: its requires and conflicts
/// cannot be read back.
fn without_args(group: &ArgGroup, hidden: &[&clap::Id]) -> Option<ArgGroup> {
    if !group.get_args().any(|a| hidden.contains(&a)) {
        return Some(group.clone());
    }
    let args: Vec<clap::Id> = group
        .get_args()
        .filter(|a| !hidden.contains(a))
        .cloned()
        .collect();
    if args.is_empty() {
        return None;
    }
    Some(
        ArgGroup::new(group.get_id().clone())
            .args(args)
            .multiple(group.clone().is_multiple())
            .required(group.is_required_set()),
    )
}

/// A `'static` copy of `s`, which clap wants for a name it did not get
/// from a string literal (its `string` feature is off). [`rebuilt`] calls
/// it a few times per command, in a process that prints one script and
/// exits, so what leaks is a few hundred bytes.
fn leak(s: &str) -> &'static str {
    Box::leak(s.to_owned().into_boxed_str())
}

/// Writes NAME.1 and a page per visible subcommand, named like `git`'s
/// (`certfleet-node-add.1`), into `dir`.
fn man_pages(cmd: Command, dir: &Path) -> Result<(), String> {
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
        command: DemoCommand,
    }

    #[derive(Subcommand)]
    enum DemoCommand {
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
            DemoCommand::Docs(Docs::Completions { shell: Shell::Zsh })
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

    /// A binary with a hyphen in its name that hides a flag at two levels
    /// and a subcommand below the top, next to the hidden [`Docs`].
    #[derive(Parser)]
    #[command(name = "my-tool", version)]
    struct Hiding {
        /// Seen everywhere.
        #[arg(long, global = true)]
        shown: bool,
        #[arg(long, hide = true)]
        secret_flag: bool,
        #[command(subcommand)]
        command: HidingCommand,
    }

    #[derive(Subcommand)]
    enum HidingCommand {
        /// Has its own subcommands.
        Outer {
            /// Seen.
            #[arg(long)]
            loud: bool,
            #[arg(long, hide = true)]
            quiet_secret: bool,
            #[command(subcommand)]
            inner: Option<Inner>,
        },
        #[command(flatten)]
        Docs(Docs),
    }

    #[derive(Subcommand)]
    enum Inner {
        /// Seen.
        Inner,
        #[command(hide = true)]
        Backdoor,
    }

    /// Names of subcommands and flags [`Hiding`] hides, and of some it
    /// shows.
    const HIDDEN: [&str; 5] = [
        "completions",
        "man",
        "backdoor",
        "secret-flag",
        "quiet-secret",
    ];
    const SHOWN: [&str; 5] = ["outer", "inner", "loud", "shown", "version"];

    /// Every subcommand (`sub about`) and argument (`--long -s id global`)
    /// at every level of the built `cmd`, one line each, prefixed with its
    /// path; hidden ones only when `hidden`.
    fn tree(cmd: &Command, path: &str, hidden: bool, out: &mut Vec<String>) {
        for arg in cmd.get_arguments() {
            if hidden || !arg.is_hide_set() {
                out.push(format!(
                    "{path}: --{:?} -{:?} {} global={} hide={}",
                    arg.get_long(),
                    arg.get_short(),
                    arg.get_id(),
                    arg.is_global_set(),
                    arg.is_hide_set(),
                ));
            }
        }
        for sub in cmd.get_subcommands() {
            if hidden || !sub.is_hide_set() {
                let about = sub.get_about().map(ToString::to_string);
                out.push(format!("{path}: {} {about:?}", sub.get_name()));
                tree(sub, &format!("{path} {}", sub.get_name()), hidden, out);
            }
        }
    }

    fn built(mut cmd: Command) -> Command {
        cmd.build();
        cmd
    }

    #[test]
    fn the_copy_for_completions_keeps_all_that_is_visible_and_nothing_hidden() {
        let (mut shown, mut copy, mut copy_all) = (Vec::new(), Vec::new(), Vec::new());
        tree(&built(Hiding::command()), "my-tool", false, &mut shown);
        let visible = built(visible(Hiding::command()));
        tree(&visible, "my-tool", false, &mut copy);
        tree(&visible, "my-tool", true, &mut copy_all);
        assert_eq!(copy, shown);
        assert_eq!(copy_all, shown, "the copy still holds hidden parts");
        assert!(
            shown
                .iter()
                .any(|l| l == "my-tool outer: inner Some(\"Seen\")")
        );
        assert!(
            shown
                .iter()
                .any(|l| l.starts_with("my-tool outer inner: --Some(\"shown\")"))
        );
        // It parses what the binary parses, `--version` included.
        visible
            .clone()
            .try_get_matches_from(["my-tool", "outer", "--loud", "inner", "--shown"])
            .unwrap();
        let version = visible.try_get_matches_from(["my-tool", "--version"]);
        assert_eq!(
            version.unwrap_err().kind(),
            clap::error::ErrorKind::DisplayVersion
        );
    }

    #[test]
    fn no_script_offers_a_hidden_subcommand_or_flag() {
        for shell in SHELLS {
            let shell: Shell = shell.parse().unwrap();
            let script = String::from_utf8(completion_script(Hiding::command(), shell)).unwrap();
            // A candidate is a word of the script, a flag's without its
            // dashes (fish spells `--loud` as `-l loud`).
            let words: std::collections::BTreeSet<&str> = script
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                .map(|w| w.trim_start_matches('-'))
                .collect();
            for hidden in HIDDEN {
                assert!(
                    !words.contains(hidden),
                    "{shell} offers {hidden}:\n{script}"
                );
            }
            for shown in SHOWN {
                assert!(words.contains(shown), "{shell} lacks {shown}:\n{script}");
            }
        }
    }

    /// What bash offers for `words` (the last one being completed) with
    /// `script` loaded into a shell without bash-completion.
    fn bash_offers(script: &Path, words: &[&str]) -> Vec<String> {
        let cword = words.len() - 1;
        let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
        let line = format!(
            "source {}; COMP_WORDS=({}); COMP_CWORD={cword}; \
             _my__tool my-tool {} {}; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            script.display(),
            quoted.join(" "),
            quoted[cword],
            quoted[cword - 1],
        );
        let out = std::process::Command::new("bash")
            .args(["--norc", "--noprofile", "-c", &line])
            .output()
            .expect("running bash");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut offers: Vec<String> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect();
        offers.sort();
        offers
    }

    #[test]
    fn bash_completes_a_hyphenated_binarys_subcommands_and_their_flags() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("my-tool");
        std::fs::write(&script, completion_script(Hiding::command(), Shell::Bash)).unwrap();
        assert_eq!(
            bash_offers(&script, &["my-tool", ""]),
            [
                "--help",
                "--shown",
                "--version",
                "-V",
                "-h",
                "help",
                "outer"
            ]
        );
        assert_eq!(
            bash_offers(&script, &["my-tool", "outer", "--"]),
            ["--help", "--loud", "--shown"]
        );
        assert_eq!(
            bash_offers(&script, &["my-tool", "outer", "inner", "--"]),
            ["--help", "--shown"]
        );
    }

    #[test]
    fn no_man_page_for_or_about_what_is_hidden() {
        let dir = tempfile::tempdir().unwrap();
        man_pages(Hiding::command(), dir.path()).unwrap();
        let mut pages: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        pages.sort();
        assert_eq!(
            pages,
            ["my-tool-outer-inner.1", "my-tool-outer.1", "my-tool.1"]
        );
        for page in pages {
            let text = std::fs::read_to_string(dir.path().join(&page)).unwrap();
            for hidden in ["completions", "backdoor", "secret", "Print the man page"] {
                assert!(!text.contains(hidden), "{page} mentions {hidden}:\n{text}");
            }
        }
    }
}
