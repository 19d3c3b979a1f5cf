//! Writing to standard output and standard error.
//!
//! `println!` panics when stdout is a pipe whose reader has gone
//! (`certfleet --json certificates | head -1`). A closed pipe is a normal
//! way for a reader to say it has seen enough, so [`line`] ends the program
//! quietly with exit code 0 instead, as `cat` does. Any other write error
//! is reported and ends it with 1. Messages on stderr ignore write errors:
//! there is nowhere left to report them.

use std::fmt;
use std::io::{self, Write};

use certfleet_proto::cause_chain::Chain;

/// Writes a line to stdout through [`line`].
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::output::line(format_args!($($arg)*))
    };
}

/// Writes a line to stderr through [`error_line`].
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::output::error_line(format_args!($($arg)*))
    };
}

pub(crate) use {errln, outln};

/// What to do after a failed write to stdout.
#[derive(Debug, PartialEq, Eq)]
enum AfterWriteError {
    /// The reader closed the pipe: stop, successfully and silently.
    Quiet,
    /// Report the error and stop with exit code 1.
    Fail,
}

fn after_write_error(error: &io::Error) -> AfterWriteError {
    if error.kind() == io::ErrorKind::BrokenPipe {
        AfterWriteError::Quiet
    } else {
        AfterWriteError::Fail
    }
}

/// Writes `args` and a newline to stdout; see the module docs for errors.
pub(crate) fn line(args: fmt::Arguments<'_>) {
    let mut out = io::stdout().lock();
    let written = out
        .write_fmt(args)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush());
    if let Err(e) = written {
        match after_write_error(&e) {
            AfterWriteError::Quiet => std::process::exit(0),
            AfterWriteError::Fail => {
                errln!("certfleet: writing to standard output: {}", Chain(&e));
                std::process::exit(1);
            }
        }
    }
}

/// Writes `args` and a newline to stderr, ignoring errors.
pub(crate) fn error_line(args: fmt::Arguments<'_>) {
    let mut err = io::stderr().lock();
    let _ = err.write_fmt(args).and_then(|()| err.write_all(b"\n"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_closed_pipe_is_quiet() {
        assert_eq!(
            after_write_error(&io::Error::from(io::ErrorKind::BrokenPipe)),
            AfterWriteError::Quiet
        );
        // ENOSPC: output redirected to a full disk is lost, so say so.
        assert_eq!(
            after_write_error(&io::Error::from_raw_os_error(28)),
            AfterWriteError::Fail
        );
    }
}
