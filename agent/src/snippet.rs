//! The web-server config that lets a node's nginx or apache2 answer
//! HTTP-01 for the agent: `certfleet-agent snippet` and `certfleet snippet`
//! print it.
//!
//! On most nodes a web server already owns port 80 and sends every plain
//! HTTP request to HTTPS. The CA fetches
//! `http://NAME/.well-known/acme-challenge/TOKEN` over plain HTTP (RFC 8555
//! §8.3), so the snippet is a port-80 virtual host for the certificate's
//! names that
//!
//! 1. takes `/.well-known/acme-challenge/` out of the HTTP→HTTPS redirect
//!    (a CA follows a redirect, but only to ports 80 and 443, and an HTTPS
//!    server block that is broken or serves an expired certificate would
//!    then fail the renewal meant to fix it), and
//! 2. answers that path from where the agent puts the responses: the files
//!    under the webroot (`http01.mode = "webroot"`), or by proxying to the
//!    agent's own responder on `http01.listen` (`mode = "standalone"` on an
//!    address other than the web server's; the pattern Cloud66 uses).
//!
//! Everything else is redirected to `https://` the same host and path.
//!
//! The values come from where they are known: [`Snippet::for_agent`] takes
//! the mode, the webroot or the responder's address, and the install
//! targets from the agent's own config (the agent does not know the
//! certificate's names, the coordinator's config does); `certfleet snippet`
//! on the coordinator's host takes the names from the coordinator's config
//! and the rest from its flags. Both render here, so they print the same
//! thing for the same values.
//!
//! Everything that goes into the text is checked first: a name or path that
//! could end a directive early (`;`, a quote, a space, a newline) is
//! refused, never escaped, so the printed config means exactly what it
//! says.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use crate::config::{Config, Content, Http01Mode};
use crate::tokens::CHALLENGE_DIR;

/// The port web servers answer plain HTTP on, and where a CA validates
/// HTTP-01 (RFC 8555 §8.3).
pub const HTTP_PORT: u16 = 80;

/// The web servers a snippet is written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebServer {
    Nginx,
    Apache,
}

impl WebServer {
    /// Names as the command line takes them.
    pub const NAMES: [&'static str; 2] = ["nginx", "apache"];

    pub fn name(self) -> &'static str {
        match self {
            Self::Nginx => "nginx",
            Self::Apache => "apache",
        }
    }
}

impl std::str::FromStr for WebServer {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "nginx" => Ok(Self::Nginx),
            "apache" | "apache2" => Ok(Self::Apache),
            other => Err(format!("{other:?} is not one of nginx, apache")),
        }
    }
}

/// Where the web server finds the HTTP-01 responses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// Files under `<webroot>/.well-known/acme-challenge/`.
    Webroot(PathBuf),
    /// The agent's standalone responder at this address.
    Proxy(SocketAddr),
}

/// Where the port-80 virtual host listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    /// Every address, on this port.
    Port(u16),
    /// One address.
    Addr(SocketAddr),
}

impl Default for Listen {
    fn default() -> Self {
        Self::Port(HTTP_PORT)
    }
}

impl std::str::FromStr for Listen {
    type Err = String;

    /// `80` or `192.0.2.7:80` (`[2001:db8::7]:80`).
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(port) = s.parse::<u16>() {
            return Ok(Self::Port(port));
        }
        s.parse::<SocketAddr>()
            .map(Self::Addr)
            .map_err(|_| format!("{s:?} is not a port (80) or an address (192.0.2.7:80)"))
    }
}

impl Listen {
    fn port(self) -> u16 {
        match self {
            Self::Port(port) => port,
            Self::Addr(addr) => addr.port(),
        }
    }

    /// Whether a listener on `addr` would take this address and port.
    fn overlaps(self, addr: SocketAddr) -> bool {
        match self {
            Self::Port(port) => port == addr.port(),
            Self::Addr(own) => {
                own.port() == addr.port()
                    && (own.ip() == addr.ip()
                        || own.ip().is_unspecified()
                        || addr.ip().is_unspecified())
            }
        }
    }
}

/// The files the certificate is installed as, for the HTTPS server's
/// `ssl_certificate` lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The leaf followed by the chain.
    pub fullchain: PathBuf,
    /// The private key (the same file as `fullchain` for `key+fullchain`).
    pub privkey: PathBuf,
}

impl TlsFiles {
    /// certbot's layout under `live_dir`: where the agent installs a
    /// certificate whose config names no files, and where `certbot` itself
    /// leaves one.
    pub fn live(live_dir: &Path) -> Self {
        Self {
            fullchain: live_dir.join("fullchain.pem"),
            privkey: live_dir.join("privkey.pem"),
        }
    }
}

/// Why no snippet can be printed. Exit 2: each is a usage or config error.
#[derive(Debug, thiserror::Error)]
pub enum SnippetError {
    #[error(
        "no server names for certificate {certificate}: pass --server-name for each of its names (the sans of its [[certificates]] in the coordinator's config)"
    )]
    NoNames { certificate: String },
    #[error("server name {name:?}: {reason}")]
    BadName { name: String, reason: String },
    #[error(
        "{what} {path:?} cannot go into a web-server config as it is: {reason}; move it to a path of letters, digits and / . _ - + @ = : ,"
    )]
    BadPath {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error(
        "certificate {certificate} is not in {config}'s [[certificates]] (configured: {configured}); the agent installs only what its config lists"
    )]
    UnknownCertificate {
        certificate: String,
        config: String,
        configured: String,
    },
    #[error(
        "{config}: http01.listen is {agent}, the address the web server would listen on ({listen}): two servers cannot share it. Move the agent's responder to an address of its own, e.g. http01.listen = \"127.0.0.1:8402\", and restart the agent"
    )]
    SamePort {
        config: String,
        agent: SocketAddr,
        listen: String,
    },
}

/// One certificate's port-80 virtual host, ready to print.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snippet {
    pub server: WebServer,
    /// The certificate's name, for the comments.
    pub certificate: String,
    /// `server_name` / `ServerName` + `ServerAlias`: the certificate's names.
    pub names: Vec<String>,
    pub listen: Listen,
    pub challenge: Challenge,
    /// Where the HTTPS server finds the certificate, when known.
    pub tls: Option<TlsFiles>,
}

impl Snippet {
    /// Checks every value that goes into the text (see the module docs).
    pub fn new(
        server: WebServer,
        certificate: &str,
        names: Vec<String>,
        listen: Listen,
        challenge: Challenge,
        tls: Option<TlsFiles>,
    ) -> Result<Self, SnippetError> {
        if names.is_empty() {
            return Err(SnippetError::NoNames {
                certificate: certificate.to_owned(),
            });
        }
        let names: Vec<String> = names.iter().map(|n| n.to_ascii_lowercase()).collect();
        for name in &names {
            check_server_name(name).map_err(|reason| SnippetError::BadName {
                name: name.clone(),
                reason,
            })?;
        }
        if let Challenge::Webroot(root) = &challenge {
            check_path("webroot", root)?;
        }
        if let Some(tls) = &tls {
            check_path("certificate file", &tls.fullchain)?;
            check_path("key file", &tls.privkey)?;
        }
        Ok(Self {
            server,
            certificate: certificate.to_owned(),
            names,
            listen,
            challenge,
            tls,
        })
    }

    /// The snippet for this node's agent: its HTTP-01 mode and its install
    /// targets for `certificate`, from `config` (read from `origin`).
    pub fn for_agent(
        config: &Config,
        origin: &str,
        server: WebServer,
        certificate: &str,
        names: Vec<String>,
        listen: Listen,
    ) -> Result<Self, SnippetError> {
        let targets = config
            .certificates
            .iter()
            .find(|c| c.name == certificate)
            .ok_or_else(|| SnippetError::UnknownCertificate {
                certificate: certificate.to_owned(),
                config: origin.to_owned(),
                configured: configured(config),
            })?;
        let file = |wanted: &[Content]| {
            wanted.iter().find_map(|content| {
                targets
                    .files
                    .iter()
                    .find(|f| f.content == *content)
                    .map(|f| f.path.clone())
            })
        };
        let tls = match (
            file(&[Content::Fullchain, Content::KeyFullchain]),
            file(&[Content::Privkey, Content::KeyFullchain]),
        ) {
            (Some(fullchain), Some(privkey)) => Some(TlsFiles { fullchain, privkey }),
            _ => None,
        };
        let challenge = match &config.http01.mode {
            Http01Mode::Webroot { webroot } => Challenge::Webroot(webroot.clone()),
            Http01Mode::Standalone { listen: agent } => {
                if listen.overlaps(*agent) {
                    return Err(SnippetError::SamePort {
                        config: origin.to_owned(),
                        agent: *agent,
                        listen: listen_text(listen),
                    });
                }
                Challenge::Proxy(reachable(*agent))
            }
        };
        Self::new(server, certificate, names, listen, challenge, tls)
    }

    /// The config text, comments included.
    pub fn render(&self) -> String {
        match self.server {
            WebServer::Nginx => self.nginx(),
            WebServer::Apache => self.apache(),
        }
    }

    fn nginx(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# certfleet: HTTP for certificate {cert}. ACME HTTP-01 challenges are answered\n\
             # here over plain HTTP; every other request is redirected to HTTPS.\n\
             # Put it in /etc/nginx/sites-available/certfleet-{cert}, link it from\n\
             # sites-enabled, and remove any other port-{port} server for these names.\n\
             # Then: nginx -t && systemctl reload nginx",
            cert = self.certificate,
            port = self.listen.port(),
        );
        s.push_str("server {\n");
        match self.listen {
            Listen::Port(port) => {
                let _ = writeln!(s, "    listen {port};\n    listen [::]:{port};");
            }
            Listen::Addr(addr) => {
                let _ = writeln!(s, "    listen {addr};");
            }
        }
        let _ = writeln!(s, "    server_name {};\n", self.names.join(" "));
        let _ = writeln!(
            s,
            "    # ^~: no regex location (such as one refusing dot-files) may take this path."
        );
        let _ = writeln!(s, "    location ^~ /{}/ {{", CHALLENGE_DIR.join("/"));
        match &self.challenge {
            Challenge::Webroot(root) => {
                let _ = writeln!(
                    s,
                    "        # The agent writes each response to {}/{}/TOKEN.",
                    root.display(),
                    CHALLENGE_DIR.join("/")
                );
                let _ = writeln!(s, "        root {};", root.display());
                s.push_str("        default_type text/plain;\n");
                s.push_str("        try_files $uri =404;\n");
            }
            Challenge::Proxy(agent) => {
                let _ = writeln!(
                    s,
                    "        # The agent's own responder (http01.listen), which knows every token."
                );
                let _ = writeln!(s, "        proxy_pass http://{agent};");
                s.push_str("        proxy_set_header Host $host;\n");
            }
        }
        s.push_str("    }\n\n");
        s.push_str("    location / {\n        return 301 https://$host$request_uri;\n    }\n}\n");
        if let Some(tls) = &self.tls {
            let _ = write!(
                s,
                "\n# In the HTTPS (listen 443 ssl) server for these names, the files the agent installs:\n\
                 #     ssl_certificate     {};\n\
                 #     ssl_certificate_key {};\n",
                tls.fullchain.display(),
                tls.privkey.display()
            );
        }
        s
    }

    fn apache(&self) -> String {
        let modules = match self.challenge {
            Challenge::Webroot(_) => "rewrite",
            Challenge::Proxy(_) => "rewrite proxy proxy_http",
        };
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# certfleet: HTTP for certificate {cert}. ACME HTTP-01 challenges are answered\n\
             # here over plain HTTP; every other request is redirected to HTTPS.\n\
             # Needs: a2enmod {modules}   (alias and authz_core are on by default)\n\
             # Put it in /etc/apache2/sites-available/certfleet-{cert}.conf, a2ensite it,\n\
             # and disable any other port-{port} site for these names.{listen}\n\
             # Then: apache2ctl configtest && systemctl reload apache2",
            cert = self.certificate,
            port = self.listen.port(),
            listen = match self.listen {
                Listen::Port(HTTP_PORT) => String::new(),
                other => format!("\n# ports.conf must say: Listen {}", listen_text(other)),
            },
        );
        let _ = writeln!(s, "<VirtualHost {}>", vhost_address(self.listen));
        let _ = writeln!(s, "    ServerName {}", self.names[0]);
        if self.names.len() > 1 {
            let _ = writeln!(s, "    ServerAlias {}", self.names[1..].join(" "));
        }
        s.push('\n');
        let path = format!("/{}/", CHALLENGE_DIR.join("/"));
        match &self.challenge {
            Challenge::Webroot(root) => {
                let dir = format!("{}{path}", root.display());
                let _ = writeln!(s, "    # The agent writes each response to {dir}TOKEN.");
                let _ = writeln!(s, "    Alias {path} {dir}");
                // By URL rather than <Directory>: until the first token
                // the directory does not exist, and a <Directory> for it
                // would not apply, so a test fetch would get 403 instead of
                // 404. The Alias keeps the URL to that one directory, and
                // `Options None` keeps it from being listed.
                s.push_str("    # Granted by URL: the directory appears with the first token.\n");
                let _ = writeln!(s, "    <Location {path}>");
                s.push_str(
                    "        Options None\n        Require all granted\n    </Location>\n\n",
                );
            }
            Challenge::Proxy(agent) => {
                let _ = writeln!(
                    s,
                    "    # The agent's own responder (http01.listen), which knows every token."
                );
                let _ = writeln!(s, "    ProxyPass {path} http://{agent}{path}\n");
            }
        }
        s.push_str(
            "    # SERVER_NAME is the request's host without a port (UseCanonicalName Off).\n\
             \x20   RewriteEngine On\n\
             \x20   RewriteCond %{REQUEST_URI} !^/\\.well-known/acme-challenge/\n\
             \x20   RewriteRule ^ https://%{SERVER_NAME}%{REQUEST_URI} [R=301,L]\n\
             </VirtualHost>\n",
        );
        if let Some(tls) = &self.tls {
            let _ = write!(
                s,
                "\n# In the HTTPS (<VirtualHost *:443>, a2enmod ssl) site for these names, the files\n\
                 # the agent installs:\n\
                 #     SSLCertificateFile    {}\n\
                 #     SSLCertificateKeyFile {}\n",
                tls.fullchain.display(),
                tls.privkey.display()
            );
        }
        s
    }
}

/// The certificates `config` lists, for a message.
fn configured(config: &Config) -> String {
    if config.certificates.is_empty() {
        return "none".into();
    }
    config
        .certificates
        .iter()
        .map(|c| c.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Where a web server on this node reaches a responder listening on
/// `addr`: a listener on every address is reached on loopback.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}

fn listen_text(listen: Listen) -> String {
    match listen {
        Listen::Port(port) => port.to_string(),
        Listen::Addr(addr) => addr.to_string(),
    }
}

/// `<VirtualHost …>`'s address for `listen`.
fn vhost_address(listen: Listen) -> String {
    match listen {
        Listen::Port(port) => format!("*:{port}"),
        Listen::Addr(addr) => addr.to_string(),
    }
}

/// A server name is a DNS name of LDH labels, as the coordinator's config
/// requires of a certificate's names; a wildcard has no HTTP-01 challenge
/// (RFC 8555 §8.3), so it needs no port-80 host.
fn check_server_name(name: &str) -> Result<(), String> {
    if name.starts_with("*.") {
        return Err("a wildcard cannot be validated over HTTP-01".into());
    }
    if name.is_empty() || name.len() > 253 {
        return Err("must be 1 to 253 characters".into());
    }
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !ok {
            return Err(format!("label {label:?} is not a DNS label (a-z 0-9 -)"));
        }
    }
    Ok(())
}

/// A path goes into the config unquoted: it must be absolute and hold
/// nothing either server reads as syntax.
fn check_path(what: &'static str, path: &Path) -> Result<(), SnippetError> {
    let bad = |reason: String| SnippetError::BadPath {
        what,
        path: path.to_owned(),
        reason,
    };
    let Some(text) = path.to_str() else {
        return Err(bad("it is not UTF-8".into()));
    };
    if !path.is_absolute() {
        return Err(bad("it is not absolute".into()));
    }
    if let Some(c) = text
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "/._-+@=:,".contains(*c)))
    {
        return Err(bad(format!("it holds {c:?}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        vec!["cn.example.org".into(), "cn-ucsb-1.example.org".into()]
    }

    #[test]
    fn nginx_webroot_exempts_the_challenge_path_and_redirects_the_rest() {
        let s = Snippet::new(
            WebServer::Nginx,
            "cn",
            names(),
            Listen::default(),
            Challenge::Webroot("/var/www/html".into()),
            Some(TlsFiles::live(Path::new("/etc/letsencrypt/live/cn"))),
        )
        .unwrap()
        .render();
        for line in [
            "    listen 80;",
            "    listen [::]:80;",
            "    server_name cn.example.org cn-ucsb-1.example.org;",
            "    location ^~ /.well-known/acme-challenge/ {",
            "        root /var/www/html;",
            "        return 301 https://$host$request_uri;",
            "#     ssl_certificate     /etc/letsencrypt/live/cn/fullchain.pem;",
            "#     ssl_certificate_key /etc/letsencrypt/live/cn/privkey.pem;",
        ] {
            assert!(s.lines().any(|l| l == line), "no line {line:?} in\n{s}");
        }
    }

    #[test]
    fn apache_proxy_names_its_modules_and_its_listen_address() {
        let s = Snippet::new(
            WebServer::Apache,
            "cn",
            names(),
            "192.0.2.7:8080".parse().unwrap(),
            Challenge::Proxy("127.0.0.1:8402".parse().unwrap()),
            None,
        )
        .unwrap()
        .render();
        for line in [
            "# Needs: a2enmod rewrite proxy proxy_http   (alias and authz_core are on by default)",
            "# ports.conf must say: Listen 192.0.2.7:8080",
            "<VirtualHost 192.0.2.7:8080>",
            "    ServerName cn.example.org",
            "    ServerAlias cn-ucsb-1.example.org",
            "    ProxyPass /.well-known/acme-challenge/ http://127.0.0.1:8402/.well-known/acme-challenge/",
            "    RewriteCond %{REQUEST_URI} !^/\\.well-known/acme-challenge/",
            "    RewriteRule ^ https://%{SERVER_NAME}%{REQUEST_URI} [R=301,L]",
        ] {
            assert!(s.lines().any(|l| l == line), "no line {line:?} in\n{s}");
        }
        assert!(!s.contains("SSLCertificateFile"), "{s}");
    }

    #[test]
    fn apache_webroot_aliases_the_challenge_directory_alone() {
        let s = Snippet::new(
            WebServer::Apache,
            "cn",
            names(),
            Listen::default(),
            Challenge::Webroot("/var/www/html".into()),
            Some(TlsFiles::live(Path::new("/etc/letsencrypt/live/cn"))),
        )
        .unwrap()
        .render();
        for line in [
            "# Needs: a2enmod rewrite   (alias and authz_core are on by default)",
            "<VirtualHost *:80>",
            "    Alias /.well-known/acme-challenge/ /var/www/html/.well-known/acme-challenge/",
            "    <Location /.well-known/acme-challenge/>",
            "        Require all granted",
            "#     SSLCertificateFile    /etc/letsencrypt/live/cn/fullchain.pem",
        ] {
            assert!(s.lines().any(|l| l == line), "no line {line:?} in\n{s}");
        }
        assert!(
            !s.contains("ports.conf"),
            "port 80 needs no Listen line: {s}"
        );
        assert!(!s.contains("ProxyPass"), "{s}");
    }

    #[test]
    fn nothing_that_could_end_a_directive_gets_in() {
        let new = |names: Vec<String>, root: &str| {
            Snippet::new(
                WebServer::Nginx,
                "cn",
                names,
                Listen::default(),
                Challenge::Webroot(root.into()),
                None,
            )
        };
        let e = new(vec!["a.org; include /etc/x".into()], "/srv").unwrap_err();
        assert!(e.to_string().contains("not a DNS label"), "{e}");
        let e = new(names(), "/srv/my site").unwrap_err();
        assert!(e.to_string().contains("holds ' '"), "{e}");
        let e = new(names(), "srv").unwrap_err();
        assert!(e.to_string().contains("not absolute"), "{e}");
        let e = new(vec![], "/srv").unwrap_err();
        assert!(e.to_string().contains("--server-name"), "{e}");
        let e = new(vec!["*.example.org".into()], "/srv").unwrap_err();
        assert!(e.to_string().contains("wildcard"), "{e}");
    }

    fn agent_config(http01: &str) -> Config {
        let text = format!(
            "node = \"web-1\"\n[grpc]\nlisten = \"127.0.0.2:7443\"\n[http01]\n{http01}\n\
             [[certificates]]\nname = \"web\"\n\
             [[certificates.files]]\ncontent = \"key+fullchain\"\npath = \"/etc/haproxy/web.pem\"\n"
        );
        Config::from_toml_str(&text, "agent.toml").unwrap()
    }

    #[test]
    fn the_agent_config_gives_the_mode_and_the_files() {
        let config = agent_config("mode = \"standalone\"\nlisten = \"0.0.0.0:8402\"");
        let s = Snippet::for_agent(
            &config,
            "agent.toml",
            WebServer::Nginx,
            "web",
            vec!["web.example.org".into()],
            Listen::default(),
        )
        .unwrap();
        // A responder on every address is reached on loopback.
        assert_eq!(
            s.challenge,
            Challenge::Proxy("127.0.0.1:8402".parse().unwrap())
        );
        assert_eq!(
            s.tls,
            Some(TlsFiles {
                fullchain: "/etc/haproxy/web.pem".into(),
                privkey: "/etc/haproxy/web.pem".into(),
            })
        );
        let e = Snippet::for_agent(
            &config,
            "agent.toml",
            WebServer::Nginx,
            "other",
            vec!["web.example.org".into()],
            Listen::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("configured: web"), "{e}");
    }

    #[test]
    fn an_agent_already_on_port_80_is_told_to_move() {
        let config = agent_config("mode = \"standalone\"\nlisten = \"0.0.0.0:80\"");
        let e = Snippet::for_agent(
            &config,
            "agent.toml",
            WebServer::Apache,
            "web",
            vec!["web.example.org".into()],
            Listen::default(),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("http01.listen = \"127.0.0.1:8402\""),
            "{e}"
        );
    }
}
