//! certfleet's cluster harness: a whole cluster on one machine, made of the
//! real parts.
//!
//! - [`pebble`]: Debian's `pebble` (the ACME CA) and `pebble-challtestsrv`
//!   (its DNS), on free ports, with a listener CA generated per run.
//! - [`cluster`]: agents (the real `certfleet-agent` binary) on their own
//!   loopback addresses, optionally behind a real nginx in webroot mode, and
//!   the real `certfleet-coordinator`, driven through the real `certfleet` CLI.
//! - [`process`]: child processes that are killed and reaped on drop, the
//!   binaries under test, and bounded waiting.
//!
//! Each cluster gets its own directory, ports and a /24 of 127.0.0.0/8 of
//! its own, so tests run in parallel without stepping on each other.

pub mod cluster;
pub mod net;
pub mod nginx;
pub mod pebble;
pub mod process;
pub mod verify;
