//! etcd's keys and values as watch events: pure, so the translation is
//! unit-tested without an etcd, as the Kubernetes store's `NodeEvents` is.

use proto::{LeaseAttrs, LeaseKey};
use tracing::warn;

use super::{Created, WatchEvent};

/// The largest value a lease can be: a real one is under 300 bytes. A bigger
/// value is skipped before it is parsed, so a flood of megabyte values costs
/// the daemon neither memory nor time.
pub const MAX_LEASE_VALUE: usize = 64 * 1024;

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

/// One key and value of etcd, and the revision that created the key.
pub type Kv<'a> = (&'a [u8], &'a [u8], i64);

/// A listing of `(key, value, create revision)` under `prefix` as watch
/// events, without its `Init` and `InitDone` (a listing comes in pages). Keys
/// that are not leases, and values that do not parse, are skipped and said.
pub fn listed<'a>(prefix: &str, kvs: impl IntoIterator<Item = Kv<'a>>, events: &mut Vec<WatchEvent>) {
    for (key, value, created) in kvs {
        let Some(lease) = lease_key(key, prefix) else {
            warn!(key = %String::from_utf8_lossy(key), "skipping a key under subnets/ that is not a lease key");
            continue;
        };
        match parse(&lease, value) {
            Some(attrs) => events.push(WatchEvent::InitApply(lease, (attrs, Created(created)))),
            None => continue,
        }
    }
}

/// A whole listing as watch events: `Init`, the leases, `InitDone`.
#[cfg(test)]
pub fn listing<'a>(prefix: &str, kvs: impl IntoIterator<Item = Kv<'a>>) -> Vec<WatchEvent> {
    let mut events = vec![WatchEvent::Init];
    listed(prefix, kvs, &mut events);
    events.push(WatchEvent::InitDone);
    events
}

/// The lease a value says; none (and said) when it is too big or does not parse.
fn parse(lease: &LeaseKey, value: &[u8]) -> Option<LeaseAttrs> {
    if value.len() > MAX_LEASE_VALUE {
        warn!(lease = %lease, bytes = value.len(), limit = MAX_LEASE_VALUE, "skipping a peer lease far bigger than any real one");
        return None;
    }
    match LeaseAttrs::from_json(value) {
        Ok(attrs) => Some(attrs),
        Err(e) => {
            warn!(lease = %lease, error = %e, "skipping a peer lease that does not parse");
            None
        }
    }
}

/// One change of a key under `prefix` as a watch event. A lease rewritten
/// with a value that does not parse is a `Delete`: the node is no longer
/// reachable through what it published.
pub fn change(prefix: &str, kind: KeyChange, (key, value, created): Kv<'_>) -> Option<WatchEvent> {
    let Some(lease) = lease_key(key, prefix) else {
        warn!(key = %String::from_utf8_lossy(key), "skipping a key under subnets/ that is not a lease key");
        return None;
    };
    Some(match kind {
        KeyChange::Delete => WatchEvent::Delete(lease),
        KeyChange::Put => match parse(&lease, value) {
            Some(attrs) => WatchEvent::Apply(lease, (attrs, Created(created))),
            None => WatchEvent::Delete(lease),
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
        let mut huge = VALUE.to_vec();
        huge.splice(1..1, std::iter::repeat_n(b' ', MAX_LEASE_VALUE));
        assert!(LeaseAttrs::from_json(&huge).is_ok(), "valid JSON, only too big");
        let events = listing(
            PREFIX,
            [
                (b"/coreos.com/network/subnets/10.244.1.0-24".as_slice(), VALUE, 5),
                (b"/coreos.com/network/subnets/not-a-lease".as_slice(), VALUE, 6),
                (b"/coreos.com/network/subnets/10.244.2.0-24".as_slice(), b"{garbage".as_slice(), 7),
                (b"/coreos.com/network/subnets/10.244.3.0-24".as_slice(), &huge, 8),
            ],
        );
        let attrs = LeaseAttrs::from_json(VALUE).unwrap();
        assert_eq!(
            events,
            [WatchEvent::Init, WatchEvent::InitApply(key("10.244.1.0-24"), (attrs, Created(5))), WatchEvent::InitDone]
        );
        assert_eq!(listing(PREFIX, []), [WatchEvent::Init, WatchEvent::InitDone], "an empty network is a listing too");
    }

    #[test]
    fn puts_and_deletes_become_applies_and_deletes() {
        let k = b"/coreos.com/network/subnets/10.244.1.0-24";
        let attrs = LeaseAttrs::from_json(VALUE).unwrap();
        let put = WatchEvent::Apply(key("10.244.1.0-24"), (attrs, Created(3)));
        assert_eq!(change(PREFIX, KeyChange::Put, (k, VALUE, 3)), Some(put));
        assert_eq!(change(PREFIX, KeyChange::Delete, (k, b"", 0)), Some(WatchEvent::Delete(key("10.244.1.0-24"))));
        // A lease rewritten with garbage is gone, as far as peers can tell.
        assert_eq!(change(PREFIX, KeyChange::Put, (k, b"{", 3)), Some(WatchEvent::Delete(key("10.244.1.0-24"))));
        assert_eq!(change(PREFIX, KeyChange::Put, (b"/coreos.com/network/subnets/x", VALUE, 3)), None);
        assert_eq!(change(PREFIX, KeyChange::Put, (b"/other/10.244.1.0-24", VALUE, 3)), None);
        let dual = b"/coreos.com/network/subnets/10.244.1.0-24&fc00::-64";
        assert!(
            matches!(change(PREFIX, KeyChange::Delete, (dual, b"", 0)), Some(WatchEvent::Delete(k)) if k.v6.is_some())
        );
    }
}
