//! Label sets kept once however many hold them.
//!
//! The pods of one workload carry the same labels, and the snapshot, the
//! identity cache and the policy model each hold every pod's: at 10,000 pods
//! that was three copies of 10,000 maps where a few hundred distinct ones
//! exist. A [`LabelSet`] is a shared, read-only label map; [`LabelSet::new`]
//! hands out the one already in use for equal labels, so pods, identities and
//! policy models of a workload point at one map. The table of sets in use
//! holds them weakly: a set is freed, and leaves the table, when its last
//! holder drops it.

use std::{
    collections::HashMap,
    fmt,
    hash::{BuildHasher, Hash, Hasher, RandomState},
    ops::Deref,
    sync::{Arc, LazyLock, Mutex, MutexGuard, PoisonError, Weak},
};

pub use crate::policy::Labels;

/// A shared label map: cloning it is a reference count.
#[derive(Clone)]
pub struct LabelSet(Arc<Interned>);

struct Interned {
    labels: Labels,
    /// The table's hash of `labels`, to find the entry again on drop.
    hash: u64,
}

/// The label sets in use, by hash of their labels.
struct Table {
    // Randomly keyed: label values come from whoever may create pods.
    hasher: RandomState,
    sets: HashMap<u64, Vec<Weak<Interned>>>,
}

static TABLE: LazyLock<Mutex<Table>> = LazyLock::new(|| {
    Mutex::new(Table {
        hasher: RandomState::new(),
        sets: HashMap::new(),
    })
});

fn table() -> MutexGuard<'static, Table> {
    // The table stays consistent between statements: a panic elsewhere
    // while it was locked leaves nothing half-done.
    TABLE.lock().unwrap_or_else(PoisonError::into_inner)
}

impl LabelSet {
    /// The set in use with these labels, or a new one.
    pub fn new(labels: Labels) -> LabelSet {
        // Sets looked at and not taken are released after the table is
        // unlocked: releasing the last holder of one locks the table.
        let mut looked_at = Vec::new();
        let mut table = table();
        let hash = table.hasher.hash_one(&labels);
        let bucket = table.sets.entry(hash).or_default();
        for weak in bucket.iter() {
            if let Some(set) = weak.upgrade() {
                if set.labels == labels {
                    return LabelSet(set);
                }
                looked_at.push(set);
            }
        }
        let set = Arc::new(Interned { labels, hash });
        bucket.push(Arc::downgrade(&set));
        drop(table);
        drop(looked_at);
        LabelSet(set)
    }

    /// The set in use with these labels, if any holder keeps one.
    pub fn in_use(labels: &Labels) -> Option<LabelSet> {
        let mut looked_at = Vec::new();
        let table = table();
        let hash = table.hasher.hash_one(labels);
        for weak in table.sets.get(&hash).into_iter().flatten() {
            if let Some(set) = weak.upgrade() {
                if set.labels == *labels {
                    return Some(LabelSet(set));
                }
                looked_at.push(set);
            }
        }
        drop(table);
        drop(looked_at);
        None
    }

    /// How many entries the table has for these labels, live or not.
    #[cfg(test)]
    fn entries(labels: &Labels) -> usize {
        let table = table();
        let hash = table.hasher.hash_one(labels);
        table.sets.get(&hash).map_or(0, Vec::len)
    }

    /// Whether `a` and `b` are the same shared map, not only equal ones.
    pub fn same(a: &LabelSet, b: &LabelSet) -> bool {
        Arc::ptr_eq(&a.0, &b.0)
    }

    pub fn labels(&self) -> &Labels {
        &self.0.labels
    }
}

impl Drop for Interned {
    fn drop(&mut self) {
        // This set's entry no longer upgrades (its strong count is 0); a set
        // of the same labels made since has an entry of its own, kept.
        let mut table = table();
        if let Some(bucket) = table.sets.get_mut(&self.hash) {
            bucket.retain(|w| w.strong_count() > 0);
            if bucket.is_empty() {
                table.sets.remove(&self.hash);
            }
        }
    }
}

impl Deref for LabelSet {
    type Target = Labels;

    fn deref(&self) -> &Labels {
        &self.0.labels
    }
}

impl AsRef<Labels> for LabelSet {
    fn as_ref(&self) -> &Labels {
        &self.0.labels
    }
}

impl From<Labels> for LabelSet {
    fn from(labels: Labels) -> Self {
        LabelSet::new(labels)
    }
}

impl Default for LabelSet {
    fn default() -> Self {
        LabelSet::new(Labels::new())
    }
}

impl PartialEq for LabelSet {
    fn eq(&self, other: &Self) -> bool {
        LabelSet::same(self, other) || self.0.labels == other.0.labels
    }
}

impl Eq for LabelSet {}

impl PartialEq<Labels> for LabelSet {
    fn eq(&self, other: &Labels) -> bool {
        self.0.labels == *other
    }
}

impl Hash for LabelSet {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // As the map hashes: equal sets hash alike whether shared or not.
        self.0.labels.hash(state);
    }
}

impl PartialOrd for LabelSet {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for LabelSet {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.labels.cmp(&other.0.labels)
    }
}

impl fmt::Debug for LabelSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.labels.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn equal_labels_share_one_map_that_is_freed_with_its_last_holder() {
        // Labels no other test uses: the table is the process's.
        let web = labels(&[("app", "labels-test-web"), ("tier", "front")]);
        assert!(LabelSet::in_use(&web).is_none());
        let a = LabelSet::new(web.clone());
        let b = LabelSet::new(web.clone());
        assert!(LabelSet::same(&a, &b));
        assert_eq!(*a, web);
        let other = LabelSet::new(labels(&[("app", "labels-test-db")]));
        assert!(!LabelSet::same(&a, &other));
        assert_ne!(a, other);

        drop(a);
        assert!(LabelSet::in_use(&web).is_some_and(|s| LabelSet::same(&s, &b)));
        assert_eq!(LabelSet::entries(&web), 1);
        drop(b);
        // Gone from the table too, not only unreachable.
        assert!(LabelSet::in_use(&web).is_none());
        assert_eq!(LabelSet::entries(&web), 0);
        // A set made again is a new one, and still shared.
        let c = LabelSet::new(web.clone());
        assert!(LabelSet::same(&c, &LabelSet::new(web.clone())));
        drop((c, other));
        assert!(LabelSet::in_use(&web).is_none());
        assert!(LabelSet::in_use(&labels(&[("app", "labels-test-db")])).is_none());
    }
}
