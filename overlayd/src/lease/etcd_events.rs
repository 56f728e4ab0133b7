//! etcd's keys and values as watch events: pure, so the translation is
//! unit-tested without an etcd, as the Kubernetes store's `NodeEvents` is.

use proto::{LeaseAttrs, LeaseKey};
use tracing::warn;

use super::WatchEvent;

/// What happened to a key, as etcd reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyChange {
    /// The key was written.
    Put,
    /// The key was deleted, or its lease expired.
    Delete,
}

/// The lease key of an etcd key under `prefix` (`<prefix>10.244.1.0-24`); none for other keys.
pub fn lease_key(key: &[u8], prefix: &str) -> Option<LeaseKey> {
    std::str::from_utf8(key).ok()?.strip_prefix(prefix)?.parse().ok()
}

/// A listing of `(key, value)` pairs under `prefix` as watch events. Keys
/// that are not leases, and values that do not parse, are skipped and said.
pub fn listing<'a>(prefix: &str, kvs: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> Vec<WatchEvent> {
    let mut events = vec![WatchEvent::Init];
    for (key, value) in kvs {
        let Some(lease) = lease_key(key, prefix) else {
            warn!(key = %String::from_utf8_lossy(key), "skipping a key under subnets/ that is not a lease key");
            continue;
        };
        match LeaseAttrs::from_json(value) {
            Ok(attrs) => events.push(WatchEvent::InitApply(lease, attrs)),
            Err(e) => warn!(lease = %lease, error = %e, "skipping a peer lease that does not parse"),
        }
    }
    events.push(WatchEvent::InitDone);
    events
}

/// One change of a key under `prefix` as a watch event. A lease rewritten
/// with a value that does not parse is a `Delete`: the node is no longer
/// reachable through what it published.
pub fn change(prefix: &str, kind: KeyChange, key: &[u8], value: &[u8]) -> Option<WatchEvent> {
    let Some(lease) = lease_key(key, prefix) else {
        warn!(key = %String::from_utf8_lossy(key), "skipping a key under subnets/ that is not a lease key");
        return None;
    };
    Some(match kind {
        KeyChange::Delete => WatchEvent::Delete(lease),
        KeyChange::Put => match LeaseAttrs::from_json(value) {
            Ok(attrs) => WatchEvent::Apply(lease, attrs),
            Err(e) => {
                warn!(lease = %lease, error = %e, "skipping a peer lease that does not parse");
                WatchEvent::Delete(lease)
            }
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFIX: &str = "/coreos.com/network/subnets/";
    const VALUE: &[u8] = br#"{"PublicIP":"192.168.1.11","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"b2:5e:e8:32:3a:be"}}"#;

    fn key(text: &str) -> LeaseKey {
        text.parse().unwrap()
    }

    #[test]
    fn a_listing_is_init_leases_done_without_garbage() {
        let events = listing(
            PREFIX,
            [
                (b"/coreos.com/network/subnets/10.244.1.0-24".as_slice(), VALUE),
                (b"/coreos.com/network/subnets/not-a-lease".as_slice(), VALUE),
                (b"/coreos.com/network/subnets/10.244.2.0-24".as_slice(), b"{garbage".as_slice()),
            ],
        );
        let attrs = LeaseAttrs::from_json(VALUE).unwrap();
        assert_eq!(
            events,
            [WatchEvent::Init, WatchEvent::InitApply(key("10.244.1.0-24"), attrs), WatchEvent::InitDone]
        );
        assert_eq!(listing(PREFIX, []), [WatchEvent::Init, WatchEvent::InitDone], "an empty network is a listing too");
    }

    #[test]
    fn puts_and_deletes_become_applies_and_deletes() {
        let k = b"/coreos.com/network/subnets/10.244.1.0-24";
        let attrs = LeaseAttrs::from_json(VALUE).unwrap();
        assert_eq!(change(PREFIX, KeyChange::Put, k, VALUE), Some(WatchEvent::Apply(key("10.244.1.0-24"), attrs)));
        assert_eq!(change(PREFIX, KeyChange::Delete, k, b""), Some(WatchEvent::Delete(key("10.244.1.0-24"))));
        // A lease rewritten with garbage is gone, as far as peers can tell.
        assert_eq!(change(PREFIX, KeyChange::Put, k, b"{"), Some(WatchEvent::Delete(key("10.244.1.0-24"))));
        assert_eq!(change(PREFIX, KeyChange::Put, b"/coreos.com/network/subnets/x", VALUE), None);
        assert_eq!(change(PREFIX, KeyChange::Put, b"/other/10.244.1.0-24", VALUE), None);
        let dual = b"/coreos.com/network/subnets/10.244.1.0-24&fc00::-64";
        assert!(matches!(change(PREFIX, KeyChange::Delete, dual, b""), Some(WatchEvent::Delete(k)) if k.v6.is_some()));
    }
}
