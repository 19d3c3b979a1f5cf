//! A real apache2 (Debian's), run in the foreground from a config of its
//! own, for the web-server snippets `certfleet snippet apache` prints.
//!
//! The config is self-contained: it does not read /etc/apache2, so a test
//! sees exactly the modules it names, and it starts from Debian's
//! `apache2.conf` rules that matter here. As there, every directory is
//! denied (`<Directory /> Require all denied`), so a snippet that serves a
//! webroot must grant its own directory; and as there, the parent runs as
//! root and its children as www-data ([`USER`]), who must be able to read
//! what the agent puts in a webroot.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::net::wait_listening;
use crate::process::Proc;

/// Debian's apache2 binary.
pub const APACHE2: &str = "/usr/sbin/apache2";
/// Where Debian keeps apache2's modules.
pub const MODULES_DIR: &str = "/usr/lib/apache2/modules";
/// The user apache2's children run as, as Debian's envvars has it.
pub const USER: &str = "www-data";
/// The loadable modules Debian enables on a fresh install that a port-80
/// site relies on (unixd and log_config are built in): anything a snippet
/// needs beyond these it must say (`a2enmod ...`).
pub const BASE_MODULES: [&str; 3] = ["mpm_event", "authz_core", "alias"];

/// How long apache2 gets to start listening.
const STARTUP: Duration = Duration::from_secs(10);

/// A running apache2; stopped (SIGTERM, so the parent stops its children)
/// when dropped.
pub struct Apache {
    proc: Proc,
    /// Its directory: `apache2.conf`, `site.conf`, logs.
    pub dir: PathBuf,
}

impl Apache {
    /// What it logged for each request, one line per request.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }

    /// Its error log and its output.
    pub fn logs(&self) -> String {
        format!(
            "{}{}",
            std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default(),
            self.proc.log_text()
        )
    }
}

impl Drop for Apache {
    fn drop(&mut self) {
        self.proc.terminate(Duration::from_secs(5));
    }
}

/// Starts apache2 listening on `listen` with [`BASE_MODULES`] and
/// `modules` (names as `a2enmod` takes them) loaded, and `site` included
/// after a default virtual host that refuses every request (403), so only
/// the names `site` declares reach it. Everything it writes stays in `dir`.
pub async fn serve(
    dir: &Path,
    listen: SocketAddr,
    modules: &[&str],
    site: &str,
) -> anyhow::Result<Apache> {
    std::fs::create_dir_all(dir.join("run"))?;
    let d = dir.display();
    let mut conf = format!(
        r#"ServerRoot {d}
ServerName localhost
PidFile {d}/apache2.pid
DefaultRuntimeDir {d}/run
Mutex file:{d}/run default
ErrorLog {d}/error.log
LogLevel warn
Listen {listen}
"#
    );
    for module in BASE_MODULES.iter().chain(modules) {
        let so = Path::new(MODULES_DIR).join(format!("mod_{module}.so"));
        if !so.exists() {
            bail!(
                "no apache2 module {module} ({} is missing; apt-get install apache2)",
                so.display()
            );
        }
        conf.push_str(&format!("LoadModule {module}_module {}\n", so.display()));
    }
    conf.push_str(&format!(
        r#"User {USER}
Group {USER}
LogFormat "%h %v \"%r\" %>s" plain
CustomLog {d}/access.log plain
<Directory />
    Options FollowSymLinks
    AllowOverride None
    Require all denied
</Directory>
<VirtualHost {listen}>
    ServerName default.invalid
    <Location />
        Require all denied
    </Location>
</VirtualHost>
Include {d}/site.conf
"#
    ));
    let conf_path = dir.join("apache2.conf");
    std::fs::write(&conf_path, conf)?;
    std::fs::write(dir.join("site.conf"), site)?;
    let check = Command::new(APACHE2)
        .arg("-t")
        .arg("-f")
        .arg(&conf_path)
        .output()
        .with_context(|| format!("running {APACHE2} -t (apt-get install apache2)"))?;
    if !check.status.success() {
        bail!(
            "apache2 -t -f {}: {}\n--- site.conf\n{site}",
            conf_path.display(),
            String::from_utf8_lossy(&check.stderr)
        );
    }
    let mut cmd = Command::new(APACHE2);
    cmd.arg("-f").arg(&conf_path).arg("-DFOREGROUND");
    let mut proc = Proc::spawn("apache2", cmd, &dir.join("apache2.out"))?;
    if let Err(e) = wait_listening(listen, STARTUP).await {
        proc.check_running()?;
        return Err(e);
    }
    Ok(Apache {
        proc,
        dir: dir.to_owned(),
    })
}
