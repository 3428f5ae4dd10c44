//! Short-lived in-memory answers for the read side, so the lookups every substituter makes do
//! not each cost a database round trip.
//!
//! ```text
//!   GET <hash>.narinfo ──► repository record (cached ~1 s) ──► narinfo text (cached, hits only)
//!                                    └── miss ──► Metadata (spawn_blocking) ──► cache
//! ```
//! Only what is safe to serve slightly stale is cached: published narinfos never change (a
//! deletion shows after at most the lifetime), repository records change rarely and their
//! lifetime is a second. Misses are not cached, so a path published a moment ago is found at
//! once, on every replica. Tokens are never cached: a revocation applies at once.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Shards keep lock hold times short under concurrent readers.
const SHARDS: usize = 16;

pub struct TtlCache<V> {
    shards: Vec<Mutex<HashMap<String, (Instant, V)>>>,
    hasher: RandomState,
    ttl: Duration,
    per_shard: usize,
}

impl<V: Clone> TtlCache<V> {
    /// At most `capacity` entries, each served for `ttl`; a zero of either disables caching.
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        TtlCache {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            ttl,
            per_shard: capacity.div_ceil(SHARDS),
        }
    }

    fn shard(&self, key: &str) -> &Mutex<HashMap<String, (Instant, V)>> {
        let index = self.hasher.hash_one(key) as usize % SHARDS;
        &self.shards[index]
    }

    fn enabled(&self) -> bool {
        self.per_shard > 0 && !self.ttl.is_zero()
    }

    pub fn get(&self, key: &str) -> Option<V> {
        if !self.enabled() {
            return None;
        }
        let shard = self.shard(key).lock().unwrap_or_else(|p| p.into_inner());
        match shard.get(key) {
            Some((at, value)) if at.elapsed() < self.ttl => Some(value.clone()),
            _ => None,
        }
    }

    pub fn insert(&self, key: String, value: V) {
        if !self.enabled() {
            return;
        }
        let mut shard = self.shard(&key).lock().unwrap_or_else(|p| p.into_inner());
        if shard.len() >= self.per_shard && !shard.contains_key(&key) {
            let ttl = self.ttl;
            shard.retain(|_, (at, _)| at.elapsed() < ttl);
            // Still full of live entries: start the shard over rather than track recency;
            // the cost is one round of misses, the bound is what matters.
            if shard.len() >= self.per_shard {
                shard.clear();
            }
        }
        shard.insert(key, (Instant::now(), value));
    }

    /// Forgets every entry: more changed than is worth naming key by key.
    pub fn clear(&self) {
        for shard in &self.shards {
            shard.lock().unwrap_or_else(|p| p.into_inner()).clear();
        }
    }

    /// Drops `key` here (the process that changed it, or a path deleted on this replica, is
    /// not served from here again).
    pub fn forget(&self, key: &str) {
        self.shard(key)
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire_and_the_size_stays_bounded() {
        let cache = TtlCache::new(64, Duration::from_millis(50));
        cache.insert("a".into(), 1);
        assert_eq!(cache.get("a"), Some(1));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(cache.get("a"), None);
        for i in 0..10_000 {
            cache.insert(format!("k{i}"), i);
        }
        let held: usize = cache.shards.iter().map(|s| s.lock().unwrap().len()).sum();
        assert!(held <= 64, "{held} entries held");
        cache.insert("b".into(), 2);
        cache.forget("b");
        assert_eq!(cache.get("b"), None);
    }

    #[test]
    fn a_zero_capacity_or_lifetime_caches_nothing() {
        for cache in [
            TtlCache::new(0, Duration::from_secs(5)),
            TtlCache::new(10, Duration::ZERO),
        ] {
            cache.insert("a".into(), 1);
            assert_eq!(cache.get("a"), None);
        }
    }
}
