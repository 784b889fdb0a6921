//! The Redis tier: the blocks every process and machine pointed at one Redis server share.
//!
//! Keys (a `redis://host:port/db` URL chooses the server and database):
//!
//! ```text
//! ape:kv:<key>    a stored block, the same bytes as a disk tier's file
//! ape:lock:<key>  held (with an expiry) while a process encodes the block
//! ape:stats       a hash of the counters of every process (hits, misses, ...)
//! ```
//!
//! Redis holds what it is given until its own `maxmemory` policy evicts (run it with
//! `maxmemory-policy allkeys-lru` to make it a cache of blocks). A server that stops answering
//! is a warning, not an error: the tier is skipped for a while, then tried again, and the
//! answer comes from the tiers that remain.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{
    hex, read_block, warn, BlockSpec, Count, Counters, Fill, StoreError, TierCounters, TierStats,
};

const BLOCK_PREFIX: &str = "ape:kv:";
const LOCK_PREFIX: &str = "ape:lock:";
const STATS_KEY: &str = "ape:stats";
/// How long a server that failed is left alone before it is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(10);
/// A lock outlives a process that died holding it by at most this long.
const LOCK_EXPIRY: Duration = Duration::from_secs(120);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Per command: a block of hundreds of MB on a slow link takes a while.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Redis's default limit on one value (`proto-max-bulk-len`).
const MAX_VALUE: usize = 512 << 20;

enum State {
    Up(Box<redis::Connection>),
    Down { retry_at: Instant },
}

/// The Redis tier.
pub struct RedisTier {
    url: String,
    client: redis::Client,
    state: Mutex<State>,
    counters: Counters,
    /// Who holds a lock (`pid@host`), so that only the holder releases it.
    owner: String,
}

/// A held encode lock on Redis, released when dropped.
pub struct RedisLock {
    tier: Arc<RedisTier>,
    key: String,
}

impl Drop for RedisLock {
    fn drop(&mut self) {
        // Delete the lock only if it is still ours (it may have expired and been taken).
        let _ = self.tier.run(|c| {
            redis::cmd("EVAL")
                .arg("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end")
                .arg(1)
                .arg(&self.key)
                .arg(&self.tier.owner)
                .query::<i64>(c)
        });
    }
}

impl RedisTier {
    /// The tier on the server at `url` (`redis://127.0.0.1:6379`); connects on first use.
    pub fn open(url: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url)
            .map_err(|e| StoreError::Config(format!("redis URL {url:?}: {e}")))?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        Ok(Self {
            url: url.to_string(),
            client,
            state: Mutex::new(State::Down {
                retry_at: Instant::now(),
            }),
            counters: Counters::default(),
            owner: format!("{}@{host}", std::process::id()),
        })
    }

    /// The server's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Runs `f` on the connection, connecting first when needed. `None` when the server cannot
    /// be reached (the tier is then skipped for [`RETRY_AFTER`]; the first failure is a warning).
    fn run<T>(&self, f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>) -> Option<T> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let State::Down { retry_at } = *state {
            if Instant::now() < retry_at {
                return None;
            }
            match self.connect() {
                Ok(c) => *state = State::Up(Box::new(c)),
                Err(e) => {
                    warn(format!(
                        "redis {} unreachable ({e}); going on without it",
                        self.url
                    ));
                    *state = State::Down {
                        retry_at: Instant::now() + RETRY_AFTER,
                    };
                    return None;
                }
            }
        }
        let State::Up(c) = &mut *state else {
            return None;
        };
        match f(c) {
            Ok(v) => Some(v),
            Err(e)
                if e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_timeout()
                    || e.is_unrecoverable_error() =>
            {
                warn(format!("redis {}: {e}; going on without it", self.url));
                *state = State::Down {
                    retry_at: Instant::now() + RETRY_AFTER,
                };
                None
            }
            Err(e) => {
                warn(format!("redis {}: {e}", self.url));
                None
            }
        }
    }

    fn connect(&self) -> redis::RedisResult<redis::Connection> {
        let c = self.client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
        c.set_read_timeout(Some(IO_TIMEOUT))?;
        c.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(c)
    }

    /// The block of `spec` with its stored bytes (to write to the disk tier), if the server holds
    /// a valid copy. A copy that fails a check is deleted and counted.
    pub fn load<B>(
        &self,
        spec: &BlockSpec,
        build: &mut dyn FnMut(&mut Fill<'_>) -> ape_attn::Result<B>,
    ) -> Option<(B, Vec<u8>)> {
        let key = format!("{BLOCK_PREFIX}{}", hex(&spec.key()));
        let bytes = self.run(|c| redis::cmd("GET").arg(&key).query::<Option<Vec<u8>>>(c))?;
        let Some(bytes) = bytes else {
            self.counters.add(Count::Miss, 1);
            return None;
        };
        match read_block(bytes.as_slice(), spec, build) {
            Ok(b) => {
                self.counters.add(Count::Hit, 1);
                Some((b, bytes))
            }
            Err(e) => {
                if let StoreError::Corrupt(why) = &e {
                    warn(format!(
                        "redis {key}: {why}; removed, the block is encoded again"
                    ));
                    let _ = self.run(|c| redis::cmd("DEL").arg(&key).query::<i64>(c));
                    self.counters.add(Count::Corrupt, 1);
                } else {
                    warn(format!("redis {key}: {e}"));
                }
                self.counters.add(Count::Miss, 1);
                None
            }
        }
    }

    /// Stores a block (`bytes` from [`BlockSpec::encode`]); a failure is a warning and a count.
    pub fn save(&self, spec: &BlockSpec, bytes: &[u8]) {
        if bytes.len() > MAX_VALUE {
            self.counters.add(Count::WriteError, 1);
            warn(format!(
                "a block of {} bytes is larger than a Redis value may be; not stored in Redis",
                bytes.len()
            ));
            return;
        }
        let key = format!("{BLOCK_PREFIX}{}", hex(&spec.key()));
        match self.run(|c| redis::cmd("SET").arg(&key).arg(bytes).query::<()>(c)) {
            Some(()) => self.counters.add(Count::Write, 1),
            None => self.counters.add(Count::WriteError, 1),
        }
    }

    /// Takes the encode lock of `key`, waiting while another process holds it (until the holder
    /// releases it, it expires, or `deadline`); says whether it had to wait. No lock when the
    /// server is unreachable.
    pub fn lock(self: &Arc<Self>, key: &[u8; 32], deadline: Instant) -> (Option<RedisLock>, bool) {
        let name = format!("{LOCK_PREFIX}{}", hex(key));
        let mut pause = Duration::from_millis(2);
        let mut waited = false;
        loop {
            let Some(took) = self.run(|c| {
                redis::cmd("SET")
                    .arg(&name)
                    .arg(&self.owner)
                    .arg("NX")
                    .arg("PX")
                    .arg(LOCK_EXPIRY.as_millis() as u64)
                    .query::<Option<String>>(c)
            }) else {
                return (None, waited);
            };
            if took.is_some() {
                let lock = RedisLock {
                    tier: self.clone(),
                    key: name,
                };
                return (Some(lock), waited);
            }
            if Instant::now() >= deadline {
                warn("waited too long for another process encoding the same block; encoding it here too");
                return (None, true);
            }
            waited = true;
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(25));
        }
    }

    /// Adds this process's counters to the server's stats hash.
    pub fn flush_counters(&self) {
        let d = self.counters.take();
        if d == TierCounters::default() {
            return;
        }
        let _ = self.run(|c| {
            redis::pipe()
                .cmd("HINCRBY")
                .arg(STATS_KEY)
                .arg("hits")
                .arg(d.hits)
                .ignore()
                .cmd("HINCRBY")
                .arg(STATS_KEY)
                .arg("misses")
                .arg(d.misses)
                .ignore()
                .cmd("HINCRBY")
                .arg(STATS_KEY)
                .arg("writes")
                .arg(d.writes)
                .ignore()
                .cmd("HINCRBY")
                .arg(STATS_KEY)
                .arg("evictions")
                .arg(d.evictions)
                .ignore()
                .cmd("HINCRBY")
                .arg(STATS_KEY)
                .arg("corrupt")
                .arg(d.corrupt)
                .ignore()
                .cmd("HINCRBY")
                .arg(STATS_KEY)
                .arg("write_errors")
                .arg(d.write_errors)
                .ignore()
                .query::<()>(c)
        });
    }

    /// Every block key on the server.
    fn keys(&self) -> Option<Vec<String>> {
        self.run(|c| {
            let mut keys = Vec::new();
            let mut cursor: u64 = 0;
            loop {
                let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(format!("{BLOCK_PREFIX}*"))
                    .arg("COUNT")
                    .arg(1000)
                    .query(c)?;
                keys.extend(batch);
                if next == 0 {
                    return Ok(keys);
                }
                cursor = next;
            }
        })
    }

    /// What the server holds and the counters of every process that used it; `None` when it
    /// cannot be reached.
    pub fn stats(&self) -> Option<TierStats> {
        let keys = self.keys()?;
        let mut bytes = 0u64;
        for chunk in keys.chunks(1000) {
            let lens: Vec<u64> = self.run(|c| {
                let mut p = redis::pipe();
                for k in chunk {
                    p.cmd("STRLEN").arg(k);
                }
                p.query(c)
            })?;
            bytes += lens.iter().sum::<u64>();
        }
        let h: std::collections::HashMap<String, u64> =
            self.run(|c| redis::cmd("HGETALL").arg(STATS_KEY).query(c))?;
        let g = |k: &str| h.get(k).copied().unwrap_or(0);
        let mut counters = TierCounters {
            hits: g("hits"),
            misses: g("misses"),
            writes: g("writes"),
            evictions: g("evictions"),
            corrupt: g("corrupt"),
            write_errors: g("write_errors"),
        };
        counters += self.counters.get();
        Some(TierStats {
            blocks: keys.len() as u64,
            bytes,
            counters,
        })
    }

    /// Removes every block, lock and the counters; returns the blocks removed.
    pub fn clear(&self) -> Result<u64, StoreError> {
        let unreachable = || StoreError::Redis(format!("{} unreachable", self.url));
        let keys = self.keys().ok_or_else(unreachable)?;
        for chunk in keys.chunks(1000) {
            self.run(|c| redis::cmd("DEL").arg(chunk).query::<i64>(c))
                .ok_or_else(unreachable)?;
        }
        self.run(|c| redis::cmd("DEL").arg(STATS_KEY).query::<i64>(c))
            .ok_or_else(unreachable)?;
        self.counters.take();
        Ok(keys.len() as u64)
    }

    /// True when the server answers a PING now.
    pub fn reachable(&self) -> bool {
        self.run(|c| redis::cmd("PING").query::<String>(c))
            .is_some()
    }
}
