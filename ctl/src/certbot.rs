//! Reading a certbot lineage for `certfleet import --certbot DIR`, on the
//! admin's side: the coordinator never reads certbot's directory itself,
//! so it needs no access to `/etc/letsencrypt` and an admin can import a
//! copy taken from another host.
//!
//! certbot keeps a lineage NAME as
//!
//! ```text
//! DIR/renewal/NAME.conf
//! DIR/live/NAME/{cert,chain,fullchain,privkey}.pem -> ../../archive/NAME/…N.pem
//! ```
//!
//! The `live/` files are symlinks into `archive/`, which is normal, so they
//! are followed; whatever they lead to must be a regular file of a bounded
//! size. The domains come from the renewal conf: a `domains` list where
//! one was written, else the names of its `[[webroot_map]]` (what the
//! webroot plugin validated). certbot 2 writes neither for other plugins
//! (it renews for the names the certificate holds), and then the domains
//! are the certificate's own names, which [`DomainsFrom`] says.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use certfleet_proto::bundle::{Bundle, InvalidBundle, MAX_CHAIN_PEM_BYTES, MAX_KEY_PEM_BYTES};

/// Largest renewal conf read: certbot's are well under 2 KiB.
pub(crate) const MAX_CONF_BYTES: usize = 64 * 1024;

/// A lineage as read from certbot's directory.
pub(crate) struct Lineage {
    pub(crate) name: String,
    pub(crate) fullchain_pem: String,
    pub(crate) privkey_pem: String,
    pub(crate) domains: Vec<String>,
    pub(crate) domains_from: DomainsFrom,
}

/// Where a lineage's domains were read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DomainsFrom {
    /// The renewal conf's `domains`.
    Domains,
    /// The renewal conf's `[[webroot_map]]`.
    WebrootMap,
    /// The conf names none: the certificate's subjectAltNames.
    Certificate,
}

impl DomainsFrom {
    /// Where the domains came from, for the admin.
    pub(crate) fn describe(self, conf: &Path) -> String {
        match self {
            Self::Domains => format!("{}: domains", conf.display()),
            Self::WebrootMap => format!("{}: webroot_map", conf.display()),
            Self::Certificate => format!(
                "the certificate's names ({} lists no domains, as certbot 2 writes it)",
                conf.display()
            ),
        }
    }
}

/// Why a lineage could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LineageError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{}: is {what}, not a regular file; certbot's files are regular files (or, under live/, symlinks to them)",
        path.display()
    )]
    NotRegular { path: PathBuf, what: &'static str },
    #[error("{}: larger than {max} bytes, too large for a certbot file", path.display())]
    TooLarge { path: PathBuf, max: usize },
    #[error("{}: changed while it was read; try again", path.display())]
    Changed { path: PathBuf },
    #[error("{}: not UTF-8 text", path.display())]
    NotText { path: PathBuf },
    #[error(
        "{}: no renewal/*.conf, so no lineage; --certbot takes certbot's config directory (usually /etc/letsencrypt)",
        dir.display()
    )]
    NoLineage { dir: PathBuf },
    #[error(
        "{}: holds {} lineages ({}); pass --lineage NAME",
        dir.display(),
        names.len(),
        names.join(", ")
    )]
    SeveralLineages { dir: PathBuf, names: Vec<String> },
    #[error(
        "--lineage {0:?}: not a lineage name (certbot's are a file name: no '/', not starting with '.')"
    )]
    BadName(String),
    #[error("{}: line {line}: {reason}", path.display())]
    Conf {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{}: {source}", path.display())]
    Certificate {
        path: PathBuf,
        #[source]
        source: InvalidBundle,
    },
}

/// Reads lineage `name` (default: the only one) from certbot's config
/// directory `dir`.
pub(crate) fn read_lineage(dir: &Path, name: Option<&str>) -> Result<Lineage, LineageError> {
    let name = match name {
        Some(n) => check_name(n)?,
        None => only_lineage(dir)?,
    };
    let conf_path = conf_path(dir, &name);
    let conf =
        parse_conf(&read_bounded(&conf_path, MAX_CONF_BYTES)?).map_err(|(line, reason)| {
            LineageError::Conf {
                path: conf_path.clone(),
                line,
                reason,
            }
        })?;
    let live = dir.join("live").join(&name);
    let fullchain_path = live.join("fullchain.pem");
    let fullchain_pem = read_bounded(&fullchain_path, MAX_CHAIN_PEM_BYTES)?;
    let privkey_pem = read_bounded(&live.join("privkey.pem"), MAX_KEY_PEM_BYTES)?;
    let (domains, domains_from) = match (conf.domains, conf.webroot_map) {
        (Some(d), _) if !d.is_empty() => (d, DomainsFrom::Domains),
        (_, w) if !w.is_empty() => (w, DomainsFrom::WebrootMap),
        _ => {
            // The key is checked by the coordinator, against the names it
            // needs; here only the names are read.
            let bundle = Bundle::parse(&fullchain_pem, None, &[]).map_err(|source| {
                LineageError::Certificate {
                    path: fullchain_path.clone(),
                    source,
                }
            })?;
            (bundle.sans, DomainsFrom::Certificate)
        }
    };
    Ok(Lineage {
        name,
        fullchain_pem,
        privkey_pem,
        domains,
        domains_from,
    })
}

/// The renewal conf of lineage `name` in `dir`, for messages.
pub(crate) fn conf_path(dir: &Path, name: &str) -> PathBuf {
    dir.join("renewal").join(format!("{name}.conf"))
}

fn check_name(name: &str) -> Result<String, LineageError> {
    if name.is_empty() || name.starts_with('.') || name.contains(['/', '\0']) {
        return Err(LineageError::BadName(name.to_owned()));
    }
    Ok(name.to_owned())
}

/// The name of the only lineage in `dir` (from `renewal/*.conf`).
fn only_lineage(dir: &Path) -> Result<String, LineageError> {
    let renewal = dir.join("renewal");
    let entries = std::fs::read_dir(&renewal).map_err(|source| LineageError::Read {
        path: renewal.clone(),
        source,
    })?;
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| LineageError::Read {
            path: renewal.clone(),
            source,
        })?;
        if let Some(name) = entry
            .file_name()
            .to_str()
            .and_then(|f| f.strip_suffix(".conf"))
            .filter(|n| !n.is_empty() && !n.starts_with('.'))
        {
            names.push(name.to_owned());
        }
    }
    names.sort();
    match names.len() {
        0 => Err(LineageError::NoLineage {
            dir: dir.to_owned(),
        }),
        1 => Ok(names.remove(0)),
        _ => Err(LineageError::SeveralLineages {
            dir: dir.to_owned(),
            names,
        }),
    }
}

/// What a file's type is, for a refusal.
fn file_type_name(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() || t.is_char_device() {
        "a device"
    } else {
        "not a regular file"
    }
}

/// Reads `path` (following symlinks) as text: a regular file of at most
/// `max` bytes. The type is checked before opening, so a FIFO planted in
/// its place cannot block the open, and again on the open file, which
/// must be the one checked.
fn read_bounded(path: &Path, max: usize) -> Result<String, LineageError> {
    let read_err = |source| LineageError::Read {
        path: path.to_owned(),
        source,
    };
    let before = std::fs::metadata(path).map_err(read_err)?;
    if !before.is_file() {
        return Err(LineageError::NotRegular {
            path: path.to_owned(),
            what: file_type_name(&before),
        });
    }
    let file = std::fs::File::open(path).map_err(read_err)?;
    let opened = file.metadata().map_err(read_err)?;
    if !opened.is_file() || (opened.dev(), opened.ino()) != (before.dev(), before.ino()) {
        return Err(LineageError::Changed {
            path: path.to_owned(),
        });
    }
    let too_large = || LineageError::TooLarge {
        path: path.to_owned(),
        max,
    };
    if opened.len() > max as u64 {
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(opened.len() as usize);
    file.take(max as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() > max {
        return Err(too_large());
    }
    String::from_utf8(bytes).map_err(|_| LineageError::NotText {
        path: path.to_owned(),
    })
}

/// The parts of a renewal conf import uses.
#[derive(Debug, Default, PartialEq, Eq)]
struct RenewalConf {
    /// `domains = a, b` at the top or in `[renewalparams]`.
    domains: Option<Vec<String>>,
    /// The keys of `[renewalparams]`'s `[[webroot_map]]`, in order.
    webroot_map: Vec<String>,
}

/// Parses the subset of ConfigObj (the format certbot writes renewal confs
/// in) that renewal confs use: `key = value` lines, `#` comments, sections
/// `[name]` and subsections `[[name]]`, and comma-separated lists. An
/// error is (line number, reason).
fn parse_conf(text: &str) -> Result<RenewalConf, (usize, String)> {
    let mut conf = RenewalConf::default();
    // The section path: [] at the top, ["renewalparams"], then
    // ["renewalparams", "webroot_map"].
    let mut path: Vec<String> = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line_no = index + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with('[') {
            let depth = line.bytes().take_while(|&b| b == b'[').count();
            let name = line[depth..]
                .strip_suffix(&"]".repeat(depth))
                .map(str::trim)
                .filter(|n| !n.is_empty() && !n.contains(['[', ']']))
                .ok_or_else(|| (line_no, format!("malformed section header {line:?}")))?;
            if depth > path.len() + 1 {
                return Err((
                    line_no,
                    format!("section {line:?} is nested deeper than the one it is in"),
                ));
            }
            path.truncate(depth - 1);
            path.push(name.to_owned());
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| (line_no, format!("expected `key = value`, found {line:?}")))?;
        let key = unquote(key.trim());
        let in_renewalparams = path.first().is_some_and(|s| s == "renewalparams");
        match path.len() {
            0 | 1 if key == "domains" && (path.is_empty() || in_renewalparams) => {
                conf.domains = Some(list(value));
            }
            2 if in_renewalparams && path[1] == "webroot_map" => {
                conf.webroot_map.push(key.to_owned());
            }
            _ => {}
        }
    }
    Ok(conf)
}

/// A ConfigObj value as a list: comma-separated, each item trimmed and
/// unquoted; a trailing `# comment` outside quotes dropped.
fn list(value: &str) -> Vec<String> {
    let mut quote = None;
    let mut end = value.len();
    for (i, c) in value.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '#') => {
                end = i;
                break;
            }
            _ => {}
        }
    }
    value[..end]
        .split(',')
        .map(|item| unquote(item.trim()).to_owned())
        .filter(|item| !item.is_empty())
        .collect()
}

fn unquote(s: &str) -> &str {
    for q in ['"', '\''] {
        if let Some(inner) = s.strip_prefix(q).and_then(|s| s.strip_suffix(q)) {
            return inner;
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `renewal/cn.dataone.test.conf` as Debian's certbot 2.1 wrote it for
    /// `certbot certonly --webroot -w W1 -d … -w W2 -d …` against Pebble
    /// (recorded from the import scenario test, tests/tests/import.rs).
    const CERTBOT_2_1_WEBROOT: &str = r"# renew_before_expiry = 30 days
version = 2.1.0
archive_dir = /tmp/.tmpcczdLr/etc/archive/cn.dataone.test
cert = /tmp/.tmpcczdLr/etc/live/cn.dataone.test/cert.pem
privkey = /tmp/.tmpcczdLr/etc/live/cn.dataone.test/privkey.pem
chain = /tmp/.tmpcczdLr/etc/live/cn.dataone.test/chain.pem
fullchain = /tmp/.tmpcczdLr/etc/live/cn.dataone.test/fullchain.pem

# Options used in the renewal process
[renewalparams]
account = ad2246ec2d521baca43375add08694a8
config_dir = /tmp/.tmpcczdLr/etc
work_dir = /tmp/.tmpcczdLr/work
logs_dir = /tmp/.tmpcczdLr/logs
server = https://127.0.0.1:40347/dir
authenticator = webroot
webroot_path = /tmp/certfleet-test-K3j3WK/nodes/cn-unm-1/webroot, /tmp/certfleet-test-K3j3WK/nodes/cn-ucsb-1/webroot, /tmp/certfleet-test-K3j3WK/nodes/cn-unm-1/webroot
key_type = ecdsa
[[webroot_map]]
cn.dataone.test = /tmp/certfleet-test-K3j3WK/nodes/cn-unm-1/webroot
cn-ucsb-1.dataone.test = /tmp/certfleet-test-K3j3WK/nodes/cn-ucsb-1/webroot
cn-unm-1.dataone.test = /tmp/certfleet-test-K3j3WK/nodes/cn-unm-1/webroot
";

    #[test]
    fn a_recorded_certbot_webroot_conf_gives_its_domains() {
        let conf = parse_conf(CERTBOT_2_1_WEBROOT).unwrap();
        assert_eq!(conf.domains, None);
        assert_eq!(
            conf.webroot_map,
            [
                "cn.dataone.test",
                "cn-ucsb-1.dataone.test",
                "cn-unm-1.dataone.test"
            ]
        );
    }

    /// The same lineage's `cert.pem`, which Pebble issued to certbot
    /// (public; its key is not kept).
    const PEBBLE_LEAF: &str = "-----BEGIN CERTIFICATE-----
MIICxTCCAa2gAwIBAgIIK3mGuE1EPIIwDQYJKoZIhvcNAQELBQAwKDEmMCQGA1UE
AxMdUGViYmxlIEludGVybWVkaWF0ZSBDQSAxZjY5ZTgwHhcNMjYxMTIzMjI0MDMz
WhcNMzExMTIzMjI0MDMyWjAaMRgwFgYDVQQDEw9jbi5kYXRhb25lLnRlc3QwWTAT
BgcqhkjOPQIBBggqhkjOPQMBBwNCAASXONFoqM9idgsrufBFrg3PJns1/1+Y2pe0
PjB4ANQkx9rcXlSjZXEju/s7LXHG0/UUO2QVKJ+Xpkly1LLNZjvPo4HLMIHIMA4G
A1UdDwEB/wQEAwIFoDAdBgNVHSUEFjAUBggrBgEFBQcDAQYIKwYBBQUHAwIwDAYD
VR0TAQH/BAIwADAdBgNVHQ4EFgQUBpRKkOu+OXxM+Nomckf7fBY87ZgwHwYDVR0j
BBgwFoAU674zoorxnlCx58HRrjAURv5WmJswSQYDVR0RBEIwQIIPY24uZGF0YW9u
ZS50ZXN0ghZjbi11Y3NiLTEuZGF0YW9uZS50ZXN0ghVjbi11bm0tMS5kYXRhb25l
LnRlc3QwDQYJKoZIhvcNAQELBQADggEBAF+1MByu1cfu/RJ2LWXRRYoomQtez2fd
O/QtIliECACkdeYIyarapFfNuUsqlll5fqYR42r4YOkCePk5Wt5fvmPq01rZqv92
R96ATj5YiFInCCOvL2/0SLacfDpk88gHPDuTT4E6ViVClA/V83m9rcrETzEbJi7E
wXsDM5xWSQhYJEzXjX0BZULume5CVRJtnScnIm93785DOTXenq+TdscDq+LIkYrs
2SDxpdGtfnVxMpMCC43eipv3GLcg/ZnXYnQadGHbEN/DRXzvhsZ8RdsM7Fm/WS5d
YIUKqpOLOj9+iiUSGHETdGMloTJQ7QfLOnBJHwcikK+wjVIRtHKiArc=
-----END CERTIFICATE-----
";

    const NAMES: [&str; 3] = [
        "cn.dataone.test",
        "cn-ucsb-1.dataone.test",
        "cn-unm-1.dataone.test",
    ];

    /// The recorded conf as certbot 2.1 writes it for `--standalone`:
    /// the webroot options are all it would not write.
    fn standalone_conf() -> String {
        CERTBOT_2_1_WEBROOT
            .lines()
            .filter(|l| !l.contains("webroot"))
            .map(|l| l.replace("authenticator = webroot", "authenticator = standalone") + "\n")
            .collect()
    }

    /// A lineage `name` in certbot's layout under `dir`: version 1 in
    /// archive/, live/ symlinks to it, and `conf` as its renewal conf.
    fn lineage_dir(dir: &Path, name: &str, conf: &str) {
        use std::os::unix::fs::symlink;
        let archive = dir.join("archive").join(name);
        let live = dir.join("live").join(name);
        std::fs::create_dir_all(&archive).unwrap();
        std::fs::create_dir_all(&live).unwrap();
        std::fs::create_dir_all(dir.join("renewal")).unwrap();
        std::fs::write(archive.join("fullchain1.pem"), PEBBLE_LEAF).unwrap();
        std::fs::write(archive.join("privkey1.pem"), "a key\n").unwrap();
        for file in ["fullchain", "privkey"] {
            symlink(
                format!("../../archive/{name}/{file}1.pem"),
                live.join(format!("{file}.pem")),
            )
            .unwrap();
        }
        std::fs::write(dir.join("renewal").join(format!("{name}.conf")), conf).unwrap();
    }

    #[test]
    fn a_conf_with_domains_gives_them_in_order() {
        let text = "version = 0.31.0\n[renewalparams]\nauthenticator = standalone\n\
                    domains = b.example.org, 'a.example.org',  # the old ones\n";
        let conf = parse_conf(text).unwrap();
        assert_eq!(conf.domains.unwrap(), ["b.example.org", "a.example.org"]);
        // Elsewhere, a `domains` key is not the lineage's.
        let conf = parse_conf("[other]\ndomains = x.example.org\n").unwrap();
        assert_eq!(conf.domains, None);
    }

    #[test]
    fn a_standalone_conf_names_no_domains() {
        assert_eq!(
            parse_conf(&standalone_conf()).unwrap(),
            RenewalConf::default()
        );
    }

    #[test]
    fn a_malformed_conf_is_refused_with_its_line() {
        for (text, line) in [
            ("version = 2.1.0\n[renewalparams\n", 2),
            ("[renewalparams]\nwebroot_map\n", 2),
            ("a = b\n\n[[webroot_map]]\n", 3),
        ] {
            let (at, reason) = parse_conf(text).unwrap_err();
            assert_eq!(at, line, "{text:?}: {reason}");
        }
    }

    #[test]
    fn a_lineage_is_read_through_certbots_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        lineage_dir(dir.path(), NAMES[0], CERTBOT_2_1_WEBROOT);
        let l = read_lineage(dir.path(), None).unwrap();
        assert_eq!(l.name, NAMES[0]);
        assert_eq!(l.domains, NAMES);
        assert_eq!(l.domains_from, DomainsFrom::WebrootMap);
        assert_eq!(l.fullchain_pem, PEBBLE_LEAF);
        assert_eq!(l.privkey_pem, "a key\n");
    }

    #[test]
    fn without_domains_in_the_conf_the_certificates_names_are_used() {
        let dir = tempfile::tempdir().unwrap();
        lineage_dir(dir.path(), NAMES[0], &standalone_conf());
        let l = read_lineage(dir.path(), Some(NAMES[0])).unwrap();
        assert_eq!(l.domains, NAMES);
        assert_eq!(l.domains_from, DomainsFrom::Certificate);
        let said = l.domains_from.describe(&conf_path(dir.path(), NAMES[0]));
        assert!(said.contains("lists no domains"), "{said}");
    }

    #[test]
    fn several_lineages_need_a_name_and_a_bad_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        lineage_dir(dir.path(), "a.example.org", CERTBOT_2_1_WEBROOT);
        lineage_dir(dir.path(), "b.example.org", CERTBOT_2_1_WEBROOT);
        let e = read_lineage(dir.path(), None).err().unwrap().to_string();
        assert!(
            e.contains("2 lineages (a.example.org, b.example.org); pass --lineage NAME"),
            "{e}"
        );
        for bad in ["../b.example.org", ".hidden", ""] {
            let e = read_lineage(dir.path(), Some(bad)).err().unwrap();
            assert!(matches!(e, LineageError::BadName(_)), "{bad}: {e}");
        }
        let e = read_lineage(&dir.path().join("nope"), None).err().unwrap();
        assert!(e.to_string().contains("nope/renewal"), "{e}");
    }

    #[test]
    fn a_file_that_is_not_regular_or_too_large_is_refused_by_path() {
        let dir = tempfile::tempdir().unwrap();
        lineage_dir(dir.path(), NAMES[0], CERTBOT_2_1_WEBROOT);
        let key = dir
            .path()
            .join("archive")
            .join(NAMES[0])
            .join("privkey1.pem");
        std::fs::remove_file(&key).unwrap();
        std::fs::create_dir(&key).unwrap();
        let e = read_lineage(dir.path(), None).err().unwrap().to_string();
        let live_key = dir.path().join("live").join(NAMES[0]).join("privkey.pem");
        assert_eq!(
            e,
            format!(
                "{}: is a directory, not a regular file; certbot's files are regular files (or, under live/, symlinks to them)",
                live_key.display()
            )
        );
        std::fs::remove_dir(&key).unwrap();
        std::fs::write(&key, vec![b'k'; MAX_KEY_PEM_BYTES + 1]).unwrap();
        let e = read_lineage(dir.path(), None).err().unwrap();
        assert!(matches!(e, LineageError::TooLarge { .. }), "{e}");
        assert!(
            e.to_string().starts_with(&live_key.display().to_string()),
            "{e}"
        );
    }
}
