//! certfleet's cluster harness: a whole cluster on one machine, made of the
//! real parts.
//!
//! - [`pebble`]: Debian's `pebble` (the ACME CA) and `pebble-challtestsrv`
//!   (its DNS), on free ports, with a listener CA generated per run.
//! - [`cluster`]: agents (the real `certfleet-agent` binary) on their own
//!   loopback addresses, optionally behind a real nginx in webroot mode, and
//!   the real `certfleet-coordinator`, driven through the real `certfleet` CLI.
//! - [`hostile`]: acting as an unprivileged local user, and snapshots that
//!   prove nothing outside a directory changed.
//! - [`smtp`]: a real SMTP server (aiosmtpd) writing a maildir, in plain,
//!   STARTTLS and SMTPS modes, and the mail it received.
//! - [`browser`]: headless chromium driven through chromedriver, for the
//!   approval page.
//! - [`apache`]: Debian's apache2 from a self-contained config, for the
//!   web-server snippets.
//! - [`sshd`]: a real OpenSSH server per SSH node, with its own host key.
//! - [`process`]: child processes that are killed and reaped on drop, the
//!   binaries under test, and bounded waiting.
//!
//! Each cluster gets its own directory, ports and a /24 of 127.0.0.0/8 of
//! its own, so tests run in parallel without stepping on each other.

pub mod apache;
pub mod browser;
pub mod cluster;
pub mod crash;
pub mod hostile;
pub mod net;
pub mod nginx;
pub mod pebble;
pub mod process;
pub mod smtp;
pub mod sshd;
pub mod verify;
