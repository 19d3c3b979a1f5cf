//! `--installs N`: what a distribute to N agents costs the disk alone.
//!
//! N of the agent's own installers (`certfleet_agent::install::Installer`),
//! each with a state directory and four certbot-style targets of its own,
//! as N agents on this machine have, install a new version at the same
//! moment, one thread each: the archive, the temps, the journal, the
//! renames and every fsync of a real install, without the network, TLS
//! or the coordinator. Then one installer alone, for a node's own disk.

use std::path::Path;
use std::time::Instant;

use certfleet_agent::config::{CertificateTargets, Content, TargetFile};
use certfleet_agent::install::Installer;

use crate::median;

/// Installs measured per row (after one that creates the files).
const VERSIONS: u32 = 5;

pub(crate) fn bench(n: usize) -> anyhow::Result<()> {
    let key = rcgen::KeyPair::generate()?;
    let cert =
        rcgen::CertificateParams::new(vec!["bench.example.org".to_owned()])?.self_signed(&key)?;
    let (chain, key) = (cert.pem(), key.serialize_pem());
    println!();
    println!(
        "| installers on one disk, each its own files | median ms of {VERSIONS} new versions |"
    );
    println!("|---|---:|");
    for count in [n, 1] {
        let dir = tempfile::Builder::new()
            .prefix("certfleet-installs-")
            .tempdir()?;
        let installers = (0..count)
            .map(|i| installer(&dir.path().join(i.to_string())))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut times = Vec::new();
        for version in 1..=VERSIONS + 1 {
            let start = Instant::now();
            std::thread::scope(|s| {
                let running: Vec<_> = installers
                    .iter()
                    .map(|i| s.spawn(|| i.install("cn", version, &chain, &key, &[])))
                    .collect();
                running
                    .into_iter()
                    .try_for_each(|r| r.join().expect("an install panicked").map(drop))
            })?;
            if version > 1 {
                times.push(start.elapsed().as_millis() as u64);
            }
        }
        println!("| {count} at once | {} |", median(times));
    }
    Ok(())
}

/// An installer whose state and targets (a `live_dir` of four files, as
/// the bench's agents have) live under `dir`.
fn installer(dir: &Path) -> anyhow::Result<Installer> {
    let file = |content, name: &str, mode| TargetFile {
        content,
        path: dir.join("live").join(name),
        owner: "root".to_owned(),
        uid: 0,
        group: "root".to_owned(),
        gid: 0,
        mode,
        dir_owner: None,
    };
    let targets = CertificateTargets {
        name: "cn".to_owned(),
        files: vec![
            file(Content::Cert, "cert.pem", 0o644),
            file(Content::Chain, "chain.pem", 0o644),
            file(Content::Fullchain, "fullchain.pem", 0o644),
            file(Content::Privkey, "privkey.pem", 0o600),
        ],
        services: Vec::new(),
    };
    Ok(Installer::open(&dir.join("state"), &[targets])?)
}
