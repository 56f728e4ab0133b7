//! One overlayd per node: an exclusive `flock` on a file beside the subnet
//! file, held for the daemon's life. Two daemons on one node would rewrite
//! each other's device, table and subnet file at every resync and both say
//! ready; the second one exits instead, naming the first. `cleanup` checks
//! the same lock, so it never pulls the node from under a running daemon.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// The lock file's name, in the subnet file's directory.
pub const FILE_NAME: &str = "overlayd.lock";

/// Why the lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it.
    #[error("another overlayd{} holds {}: one overlayd runs per node (stop it first, or give this one its own --subnet-file)", .pid.map(|p| format!(" (pid {p})")).unwrap_or_default(), .path.display())]
    Held {
        /// The lock file.
        path: PathBuf,
        /// The holder's PID, as it wrote it.
        pid: Option<u32>,
    },
    /// The file could not be made or locked.
    #[error("taking the lock {}: {source}", .path.display())]
    Io {
        /// The lock file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
}

/// The lock file for a daemon writing `subnet_file`.
pub fn path_for(subnet_file: &Path) -> PathBuf {
    subnet_file.parent().unwrap_or(Path::new("/")).join(FILE_NAME)
}

/// The lock, held until dropped (or the process ends, whatever way it ends).
#[derive(Debug)]
pub struct InstanceLock {
    _file: File,
}

impl InstanceLock {
    /// Takes the lock at `path` without waiting, and writes our PID into it.
    pub fn take(path: &Path) -> Result<Self, LockError> {
        let io = |source| LockError::Io { path: path.to_path_buf(), source };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(LockError::Held { path: path.to_path_buf(), pid: holder(&mut file) });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(InstanceLock { _file: file })
    }

    /// Fails, naming the holder, while a daemon holds the lock at `path`; a
    /// lock file nobody holds (or none) is free.
    pub fn check_free(path: &Path) -> Result<(), LockError> {
        let mut file = match File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(LockError::Io { path: path.to_path_buf(), source }),
        };
        match file.try_lock_shared() {
            Ok(()) => Ok(()),
            Err(TryLockError::WouldBlock) => Err(LockError::Held { path: path.to_path_buf(), pid: holder(&mut file) }),
            Err(TryLockError::Error(source)) => Err(LockError::Io { path: path.to_path_buf(), source }),
        }
    }
}

/// The PID the holder wrote, if it is readable.
fn holder(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_one_s_pid_and_the_lock_frees_on_drop() {
        let dir = std::env::temp_dir().join(format!("overlayd-lock-test-{}", std::process::id()));
        let path = path_for(&dir.join("subnet.env"));
        assert_eq!(path, dir.join(FILE_NAME));
        assert!(InstanceLock::check_free(&path).is_ok(), "no file: free");
        let first = InstanceLock::take(&path).unwrap();
        // flock locks belong to the open file description: a second open, as a second process makes, is refused.
        let err = InstanceLock::take(&path).unwrap_err();
        assert!(matches!(err, LockError::Held { pid: Some(p), .. } if p == std::process::id()), "{err}");
        assert!(err.to_string().contains(&format!("pid {}", std::process::id())), "{err}");
        assert!(InstanceLock::check_free(&path).is_err());
        drop(first);
        assert!(InstanceLock::check_free(&path).is_ok());
        let again = InstanceLock::take(&path);
        assert!(again.is_ok(), "{again:?}");
        drop(again);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
