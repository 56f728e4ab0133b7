//! Writing subnet.env atomically, so the CNI plugin never reads half a file.

use std::io::Write;
use std::path::Path;

use proto::SubnetEnv;

/// Writes `env` to `path` through a temporary file and a rename; skips the
/// write when the file already says the same.
pub fn write(path: &Path, env: &SubnetEnv) -> std::io::Result<bool> {
    let text = env.render();
    if std::fs::read_to_string(path).is_ok_and(|old| old == text) {
        return Ok(false);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(true)
}

/// The subnets recorded in an existing subnet file, if it parses.
pub fn previous_subnets(path: &Path) -> Option<proto::LeaseKey> {
    let text = std::fs::read_to_string(path).ok()?;
    let env = SubnetEnv::parse(&text).ok()?;
    Some(proto::LeaseKey::new(env.subnet_network(), env.ipv6_subnet_network()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_atomically_and_reads_back() {
        let dir = std::env::temp_dir().join(format!("overlay-subnet-test-{}", std::process::id()));
        let path = dir.join("run/subnet.env");
        let env = SubnetEnv::for_lease("10.244.0.0/16".parse().unwrap(), "10.244.7.0/24".parse().unwrap(), 1450, true);
        assert!(write(&path, &env).unwrap());
        assert!(!write(&path, &env).unwrap(), "unchanged content is not rewritten");
        assert_eq!(previous_subnets(&path), Some(proto::LeaseKey::v4("10.244.7.0/24".parse().unwrap())));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
