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

use ape_attn::{Error, Result};

/// What the cache needs to know about a block (a forward pass's K and V of some tokens).
pub trait KvBlock {
    /// Tokens in the block.
    fn len(&self) -> usize;
    /// True for a block of no tokens.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes the block holds.
    fn bytes(&self) -> usize;
}

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

    /// Forgets every block (blocks in use stay alive with their users); the counters stay.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.stats.bytes = 0;
        self.stats.blocks = 0;
    }

    /// True when `key` is cached.
    pub fn contains(&self, key: &BlockKey) -> bool {
        self.entries.contains_key(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A block of `.0` tokens and `.1` bytes.
    struct Fake(usize, usize);
    impl KvBlock for Fake {
        fn len(&self) -> usize {
            self.0
        }
        fn bytes(&self) -> usize {
            self.1
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
        let a = c.get_or_encode(key(1), 40, || Ok(Fake(4, 40))).unwrap(); // 40 bytes, pinned by `a`
        drop(c.get_or_encode(key(2), 40, || Ok(Fake(4, 40))).unwrap()); // 40 bytes, unpinned
        assert!(c.get_or_encode(key(2), 0, || panic!("must hit")).is_ok());
        assert_eq!((c.stats().hits, c.stats().misses), (1, 2));
        // 30 more bytes: 110 > 100, so the unpinned block 2 goes, not the pinned block 1.
        drop(c.get_or_encode(key(3), 30, || Ok(Fake(3, 30))).unwrap());
        assert!(c.contains(&key(1)) && !c.contains(&key(2)) && c.contains(&key(3)));
        assert_eq!(c.stats().evictions, 1);
        assert_eq!(c.stats().bytes, 70);
        // 50 more: block 3 is evicted; block 1 still pinned; 90 bytes fit.
        drop(c.get_or_encode(key(4), 50, || Ok(Fake(5, 50))).unwrap());
        assert!(c.contains(&key(1)) && !c.contains(&key(3)));
        // 70 more with block 1 pinned: only block 4 can go, 40 + 70 > 100: refused, and block 4
        // stays (evicting it would not have made room).
        assert!(matches!(
            c.get_or_encode(key(5), 70, || Ok(Fake(7, 70))),
            Err(Error::CacheFull(_))
        ));
        assert!(c.contains(&key(4)));
        assert_eq!(c.stats().evictions, 2);
        drop(a);
        // Unpinned now: block 1 and 4 are evicted in LRU order.
        assert!(c.get_or_encode(key(5), 70, || Ok(Fake(7, 70))).is_ok());
        assert!(!c.contains(&key(1)));
        // Bigger than the whole budget: refused, nothing evicted for it.
        let before = c.stats();
        assert!(c.get_or_encode(key(6), 110, || Ok(Fake(11, 110))).is_err());
        assert_eq!(c.stats().blocks, before.blocks);
    }

    #[test]
    fn a_block_that_cannot_fit_is_refused_before_encoding() {
        let mut c = BlockCache::new(100);
        // Larger than the budget: refused without encoding.
        let r = c.get_or_encode(key(1), 110, || -> Result<Fake> { panic!("encoded") });
        assert!(matches!(r, Err(Error::CacheFull(_))));
        // 60 bytes in use leave 40: a 50-byte block is refused without encoding, nothing evicted.
        let a = c.get_or_encode(key(2), 60, || Ok(Fake(6, 60))).unwrap();
        let r = c.get_or_encode(key(3), 50, || -> Result<Fake> { panic!("encoded") });
        assert!(matches!(r, Err(Error::CacheFull(_))));
        assert!(c.contains(&key(2)) && c.stats().evictions == 0);
        // An expectation below the encoded size is checked again on the block itself.
        assert!(matches!(
            c.get_or_encode(key(3), 10, || Ok(Fake(5, 50))),
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
        drop(c.get_or_encode(k.clone(), 10, || Ok(Fake(1, 10))).unwrap());
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

    /// What the cache must do, written out naively: the blocks it holds with their size and last
    /// use, and its counters.
    #[derive(Default)]
    struct Model {
        held: HashMap<u32, (usize, u64)>,
        clock: u64,
        stats: CacheStats,
    }

    /// Thousands of random get-or-encode, pin and release steps against a small budget, with
    /// encodings that fail and blocks larger than announced, checked after every step against the
    /// model: the same blocks held, pinned blocks never evicted, least recently used first out,
    /// bytes within the budget, counters that add up, and a refused block that changes nothing
    /// (and is refused before encoding whenever its announced size cannot fit).
    #[test]
    fn random_operations_under_pressure_keep_every_invariant() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        const BUDGET: usize = 1000;
        const KEYS: u32 = 40;
        for seed in 0..6u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            // Each key's encoded size: mostly a few percent of the budget, some huge.
            let size: Vec<usize> = (0..KEYS)
                .map(|_| match rng.gen_range(0..20) {
                    0 => rng.gen_range(BUDGET..2 * BUDGET),
                    1..=3 => rng.gen_range(200..600),
                    _ => rng.gen_range(1..120),
                })
                .collect();
            let mut cache: BlockCache<Fake> = BlockCache::new(BUDGET);
            let mut model = Model::default();
            let mut pins: Vec<(u32, Arc<Fake>)> = Vec::new();
            let (mut refused_early, mut refused_late, mut evicting) = (0, 0, 0);
            for step in 0..4000 {
                let pinned = |pins: &[(u32, Arc<Fake>)], k: u32| pins.iter().any(|p| p.0 == k);
                match rng.gen_range(0..10) {
                    // Release a pin.
                    0..=2 if !pins.is_empty() => {
                        let i = rng.gen_range(0..pins.len());
                        pins.swap_remove(i);
                    }
                    // Pin a held block once more.
                    3 if !pins.is_empty() => {
                        let p = pins[rng.gen_range(0..pins.len())].clone();
                        pins.push(p);
                    }
                    // Look a block up, encoding it on a miss.
                    _ => {
                        let k = rng.gen_range(0..KEYS);
                        let bytes = size[k as usize];
                        // The announced size is usually right; sometimes it is too low.
                        let expected = match rng.gen_range(0..8) {
                            0 => bytes / 2,
                            _ => bytes,
                        };
                        let fails = rng.gen_range(0..12) == 0;
                        let stats_before = cache.stats();
                        let mut encoded = false;
                        let got = cache.get_or_encode(key(k), expected, || {
                            encoded = true;
                            if fails {
                                Err(Error::Model("encoding failed".into()))
                            } else {
                                Ok(Fake(bytes / 10, bytes))
                            }
                        });
                        let got_err = got.is_err();
                        model.clock += 1;
                        let now = model.clock;
                        let pinned_bytes: usize = model
                            .held
                            .iter()
                            .filter(|(&h, _)| pinned(&pins, h))
                            .map(|(_, &(b, _))| b)
                            .sum();
                        if let Some(entry) = model.held.get_mut(&k) {
                            entry.1 = now;
                            model.stats.hits += 1;
                            assert!(!encoded, "seed {seed} step {step}: a hit must not encode");
                            let block = got.expect("a hit");
                            if let Some(p) = pins.iter().find(|p| p.0 == k) {
                                assert!(Arc::ptr_eq(&p.1, &block), "a hit is the held block");
                            }
                            if rng.gen_bool(0.5) {
                                pins.push((k, block));
                            }
                        } else {
                            model.stats.misses += 1;
                            let fits = |b: usize| b <= BUDGET && pinned_bytes + b <= BUDGET;
                            if !fits(expected) {
                                refused_early += 1;
                                assert!(!encoded, "refused before encoding");
                                assert!(matches!(got, Err(Error::CacheFull(_))));
                            } else if fails {
                                assert!(encoded && matches!(got, Err(Error::Model(_))));
                            } else if !fits(bytes) {
                                refused_late += 1;
                                assert!(encoded && matches!(got, Err(Error::CacheFull(_))));
                            } else {
                                // Evict the least recently used blocks not in use until it fits.
                                while model.stats.bytes + bytes > BUDGET {
                                    let (&victim, &(b, _)) = model
                                        .held
                                        .iter()
                                        .filter(|(&h, _)| !pinned(&pins, h))
                                        .min_by_key(|(_, &(_, used))| used)
                                        .expect("room can be made: checked above");
                                    model.held.remove(&victim);
                                    model.stats.bytes -= b;
                                    model.stats.blocks -= 1;
                                    model.stats.evictions += 1;
                                    evicting += 1;
                                }
                                model.held.insert(k, (bytes, now));
                                model.stats.bytes += bytes;
                                model.stats.blocks += 1;
                                let block = got.expect("a block that fits is stored");
                                assert_eq!(block.bytes(), bytes);
                                if rng.gen_bool(0.5) {
                                    pins.push((k, block));
                                }
                            }
                            if got_err {
                                // A refusal or a failed encoding changes nothing but the misses;
                                // the blocks held are compared with the model below.
                                let after = cache.stats();
                                assert_eq!(
                                    after,
                                    CacheStats {
                                        misses: stats_before.misses + 1,
                                        ..stats_before
                                    },
                                    "seed {seed} step {step}"
                                );
                            }
                        }
                    }
                }
                // The cache is the model, after every step.
                let stats = cache.stats();
                assert_eq!(stats, model.stats, "seed {seed} step {step}");
                assert!(stats.bytes <= BUDGET);
                assert_eq!(model.held.len(), stats.blocks);
                assert_eq!(
                    model.held.values().map(|&(b, _)| b).sum::<usize>(),
                    stats.bytes
                );
                for k in 0..KEYS {
                    assert_eq!(
                        cache.contains(&key(k)),
                        model.held.contains_key(&k),
                        "key {k}"
                    );
                }
                for (k, _) in &pins {
                    assert!(cache.contains(&key(*k)), "pinned block {k} was evicted");
                }
            }
            // The run reached every branch it checks.
            assert!(
                refused_early > 0 && refused_late > 0 && evicting > 0,
                "seed {seed}: {refused_early} early and {refused_late} late refusals, {evicting} evictions"
            );
        }
    }
}
