//! `certfleet snippet nginx|apache CERTIFICATE`: the port-80 web-server
//! config that answers HTTP-01 for a node's agent and redirects everything
//! else to HTTPS (see [`certfleet_agent::snippet`], which renders it).
//!
//! It needs no coordinator, so it runs before the admin socket is looked
//! up. It runs where the admin is, usually the coordinator's host, which
//! knows the certificate's names but not how each node answers HTTP-01. So
//! the names come from the coordinator's config (`sans` of the certificate's
//! `[[certificates]]`; `--server-name` overrides), and the node's side from
//! flags: `--webroot DIR` (the agent's `http01.webroot`) or `--proxy ADDR`
//! (its `http01.listen`), `--fullchain`/`--privkey` (its install targets;
//! default: certbot's layout, where the agent installs a certificate whose
//! config names no files). On the node itself, `certfleet-agent snippet`
//! reads all of that from the agent's own config instead.

use std::path::{Path, PathBuf};

use certfleet_agent::snippet::{Challenge, Listen, Snippet, TlsFiles, WebServer};
use certfleet_proto::cause_chain::Chain;
use clap::builder::{PossibleValuesParser, TypedValueParser};
use serde::Deserialize;

use crate::Outcome;
use crate::output::{errln, outln};
use crate::socket::DEFAULT_CONFIG;

/// Where the agent installs a certificate whose config lists no files:
/// `<root>/<name>/{fullchain,privkey}.pem`.
const DEFAULT_LIVE_ROOT: &str = certfleet_agent::config::DEFAULT_LIVE_ROOT;

/// `certfleet snippet`'s arguments.
#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("challenge").required(true).args(["webroot", "proxy"])))]
pub(crate) struct Args {
    /// The web server: nginx or apache.
    #[arg(value_parser = PossibleValuesParser::new(WebServer::NAMES)
        .map(|name| name.parse::<WebServer>().expect("one of WebServer::NAMES")))]
    server: WebServer,
    /// The certificate's name as configured in [[certificates]].
    certificate: String,
    /// Serve the challenge files the agent writes under this webroot (its
    /// http01.webroot, mode = "webroot").
    #[arg(long, value_name = "DIR")]
    webroot: Option<PathBuf>,
    /// Proxy the challenge path to the agent's own responder at this
    /// address (its http01.listen, mode = "standalone").
    #[arg(long, value_name = "ADDR")]
    proxy: Option<std::net::SocketAddr>,
    /// The names to answer for [default: the certificate's sans in the
    /// coordinator's config]: repeat, or separate with commas.
    #[arg(long = "server-name", value_name = "NAME", value_delimiter = ',')]
    server_names: Vec<String>,
    /// Where the web server listens for plain HTTP: a port, or ip:port.
    #[arg(long, value_name = "PORT|ADDR", default_value = "80")]
    listen: Listen,
    /// The full chain the agent installs, for the HTTPS server's lines
    /// [default: /etc/letsencrypt/live/CERTIFICATE/fullchain.pem].
    #[arg(long, value_name = "PATH")]
    fullchain: Option<PathBuf>,
    /// The private key the agent installs [default:
    /// /etc/letsencrypt/live/CERTIFICATE/privkey.pem].
    #[arg(long, value_name = "PATH")]
    privkey: Option<PathBuf>,
}

/// The part of the coordinator's config the snippet needs; every other
/// key is ignored here.
#[derive(Deserialize)]
struct NamesConfig {
    #[serde(default)]
    certificates: Vec<CertificateNames>,
}

#[derive(Deserialize)]
struct CertificateNames {
    name: String,
    #[serde(default)]
    sans: Vec<String>,
}

/// Prints the snippet `args` describe; `config` is `--config` or
/// `CERTFLEET_CONFIG`, read for the names when none are given.
pub(crate) fn run(args: &Args, config: Option<&Path>, json: bool) -> Outcome {
    match snippet(args, config) {
        Ok(snippet) => {
            let text = snippet.render();
            if json {
                outln!(
                    "{}",
                    serde_json::json!({
                        "server": snippet.server.name(),
                        "certificate": snippet.certificate,
                        "server_names": snippet.names,
                        "config": text,
                    })
                );
            } else {
                outln!("{}", text.trim_end());
            }
            Outcome::Ok
        }
        Err(e) => {
            errln!("certfleet snippet: {e}");
            Outcome::Usage
        }
    }
}

fn snippet(args: &Args, config: Option<&Path>) -> Result<Snippet, String> {
    let names = if args.server_names.is_empty() {
        names_from_config(&args.certificate, config)?
    } else {
        args.server_names.clone()
    };
    let challenge = match (&args.webroot, args.proxy) {
        (Some(root), None) => Challenge::Webroot(root.clone()),
        (None, Some(addr)) => Challenge::Proxy(addr),
        _ => unreachable!("clap requires exactly one of --webroot and --proxy"),
    };
    let live = TlsFiles::live(&Path::new(DEFAULT_LIVE_ROOT).join(&args.certificate));
    let tls = TlsFiles {
        fullchain: args.fullchain.clone().unwrap_or(live.fullchain),
        privkey: args.privkey.clone().unwrap_or(live.privkey),
    };
    Snippet::new(
        args.server,
        &args.certificate,
        names,
        args.listen,
        challenge,
        Some(tls),
    )
    .map_err(|e| Chain(&e).to_string())
}

/// The sans of `certificate` in the coordinator's config (`config`, else
/// [`DEFAULT_CONFIG`]).
fn names_from_config(certificate: &str, config: Option<&Path>) -> Result<Vec<String>, String> {
    let path = config.unwrap_or(Path::new(DEFAULT_CONFIG));
    let hint = "or pass the names with --server-name";
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "reading {} for certificate {certificate}'s names: {}; name the coordinator's config with --config, {hint}",
            path.display(),
            Chain(&e)
        )
    })?;
    let parsed: NamesConfig = toml::from_str(&text)
        .map_err(|e| format!("{}: {}", path.display(), e.to_string().trim_end()))?;
    let configured: Vec<&str> = parsed
        .certificates
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    parsed
        .certificates
        .iter()
        .find(|c| c.name == certificate)
        .map(|c| c.sans.clone())
        .ok_or_else(|| {
            format!(
                "certificate {certificate} is not in {}'s [[certificates]] (configured: {}); {hint}",
                path.display(),
                if configured.is_empty() {
                    "none".to_owned()
                } else {
                    configured.join(", ")
                }
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_the_coordinators_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("coordinator.toml");
        std::fs::write(
            &path,
            "state_dir = \"/x\"\n[[certificates]]\nname = \"cn\"\nsans = [\"cn.example.org\", \"cn-1.example.org\"]\nnodes = [\"a\"]\n",
        )
        .unwrap();
        assert_eq!(
            names_from_config("cn", Some(&path)).unwrap(),
            ["cn.example.org", "cn-1.example.org"]
        );
        let e = names_from_config("web", Some(&path)).unwrap_err();
        assert!(
            e.contains("configured: cn") && e.contains("--server-name"),
            "{e}"
        );
        let e = names_from_config("cn", Some(&dir.path().join("missing.toml"))).unwrap_err();
        assert!(
            e.contains("missing.toml") && e.contains("--server-name"),
            "{e}"
        );
    }
}
