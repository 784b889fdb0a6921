//! The block KV cache: encoded contexts keyed by their content, under a memory budget.
//!
//! A block's K/V depend on the model, on the encoding scheme that produced it (APE encodes a
//! context after the shared prefix at positions `P..`, Block-Attention encodes it alone from
//! position 0) and on the tokens it attended to, so that is the key: model identity, scheme,
//! prefix tokens and the block's own tokens. Blocks are handed out as `Arc`s; a block whose `Arc`
//! is held outside the cache is in use (pinned) and is never evicted. When an insertion would
//! exceed the budget, unpinned blocks are evicted least recently used first; if that is not enough
//! the insertion fails with [`Error::CacheFull`] rather than silently overrunning the budget.

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::llama::model::KvBlock;

/// How a cached block was encoded (part of its key).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// APE / parallel encoding: after the prefix (which is part of the key), at positions `P..`.
    AfterPrefix,
    /// Alone, from position 0: Block-Attention's blocks, and the shared prefix in every mode (the
    /// same computation, so APE and Block-Attention requests share the prefix's block).
    Alone,
}

/// What identifies a cached block.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BlockKey {
    /// The model the block was computed with (e.g. file name, size and tensor count).
    pub model: String,
    /// How it was encoded.
    pub scheme: Scheme,
    /// The tokens it attended to before its own (the prefix, for [`Scheme::AfterPrefix`]).
    pub prefix: Vec<u32>,
    /// The block's own tokens.
    pub tokens: Vec<u32>,
}

/// Counters since the cache was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups that found their block.
    pub hits: u64,
    /// Lookups that had to encode it.
    pub misses: u64,
    /// Blocks evicted to make room.
    pub evictions: u64,
    /// Bytes held now.
    pub bytes: usize,
    /// Blocks held now.
    pub blocks: usize,
}

struct Entry<B> {
    block: Arc<B>,
    bytes: usize,
    last_used: u64,
}

/// Encoded blocks under a byte budget, least-recently-used eviction of blocks not in use.
pub struct BlockCache<B> {
    budget: usize,
    entries: HashMap<BlockKey, Entry<B>>,
    clock: u64,
    stats: CacheStats,
}

impl<B> std::fmt::Debug for BlockCache<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockCache")
            .field("budget", &self.budget)
            .field("stats", &self.stats)
            .finish()
    }
}

impl<B: KvBlock> BlockCache<B> {
    /// An empty cache that holds at most `budget_bytes` of blocks.
    pub fn new(budget_bytes: usize) -> Self {
        Self {
            budget: budget_bytes,
            entries: HashMap::new(),
            clock: 0,
            stats: CacheStats::default(),
        }
    }

    /// The block for `key`, encoding it with `encode` on a miss. The returned `Arc` pins the block
    /// until it is dropped.
    ///
    /// `expected_bytes` is what the block will hold once encoded: on a miss, a block that could
    /// not be stored (larger than the budget, or than the room the blocks in use leave) is refused
    /// with [`Error::CacheFull`] before `encode` runs, so no work is spent on it. The encoded
    /// block's own [`KvBlock::bytes`] is what is stored and checked again.
    pub fn get_or_encode(
        &mut self,
        key: BlockKey,
        expected_bytes: usize,
        encode: impl FnOnce() -> Result<B>,
    ) -> Result<Arc<B>> {
        self.clock += 1;
        if let Some(e) = self.entries.get_mut(&key) {
            e.last_used = self.clock;
            self.stats.hits += 1;
            return Ok(e.block.clone());
        }
        self.stats.misses += 1;
        self.check_room(expected_bytes)?;
        let block = Arc::new(encode()?);
        let bytes = block.bytes();
        self.make_room(bytes)?;
        self.stats.bytes += bytes;
        self.stats.blocks += 1;
        self.entries.insert(
            key,
            Entry {
                block: block.clone(),
                bytes,
                last_used: self.clock,
            },
        );
        Ok(block)
    }

    /// Whether `bytes` more can be stored by evicting blocks not in use (nothing is evicted).
    fn check_room(&self, bytes: usize) -> Result<()> {
        if bytes > self.budget {
            return Err(Error::CacheFull(format!(
                "a block of {bytes} bytes exceeds the cache budget of {} bytes",
                self.budget
            )));
        }
        // Refuse before evicting anything when the blocks in use leave no room: evicting the
        // others would throw the cache away for nothing.
        let pinned: usize = self
            .entries
            .values()
            .filter(|e| Arc::strong_count(&e.block) > 1)
            .map(|e| e.bytes)
            .sum();
        if pinned + bytes > self.budget {
            return Err(Error::CacheFull(format!(
                "{bytes} bytes needed, {pinned} of {} bytes are held by blocks in use",
                self.budget
            )));
        }
        Ok(())
    }

    /// Evicts blocks not in use, least recently used first, until `bytes` more fit the budget.
    fn make_room(&mut self, bytes: usize) -> Result<()> {
        self.check_room(bytes)?;
        while self.stats.bytes + bytes > self.budget {
            let victim = self
                .entries
                .iter()
                .filter(|(_, e)| Arc::strong_count(&e.block) == 1)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone());
            let Some(key) = victim else {
                return Err(Error::CacheFull(format!(
                    "{} bytes needed, {} of {} bytes are held by blocks in use",
                    bytes, self.stats.bytes, self.budget
                )));
            };
            if let Some(e) = self.entries.remove(&key) {
                self.stats.bytes -= e.bytes;
                self.stats.blocks -= 1;
                self.stats.evictions += 1;
            }
        }
        Ok(())
    }

    /// The counters.
    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// True when `key` is cached.
    pub fn contains(&self, key: &BlockKey) -> bool {
        self.entries.contains_key(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake(usize);
    impl KvBlock for Fake {
        fn len(&self) -> usize {
            self.0
        }
        fn bytes(&self) -> usize {
            self.0 * 10
        }
    }

    fn key(t: u32) -> BlockKey {
        BlockKey {
            model: "m".into(),
            scheme: Scheme::AfterPrefix,
            prefix: vec![1, 2],
            tokens: vec![t],
        }
    }

    #[test]
    fn hits_misses_and_lru_eviction_of_unpinned_blocks() {
        let mut c = BlockCache::new(100);
        let a = c.get_or_encode(key(1), 40, || Ok(Fake(4))).unwrap(); // 40 bytes, pinned by `a`
        drop(c.get_or_encode(key(2), 40, || Ok(Fake(4))).unwrap()); // 40 bytes, unpinned
        assert!(c.get_or_encode(key(2), 0, || panic!("must hit")).is_ok());
        assert_eq!((c.stats().hits, c.stats().misses), (1, 2));
        // 30 more bytes: 110 > 100, so the unpinned block 2 goes, not the pinned block 1.
        drop(c.get_or_encode(key(3), 30, || Ok(Fake(3))).unwrap());
        assert!(c.contains(&key(1)) && !c.contains(&key(2)) && c.contains(&key(3)));
        assert_eq!(c.stats().evictions, 1);
        assert_eq!(c.stats().bytes, 70);
        // 50 more: block 3 is evicted; block 1 still pinned; 90 bytes fit.
        drop(c.get_or_encode(key(4), 50, || Ok(Fake(5))).unwrap());
        assert!(c.contains(&key(1)) && !c.contains(&key(3)));
        // 70 more with block 1 pinned: only block 4 can go, 40 + 70 > 100: refused, and block 4
        // stays (evicting it would not have made room).
        assert!(matches!(
            c.get_or_encode(key(5), 70, || Ok(Fake(7))),
            Err(Error::CacheFull(_))
        ));
        assert!(c.contains(&key(4)));
        assert_eq!(c.stats().evictions, 2);
        drop(a);
        // Unpinned now: block 1 and 4 are evicted in LRU order.
        assert!(c.get_or_encode(key(5), 70, || Ok(Fake(7))).is_ok());
        assert!(!c.contains(&key(1)));
        // Bigger than the whole budget: refused, nothing evicted for it.
        let before = c.stats();
        assert!(c.get_or_encode(key(6), 110, || Ok(Fake(11))).is_err());
        assert_eq!(c.stats().blocks, before.blocks);
    }

    #[test]
    fn a_block_that_cannot_fit_is_refused_before_encoding() {
        let mut c = BlockCache::new(100);
        // Larger than the budget: refused without encoding.
        let r = c.get_or_encode(key(1), 110, || -> Result<Fake> { panic!("encoded") });
        assert!(matches!(r, Err(Error::CacheFull(_))));
        // 60 bytes in use leave 40: a 50-byte block is refused without encoding, nothing evicted.
        let a = c.get_or_encode(key(2), 60, || Ok(Fake(6))).unwrap();
        let r = c.get_or_encode(key(3), 50, || -> Result<Fake> { panic!("encoded") });
        assert!(matches!(r, Err(Error::CacheFull(_))));
        assert!(c.contains(&key(2)) && c.stats().evictions == 0);
        // An expectation below the encoded size is checked again on the block itself.
        assert!(matches!(
            c.get_or_encode(key(3), 10, || Ok(Fake(5))),
            Err(Error::CacheFull(_))
        ));
        assert!(!c.contains(&key(3)));
        drop(a);
        assert_eq!(c.stats().misses, 4);
    }

    #[test]
    fn the_key_includes_model_scheme_and_prefix() {
        let mut c = BlockCache::new(1000);
        let k = key(1);
        drop(c.get_or_encode(k.clone(), 10, || Ok(Fake(1))).unwrap());
        for other in [
            BlockKey {
                model: "other".into(),
                ..k.clone()
            },
            BlockKey {
                scheme: Scheme::Alone,
                ..k.clone()
            },
            BlockKey {
                prefix: vec![9],
                ..k.clone()
            },
        ] {
            assert!(!c.contains(&other));
        }
        assert!(c.contains(&k));
    }

    #[test]
    fn an_encoding_error_caches_nothing() {
        let mut c: BlockCache<Fake> = BlockCache::new(1000);
        assert!(c
            .get_or_encode(key(1), 10, || Err(Error::Model("boom".into())))
            .is_err());
        assert!(!c.contains(&key(1)));
        assert_eq!(c.stats().blocks, 0);
    }
}
