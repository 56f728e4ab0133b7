//! One error type for every netlink operation: what was being done, and the
//! kernel's errno when it refused.

use std::io;

/// Why a netlink operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket could not be opened, written or read.
    #[error("{what}: netlink socket: {source}")]
    Socket {
        /// What was being done.
        what: String,
        /// The socket's error.
        #[source]
        source: io::Error,
    },
    /// The kernel refused the request.
    #[error("{what}: {source}")]
    Refused {
        /// What was being done.
        what: String,
        /// The kernel's errno.
        #[source]
        source: io::Error,
    },
    /// The kernel answered something this crate cannot read.
    #[error("{what}: unexpected answer from the kernel: {detail}")]
    Protocol {
        /// What was being done.
        what: String,
        /// What was wrong with the answer.
        detail: String,
    },
}

impl Error {
    /// The kernel's errno, when it refused the request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Refused { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// Whether the object asked for does not exist (no such device, entry or route).
    pub fn is_not_found(&self) -> bool {
        matches!(self.errno(), Some(libc::ENODEV | libc::ENOENT | libc::ESRCH))
    }

    /// Whether the object to be created exists already.
    pub fn is_exists(&self) -> bool {
        self.errno() == Some(libc::EEXIST)
    }

    pub(crate) fn socket(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
        let what = what.into();
        move |source| Error::Socket { what, source }
    }

    /// Maps an rtnetlink error, saying what was being done.
    pub(crate) fn rtnl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Error {
        let what = what.into();
        move |e| match e {
            rtnetlink::Error::NetlinkError(msg) => Error::Refused { what, source: msg.to_io() },
            other => Error::Protocol { what, detail: other.to_string() },
        }
    }
}

/// What every operation of this crate returns.
pub type Result<T, E = Error> = std::result::Result<T, E>;
