//! The block store behind the engine's memory cache: encoded passages kept beyond one process.
//!
//! Tiers, each optional: a local disk folder ([`disk`], on by default in the `ape` command) and a
//! Redis server shared by every process and machine pointed at it ([`redis`]). The memory tier is
//! the engine's [`crate::cache::BlockCache`]. A miss in memory looks on disk, then in Redis, and
//! only then encodes; a Redis hit is written to disk; what is encoded is written to every tier by
//! a background thread, so the answer never waits for a write.
//!
//! A stored block is self-describing (module [`format`](mod@format)): its key is a BLAKE3 hash of everything its K
//! and V depend on ([`BlockSpec`]), its header repeats all of it, and a checksum covers header and
//! data. A block that fails any check is deleted, counted and encoded again, never served.
//!
//! Encoding happens once under concurrency: before encoding, a caller [`claim`](BlockStore::claim)s
//! the block, which waits while another thread of this process, another process on this disk
//! folder, or another machine on this Redis is encoding it; the claim is released only once the
//! block is written, so the waiter then reads it instead of encoding it again.

pub mod disk;
pub mod format;
pub mod redis;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use format::{BlockFormat, BlockReader, BlockSpec, StoredDType, StoredScheme};

/// What went wrong in a tier. The engine turns every one of them into a warning and a miss (the
/// answer is still given); only opening a store the user named can fail a command.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A stored block that is not the one asked for, or damaged: deleted and counted.
    #[error("corrupt block: {0}")]
    Corrupt(String),
    /// The operating system refused (a full disk, a permission).
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A block or a field too large for the format or the tier.
    #[error("too large: {0}")]
    TooLarge(String),
    /// The Redis server refused or is unreachable.
    #[error("redis: {0}")]
    Redis(String),
    /// The model could not make a block of the stored data (out of device memory).
    #[error("cannot build the block: {0}")]
    Build(String),
    /// The store cannot be opened as configured.
    #[error("{0}")]
    Config(String),
}

/// Where a block came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// The engine's memory cache.
    Memory,
    /// The local disk tier.
    Disk,
    /// The shared Redis tier.
    Redis,
    /// Not stored anywhere: encoded by this request.
    Encoded,
}

impl Source {
    /// Short name, as printed.
    pub fn name(self) -> &'static str {
        match self {
            Source::Memory => "memory",
            Source::Disk => "disk",
            Source::Redis => "redis",
            Source::Encoded => "encoded",
        }
    }
}

/// Counters of one tier.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TierCounters {
    /// Lookups that found a valid block.
    pub hits: u64,
    /// Lookups that did not.
    pub misses: u64,
    /// Blocks written.
    pub writes: u64,
    /// Blocks removed to stay within the budget.
    pub evictions: u64,
    /// Blocks that failed a check on load, deleted.
    pub corrupt: u64,
    /// Writes that failed (a full disk, Redis gone) or were skipped (larger than the budget).
    pub write_errors: u64,
}

/// [`TierCounters`] updated from several threads, one atomic per [`Count`].
#[derive(Debug, Default)]
pub(crate) struct Counters([AtomicU64; 6]);

/// Which counter (its index in [`Counters`]).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Count {
    Hit,
    Miss,
    Write,
    Eviction,
    Corrupt,
    WriteError,
}

impl Counters {
    pub(crate) fn add(&self, c: Count, n: u64) {
        self.0[c as usize].fetch_add(n, Ordering::Relaxed);
    }

    /// The counters, each read by `read`.
    fn read(&self, read: impl Fn(&AtomicU64) -> u64) -> TierCounters {
        let at = |c: Count| read(&self.0[c as usize]);
        TierCounters {
            hits: at(Count::Hit),
            misses: at(Count::Miss),
            writes: at(Count::Write),
            evictions: at(Count::Eviction),
            corrupt: at(Count::Corrupt),
            write_errors: at(Count::WriteError),
        }
    }

    pub(crate) fn get(&self) -> TierCounters {
        self.read(|a| a.load(Ordering::Relaxed))
    }

    /// The counts so far, and zero again (what a flush hands on).
    pub(crate) fn take(&self) -> TierCounters {
        self.read(|a| a.swap(0, Ordering::Relaxed))
    }
}

impl std::ops::AddAssign for TierCounters {
    fn add_assign(&mut self, o: Self) {
        self.hits += o.hits;
        self.misses += o.misses;
        self.writes += o.writes;
        self.evictions += o.evictions;
        self.corrupt += o.corrupt;
        self.write_errors += o.write_errors;
    }
}

/// What a tier holds and has counted (across every process that used it, for disk and Redis).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TierStats {
    /// Blocks held.
    pub blocks: u64,
    /// Bytes held.
    pub bytes: u64,
    /// The counters.
    pub counters: TierCounters,
}

/// How to open a store.
#[derive(Clone, Debug, Default)]
pub struct StoreOptions {
    /// The disk tier's folder (`None`: no disk tier).
    pub dir: Option<PathBuf>,
    /// The disk tier's byte budget.
    pub disk_budget: u64,
    /// The Redis tier's URL (`redis://127.0.0.1:6379/0`; `None`: no Redis tier).
    pub redis: Option<String>,
}

/// A warning of the store, for the user (the engine's caller decides where it goes).
pub(crate) fn warn(msg: impl std::fmt::Display) {
    eprintln!("ape: warning: block store: {msg}");
}

/// The K and V of a block, built by the model from the stored data: `fill` is called with each
/// destination buffer in order and fills it from the stored block.
pub type Fill<'a> = dyn FnMut(&mut [u8]) -> ape_attn::Result<()> + 'a;

/// Reads the block of `spec` from `src` through the model's `build`: the header is checked first,
/// the data streamed into the model's buffers, the checksum checked last.
pub(crate) fn read_block<R: std::io::Read, B>(
    src: R,
    spec: &BlockSpec,
    build: &mut dyn FnMut(&mut Fill<'_>) -> ape_attn::Result<B>,
) -> Result<B, StoreError> {
    let mut reader = BlockReader::open(src, spec)?;
    let mut failure = None;
    let block = build(&mut |dst: &mut [u8]| {
        reader.fill(dst).map_err(|e| {
            let msg = e.to_string();
            failure = Some(e);
            ape_attn::Error::InvalidInput(msg)
        })
    });
    if let Some(e) = failure {
        return Err(e);
    }
    let block = block.map_err(|e| StoreError::Build(e.to_string()))?;
    reader.finish()?;
    Ok(block)
}

/// Writes in flight beyond this many bytes are written by the caller's thread (back-pressure: a
/// slow disk must not let encoded blocks pile up in memory).
const MAX_PENDING_BYTES: u64 = 1 << 30;
/// How long a claim waits for another encoder before encoding anyway.
const CLAIM_WAIT: Duration = Duration::from_secs(300);

/// A right to encode a block, released (waking those waiting for it) when dropped: after the
/// block is written, when it is handed to [`BlockStore::save`].
pub struct Claim {
    key: [u8; 32],
    waited: bool,
    inflight: Arc<Inflight>,
    disk: Option<disk::KeyLock>,
    redis: Option<redis::RedisLock>,
}

impl std::fmt::Debug for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claim").finish_non_exhaustive()
    }
}

impl Claim {
    /// True when the claim waited for another encoder (who may have stored the block since).
    pub fn waited(&self) -> bool {
        self.waited
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        // Redis and disk first: a thread woken below may go straight to claiming them.
        self.redis.take();
        self.disk.take();
        let mut set = self.inflight.keys.lock().unwrap_or_else(|e| e.into_inner());
        set.remove(&self.key);
        self.inflight.released.notify_all();
    }
}

#[derive(Default)]
struct Inflight {
    keys: Mutex<HashSet<[u8; 32]>>,
    released: Condvar,
}

struct Job {
    spec: BlockSpec,
    bytes: Vec<u8>,
    /// Skip the disk tier (the block was just read from it).
    disk: bool,
    redis: bool,
    _claim: Option<Claim>,
}

/// The tiers below memory, with the background writer.
pub struct BlockStore {
    tiers: Arc<Tiers>,
    inflight: Arc<Inflight>,
    writer: Mutex<Option<(mpsc::Sender<Job>, JoinHandle<()>)>>,
}

struct Tiers {
    disk: Option<disk::DiskTier>,
    redis: Option<Arc<redis::RedisTier>>,
    pending: AtomicU64,
}

impl Tiers {
    fn write(&self, job: &Job) {
        if job.disk {
            if let Some(d) = &self.disk {
                d.save(&job.spec, &job.bytes);
            }
        }
        if job.redis {
            if let Some(r) = &self.redis {
                r.save(&job.spec, &job.bytes);
            }
        }
    }
}

impl std::fmt::Debug for BlockStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockStore")
            .field(
                "disk",
                &self.tiers.disk.as_ref().map(|d| d.dir().to_path_buf()),
            )
            .field(
                "redis",
                &self.tiers.redis.as_ref().map(|r| r.url().to_string()),
            )
            .finish()
    }
}

impl BlockStore {
    /// Opens the tiers `opts` names. A disk folder that cannot be made, or a Redis URL that does
    /// not parse, is an error; a Redis server that does not answer is a warning (the tier is
    /// tried again later).
    pub fn open(opts: &StoreOptions) -> Result<Self, StoreError> {
        let disk = opts
            .dir
            .as_ref()
            .map(|d| disk::DiskTier::open(d, opts.disk_budget))
            .transpose()?;
        let redis = opts
            .redis
            .as_deref()
            .map(|u| redis::RedisTier::open(u).map(Arc::new))
            .transpose()?;
        Ok(Self::with_tiers(disk, redis))
    }

    fn with_tiers(disk: Option<disk::DiskTier>, redis: Option<Arc<redis::RedisTier>>) -> Self {
        Self {
            tiers: Arc::new(Tiers {
                disk,
                redis,
                pending: AtomicU64::new(0),
            }),
            inflight: Arc::new(Inflight::default()),
            writer: Mutex::new(None),
        }
    }

    /// The disk tier, if any.
    pub fn disk(&self) -> Option<&disk::DiskTier> {
        self.tiers.disk.as_ref()
    }

    /// The Redis tier, if any.
    pub fn redis(&self) -> Option<&redis::RedisTier> {
        self.tiers.redis.as_deref()
    }

    /// True when no tier is configured.
    pub fn is_empty(&self) -> bool {
        self.tiers.disk.is_none() && self.tiers.redis.is_none()
    }

    /// The block of `spec` from the first tier that holds a valid copy, built by `build` (see
    /// [`Fill`]), or `None`. A Redis hit is written to disk in the background.
    pub fn load<B>(
        &self,
        spec: &BlockSpec,
        build: &mut dyn FnMut(&mut Fill<'_>) -> ape_attn::Result<B>,
    ) -> Option<(B, Source)> {
        if let Some(d) = &self.tiers.disk {
            if let Some(b) = d.load(spec, build) {
                return Some((b, Source::Disk));
            }
        }
        let r = self.tiers.redis.as_ref()?;
        let (b, bytes) = r.load(spec, build)?;
        if self.tiers.disk.is_some() {
            self.enqueue(Job {
                spec: spec.clone(),
                bytes,
                disk: true,
                redis: false,
                _claim: None,
            });
        }
        Some((b, Source::Redis))
    }

    /// Waits until no one else (a thread of this process, a process on the same disk folder, a
    /// process on the same Redis) is encoding `spec`'s block, and takes the right to encode it.
    /// Look the block up again after this returns: the one waited for may have written it.
    pub fn claim(&self, spec: &BlockSpec) -> Claim {
        let key = spec.key();
        let deadline = Instant::now() + CLAIM_WAIT;
        let mut waited = false;
        {
            let mut set = self.inflight.keys.lock().unwrap_or_else(|e| e.into_inner());
            while set.contains(&key) {
                waited = true;
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    warn("waited too long for another thread encoding the same block; encoding it here too");
                    break;
                }
                set = self
                    .inflight
                    .released
                    .wait_timeout(set, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            set.insert(key);
        }
        let mut claim = Claim {
            key,
            waited,
            inflight: self.inflight.clone(),
            disk: None,
            redis: None,
        };
        if let Some(d) = &self.tiers.disk {
            let (lock, waited) = d.lock_key(&key, deadline);
            claim.disk = lock;
            claim.waited |= waited;
        }
        if let Some(r) = &self.tiers.redis {
            let (lock, waited) = r.lock(&key, deadline);
            claim.redis = lock;
            claim.waited |= waited;
        }
        claim
    }

    /// Writes a block just encoded (`data`: every layer's K then V, in the format's dtype) to
    /// every tier in the background, then releases `claim`.
    pub fn save(&self, spec: &BlockSpec, data: &[u8], claim: Claim) {
        if self.is_empty() {
            return;
        }
        match spec.encode(data) {
            Ok(bytes) => self.enqueue(Job {
                spec: spec.clone(),
                bytes,
                disk: true,
                redis: true,
                _claim: Some(claim),
            }),
            Err(e) => warn(format!("block not stored: {e}")),
        }
    }

    fn enqueue(&self, job: Job) {
        let n = job.bytes.len() as u64;
        if self.tiers.pending.load(Ordering::Relaxed) + n > MAX_PENDING_BYTES {
            self.tiers.write(&job);
            return;
        }
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if w.is_none() {
            let (tx, rx) = mpsc::channel::<Job>();
            let tiers = self.tiers.clone();
            let spawned = std::thread::Builder::new()
                .name("ape-store-writer".into())
                .spawn(move || {
                    for job in rx {
                        tiers.write(&job);
                        tiers
                            .pending
                            .fetch_sub(job.bytes.len() as u64, Ordering::Relaxed);
                    }
                });
            match spawned {
                Ok(h) => *w = Some((tx, h)),
                Err(_) => {
                    drop(w);
                    self.tiers.write(&job);
                    return;
                }
            }
        }
        self.tiers.pending.fetch_add(n, Ordering::Relaxed);
        let Some((tx, _)) = w.as_ref() else { return };
        if let Err(mpsc::SendError(job)) = tx.send(job) {
            self.tiers.pending.fetch_sub(n, Ordering::Relaxed);
            self.tiers.write(&job);
        }
    }

    /// Waits for every write handed to the background writer, and records this process's
    /// counters in the tiers (the disk tier's stats file, Redis's stats hash).
    pub fn flush(&self) {
        let w = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some((tx, h)) = w {
            drop(tx);
            let _ = h.join();
        }
        if let Some(d) = &self.tiers.disk {
            d.flush_counters();
        }
        if let Some(r) = &self.tiers.redis {
            r.flush_counters();
        }
    }
}

impl Default for BlockStore {
    /// A store of no tiers: blocks live in the engine's memory only.
    fn default() -> Self {
        Self::with_tiers(None, None)
    }
}

impl Drop for BlockStore {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Lowercase hex of a key.
pub fn hex(key: &[u8; 32]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

/// A byte count written as `8G`, `512M`, `64K` or a plain number of bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                'B' => 1,
                _ => return Err(format!("{s:?}: the unit must be K, M, G or T")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 8G, 512M, 1000000)"))?;
    if !n.is_finite() || n < 0.0 || n * mult as f64 > u64::MAX as f64 {
        return Err(format!("{s:?} is not a size (e.g. 8G, 512M, 1000000)"));
    }
    Ok((n * mult as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn spec(t: u32) -> BlockSpec {
        BlockSpec {
            model: [2; 32],
            format: BlockFormat {
                encoder: "test".into(),
                dtype: StoredDType::F32,
                layers: 1,
                kv_heads: 1,
                head_dim: 2,
            },
            scheme: StoredScheme::Alone,
            pos: 0,
            prefix: vec![],
            tokens: vec![t; 8],
        }
    }

    /// What the engine does on a miss: look up, claim, look up again if the claim waited,
    /// encode and save. Returns where the block came from.
    fn get(store: &BlockStore, s: &BlockSpec, encodes: &AtomicUsize) -> (Vec<u8>, Source) {
        let n = s.format.data_bytes(s.tokens.len());
        let mut build = |fill: &mut Fill<'_>| {
            let mut b = vec![0u8; n];
            fill(&mut b)?;
            Ok(b)
        };
        if let Some(hit) = store.load(s, &mut build) {
            return hit;
        }
        let claim = store.claim(s);
        if claim.waited() {
            if let Some(hit) = store.load(s, &mut build) {
                return hit;
            }
        }
        encodes.fetch_add(1, Ordering::SeqCst);
        // A slow encoder: the others arrive while it works.
        std::thread::sleep(Duration::from_millis(50));
        let data = vec![s.tokens[0] as u8; n];
        store.save(s, &data, claim);
        (data, Source::Encoded)
    }

    /// Eight threads miss on the same block at once, twice over: it is encoded once, and every
    /// thread gets the same bytes.
    #[test]
    fn threads_that_miss_together_encode_once() {
        let dir = std::env::temp_dir().join(format!("ape-store-threads-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = BlockStore::open(&StoreOptions {
            dir: Some(dir.clone()),
            disk_budget: 1 << 20,
            redis: None,
        })
        .expect("open");
        for t in [5, 6] {
            let s = spec(t);
            let encodes = AtomicUsize::new(0);
            let got: Vec<(Vec<u8>, Source)> = std::thread::scope(|scope| {
                let handles: Vec<_> = (0..8)
                    .map(|_| scope.spawn(|| get(&store, &s, &encodes)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("thread"))
                    .collect()
            });
            assert_eq!(encodes.load(Ordering::SeqCst), 1, "block {t}");
            assert!(got.iter().all(|(d, _)| *d == got[0].0));
            assert_eq!(got.iter().filter(|(_, s)| *s == Source::Encoded).count(), 1);
            assert_eq!(got.iter().filter(|(_, s)| *s == Source::Disk).count(), 7);
        }
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("8G"), Ok(8 << 30));
        assert_eq!(parse_size("1.5k"), Ok(1536));
        assert_eq!(parse_size("100"), Ok(100));
        assert_eq!(parse_size("0"), Ok(0));
        for bad in ["", "-1G", "G", "1X", "nan", "1e30T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
