//! Label selectors (`metav1.LabelSelector`), checked once and matched many
//! times: `matchLabels` and `matchExpressions` with `In`, `NotIn`, `Exists`
//! and `DoesNotExist`, all of which must hold. The empty selector matches
//! everything.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// A shared string: label keys and values, node and port names repeat
/// across thousands of pods and are held once (see [`Interner`]).
pub type Str = Arc<str>;

/// A pod's or a namespace's labels, sorted by key. A boxed slice of shared
/// strings: three labels take 96 bytes per pod, where a `BTreeMap<String,
/// String>` takes over 500 (measured at 100,000 pods: docs/benchmarks.md).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Labels(Box<[(Str, Str)]>);

impl Labels {
    /// No labels.
    pub fn new() -> Self {
        Labels::default()
    }

    /// Labels from (key, value) pairs, each string taken from `interner`.
    pub fn from_pairs<K: AsRef<str>, V: AsRef<str>>(
        pairs: impl IntoIterator<Item = (K, V)>,
        interner: &mut Interner,
    ) -> Self {
        let mut v: Vec<(Str, Str)> =
            pairs.into_iter().map(|(k, v)| (interner.get(k.as_ref()), interner.get(v.as_ref()))).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v.dedup_by(|a, b| a.0 == b.0);
        Labels(v.into_boxed_slice())
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.binary_search_by(|(k, _)| (**k).cmp(key)).ok().map(|i| &*self.0[i].1)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }
}

/// Holds each distinct string once. `sweep` drops the strings no pod or
/// namespace uses any more (a ReplicaSet's `pod-template-hash` after its
/// rollout), so the set does not grow with the cluster's history.
#[derive(Debug, Default)]
pub struct Interner(HashSet<Str>);

impl Interner {
    /// The shared copy of `s`.
    pub fn get(&mut self, s: &str) -> Str {
        if let Some(shared) = self.0.get(s) {
            return shared.clone();
        }
        let shared: Str = Arc::from(s);
        self.0.insert(shared.clone());
        shared
    }

    /// Forgets the strings only the interner holds.
    pub fn sweep(&mut self) {
        self.0.retain(|s| Arc::strong_count(s) > 1);
    }

    /// Distinct strings held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.0.len()
    }
}

/// A selector, validated.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
    Exists(String),
    DoesNotExist(String),
}

impl Selector {
    /// Checks a selector as the API server does; the error says what is wrong.
    pub fn parse(selector: &LabelSelector) -> Result<Self, String> {
        let mut requirements: Vec<Requirement> =
            selector.match_labels.iter().flatten().map(|(k, v)| Requirement::Equals(k.clone(), v.clone())).collect();
        for e in selector.match_expressions.iter().flatten() {
            let values: BTreeSet<String> = e.values.iter().flatten().cloned().collect();
            let key = e.key.clone();
            requirements.push(match e.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(format!("operator {} on {key:?} needs values", e.operator))
                }
                "In" => Requirement::In(key, values),
                "NotIn" => Requirement::NotIn(key, values),
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(format!("operator {} on {key:?} takes no values", e.operator))
                }
                "Exists" => Requirement::Exists(key),
                "DoesNotExist" => Requirement::DoesNotExist(key),
                other => return Err(format!("unknown operator {other:?} (In, NotIn, Exists or DoesNotExist)")),
            });
        }
        Ok(Selector { requirements })
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v.as_str()),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        Labels::from_pairs(pairs.iter().copied(), &mut Interner::default())
    }

    fn expr(key: &str, operator: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: operator.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
        }
    }

    #[test]
    fn every_operator() {
        let s = Selector::parse(&LabelSelector {
            match_labels: Some([("app".to_string(), "web".to_string())].into()),
            match_expressions: Some(vec![
                expr("tier", "In", &["a", "b"]),
                expr("env", "NotIn", &["prod"]),
                expr("team", "Exists", &[]),
                expr("legacy", "DoesNotExist", &[]),
            ]),
        })
        .unwrap();
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "a"), ("team", "x")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "c"), ("team", "x")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "a"), ("team", "x"), ("env", "prod")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "a")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "a"), ("team", "x"), ("legacy", "")])));
        assert!(Selector::parse(&LabelSelector::default()).unwrap().matches(&Labels::new()));
    }

    #[test]
    fn labels_are_shared_and_swept() {
        let mut interner = Interner::default();
        let a = Labels::from_pairs([("app", "web"), ("hash", "1a2b")], &mut interner);
        let b = Labels::from_pairs([("hash", "3c4d"), ("app", "web")], &mut interner);
        assert_eq!((a.get("app"), b.get("hash"), a.get("nope")), (Some("web"), Some("3c4d"), None));
        assert_eq!(interner.len(), 5, "app, web, hash, and the two hashes' values");
        drop(a);
        interner.sweep();
        assert_eq!(interner.len(), 4, "1a2b is gone with the only pod that had it");
    }

    #[test]
    fn bad_selectors_say_why() {
        for (e, why) in [
            (expr("a", "Equals", &["x"]), "unknown operator"),
            (expr("a", "In", &[]), "needs values"),
            (expr("a", "Exists", &["x"]), "takes no values"),
        ] {
            let err =
                Selector::parse(&LabelSelector { match_expressions: Some(vec![e]), ..Default::default() }).unwrap_err();
            assert!(err.contains(why), "{err}");
        }
    }
}
