//! List-then-watch, folded into a keyed store, as kube-runtime's watcher
//! and reflector do it; written once for every store the daemon keeps: the
//! peer leases (etcd keys or Nodes) and the policy's pods, namespaces and
//! NetworkPolicies.
//!
//! A (re)list is `Init`, one `InitApply` per object, then `InitDone`; after
//! it, `Apply` and `Delete` follow the changes one by one. The store takes a
//! listing's objects as they come and, at `InitDone`, removes what the
//! listing did not name. What a fold did is said in a [`Folded`], so an
//! observer (the peer view's admission, the policy compiler) acts on
//! changes, and sees a listing only once it is complete.

use std::collections::{BTreeMap, BTreeSet};

/// One step of a list-then-watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent<K, V> {
    /// A (re)list begins.
    Init,
    /// An object of the listing.
    InitApply(K, V),
    /// The listing is complete: objects it did not name are gone.
    InitDone,
    /// An object was created or changed.
    Apply(K, V),
    /// An object was deleted.
    Delete(K),
}

impl<K, V> WatchEvent<K, V> {
    /// The same event with its value mapped (a decoded object into what is kept of it).
    pub fn map<W>(self, f: impl FnOnce(&K, V) -> W) -> WatchEvent<K, W> {
        match self {
            WatchEvent::Init => WatchEvent::Init,
            WatchEvent::InitApply(k, v) => {
                let w = f(&k, v);
                WatchEvent::InitApply(k, w)
            }
            WatchEvent::InitDone => WatchEvent::InitDone,
            WatchEvent::Apply(k, v) => {
                let w = f(&k, v);
                WatchEvent::Apply(k, w)
            }
            WatchEvent::Delete(k) => WatchEvent::Delete(k),
        }
    }
}

/// What folding one event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Folded<K, V> {
    /// Nothing an observer needs to see yet (a listing under way).
    Nothing,
    /// A listing completed: the store holds exactly what it named; these were removed.
    Listed(Vec<(K, V)>),
    /// One object changed (a watch event): what it was before (none: it is new).
    Changed(K, Option<V>),
}

/// Objects by key, as the store's watch has shown them so far.
#[derive(Debug, Clone)]
pub struct Store<K, V> {
    items: BTreeMap<K, V>,
    /// The keys a listing under way has named.
    listing: Option<BTreeSet<K>>,
    /// Whether a listing has completed.
    listed: bool,
}

impl<K, V> Default for Store<K, V> {
    fn default() -> Self {
        Store { items: BTreeMap::new(), listing: None, listed: false }
    }
}

impl<K: Ord + Clone, V: PartialEq> Store<K, V> {
    /// Folds one event in.
    pub fn apply(&mut self, event: WatchEvent<K, V>) -> Folded<K, V> {
        match event {
            WatchEvent::Init => {
                self.listing = Some(BTreeSet::new());
                Folded::Nothing
            }
            WatchEvent::InitApply(key, value) => {
                self.listing.get_or_insert_with(BTreeSet::new).insert(key.clone());
                self.items.insert(key, value);
                Folded::Nothing
            }
            WatchEvent::InitDone => {
                let named = self.listing.take().unwrap_or_default();
                let gone: Vec<K> = self.items.keys().filter(|k| !named.contains(*k)).cloned().collect();
                let removed = gone.into_iter().filter_map(|k| self.items.remove(&k).map(|v| (k, v))).collect();
                self.listed = true;
                Folded::Listed(removed)
            }
            WatchEvent::Apply(key, value) => match self.items.insert(key.clone(), value) {
                Some(before) if Some(&before) == self.items.get(&key) => Folded::Nothing,
                before => Folded::Changed(key, before),
            },
            WatchEvent::Delete(key) => match self.items.remove(&key) {
                Some(before) => Folded::Changed(key, Some(before)),
                None => Folded::Nothing,
            },
        }
    }

    /// Puts an object in as a watch event would, for tests that build a store by hand.
    #[cfg(test)]
    pub fn insert(&mut self, key: K, value: V) {
        self.apply(WatchEvent::Apply(key, value));
    }

    /// Whether a first listing has completed.
    pub fn listed(&self) -> bool {
        self.listed
    }
}

impl<K, V> std::ops::Deref for Store<K, V> {
    type Target = BTreeMap<K, V>;
    fn deref(&self) -> &Self::Target {
        &self.items
    }
}

impl<'a, K, V> IntoIterator for &'a Store<K, V> {
    type Item = (&'a K, &'a V);
    type IntoIter = std::collections::btree_map::Iter<'a, K, V>;
    fn into_iter(self) -> Self::IntoIter {
        self.items.iter()
    }
}

impl<K: Ord, V> FromIterator<(K, V)> for Store<K, V> {
    /// A store that holds these, as after a listing of them.
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Store { items: iter.into_iter().collect(), listing: None, listed: true }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Event = WatchEvent<&'static str, u32>;

    fn fold(store: &mut Store<&'static str, u32>, events: Vec<Event>) -> Vec<Folded<&'static str, u32>> {
        events.into_iter().map(|e| store.apply(e)).filter(|f| *f != Folded::Nothing).collect()
    }

    #[test]
    fn a_listing_replaces_the_store_at_its_end_and_changes_come_one_by_one() {
        let mut store = Store::default();
        assert!(!store.listed());
        let folded = fold(
            &mut store,
            vec![WatchEvent::Init, WatchEvent::InitApply("a", 1), WatchEvent::InitApply("b", 2), WatchEvent::InitDone],
        );
        assert_eq!(folded, vec![Folded::Listed(vec![])]);
        assert!(store.listed());
        assert_eq!(store.len(), 2);
        assert_eq!(
            fold(&mut store, vec![WatchEvent::Apply("a", 1), WatchEvent::Apply("a", 3), WatchEvent::Delete("z")]),
            vec![Folded::Changed("a", Some(1))],
            "an unchanged object and a deleted unknown one are nothing"
        );
        assert_eq!(fold(&mut store, vec![WatchEvent::Apply("c", 4)]), vec![Folded::Changed("c", None)]);
        assert_eq!(fold(&mut store, vec![WatchEvent::Delete("b")]), vec![Folded::Changed("b", Some(2))]);
        // A relist that misses "a": it is removed at the end, not before.
        store.apply(WatchEvent::Init);
        store.apply(WatchEvent::InitApply("c", 5));
        assert!(store.contains_key("a"), "still there while the listing runs");
        assert_eq!(store.apply(WatchEvent::InitDone), Folded::Listed(vec![("a", 3)]));
        assert_eq!(store.iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>(), [("c", 5)]);
        // An InitDone without an Init (a stream that lost its start) keeps what was named: nothing.
        assert_eq!(store.apply(WatchEvent::InitDone), Folded::Listed(vec![("c", 5)]));
        assert!(store.is_empty());
    }

    #[test]
    fn events_map_their_values() {
        assert_eq!(WatchEvent::Apply("a", 2).map(|_, v: u32| v * 10), WatchEvent::Apply("a", 20));
        assert_eq!(WatchEvent::<&str, u32>::Delete("a").map(|_, v| v * 10), WatchEvent::Delete("a"));
    }
}
