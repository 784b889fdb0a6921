//! The disk tier: one file per block under a folder, within a byte budget.
//!
//! ```text
//! DIR/STORE          what the folder is (written once; `clear` refuses a folder without it)
//! DIR/ab/<key>.kv    a block (its key in hex; the first two digits name the subfolder)
//! DIR/tmp/           blocks being written: <key>.<pid>.<n>.tmp
//! DIR/locks/<key>.lock held (flock) by the process encoding the block, removed after
//! DIR/stats.json     the counters of every process that used the folder
//! ```
//!
//! The folder is its own index: nothing but the files says what is stored, so there is no
//! bookkeeping a crash could leave wrong. A block is written to `tmp/`, flushed to the disk, then
//! renamed into place, so a block file is whole or absent whatever moment a process is killed;
//! leftovers in `tmp/` of processes no longer running are removed at open. A block's modification
//! time is its last use (set on every hit), and the least recently used blocks are removed when a
//! write would pass the budget. Several processes may share the folder.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use super::{
    hex, read_block, warn, BlockSpec, Count, Counters, Fill, StoreError, TierCounters, TierStats,
};

const MARKER: &str = "STORE";
const MARKER_TEXT: &str = "ape-attn block store (disk tier), format 1: one file per encoded block. `ape cache clear --tier disk` empties it.\n";
const STATS: &str = "stats.json";
/// A leftover in tmp/ whose writer cannot be checked is removed after this long.
const STALE_TMP: Duration = Duration::from_secs(3600);

/// Blocks are written in pieces of this size.
const WRITE_PIECE: usize = 64 << 10;

/// A planted fault for the crash tests: with `APE_STORE_CRASH_AFTER=N` in the environment, the
/// process aborts at the Nth step of writing blocks (a piece written, the flush, the rename),
/// as a kill at that moment would leave things. Without it, nothing happens.
fn crash_point() {
    use std::sync::OnceLock;
    static LIMIT: OnceLock<Option<u64>> = OnceLock::new();
    static STEPS: AtomicU64 = AtomicU64::new(0);
    let limit = LIMIT.get_or_init(|| {
        std::env::var("APE_STORE_CRASH_AFTER")
            .ok()
            .and_then(|v| v.parse().ok())
    });
    if let Some(limit) = *limit {
        if STEPS.fetch_add(1, Ordering::Relaxed) + 1 >= limit {
            std::process::abort();
        }
    }
}

/// A block file's name and size, and when it was last used.
#[derive(Clone, Copy, Debug)]
struct Held {
    bytes: u64,
    used: SystemTime,
}

/// The disk tier.
pub struct DiskTier {
    dir: PathBuf,
    budget: u64,
    /// What this process knows is held (made from the folder at open, and again whenever an
    /// eviction is needed, as other processes write to it too).
    index: Mutex<HashMap<String, Held>>,
    counters: Counters,
    tmp_serial: AtomicU64,
}

impl std::fmt::Debug for DiskTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskTier")
            .field("dir", &self.dir)
            .field("budget", &self.budget)
            .finish()
    }
}

/// A held encode lock: its file is removed, then released, when dropped.
#[derive(Debug)]
pub struct KeyLock {
    file: File,
    path: PathBuf,
}

impl Drop for KeyLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
        let _ = self.file.unlock();
    }
}

impl DiskTier {
    /// Opens (making it if needed) the folder `dir` as a store of at most `budget` bytes.
    pub fn open(dir: &Path, budget: u64) -> Result<Self, StoreError> {
        let fail = |what: &str, e: std::io::Error| {
            StoreError::Config(format!("block store {}: {what}: {e}", dir.display()))
        };
        fs::create_dir_all(dir).map_err(|e| fail("cannot make the folder", e))?;
        let marker = dir.join(MARKER);
        if !marker.is_file() {
            let non_empty = fs::read_dir(dir)
                .map_err(|e| fail("cannot list the folder", e))?
                .next()
                .is_some();
            if non_empty {
                return Err(StoreError::Config(format!(
                    "block store {}: the folder holds other files; give an empty or new folder",
                    dir.display()
                )));
            }
            fs::write(&marker, MARKER_TEXT).map_err(|e| fail("cannot write in the folder", e))?;
        }
        for sub in ["tmp", "locks"] {
            fs::create_dir_all(dir.join(sub)).map_err(|e| fail("cannot make a subfolder", e))?;
        }
        let tier = Self {
            dir: dir.to_path_buf(),
            budget,
            index: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            tmp_serial: AtomicU64::new(0),
        };
        tier.remove_stale_tmp();
        tier.rescan();
        Ok(tier)
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The byte budget.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(&key[..2]).join(format!("{key}.kv"))
    }

    /// Every block file: its key and what it holds.
    fn scan(&self) -> HashMap<String, Held> {
        let mut held = HashMap::new();
        let Ok(top) = fs::read_dir(&self.dir) else {
            return held;
        };
        for sub in top.flatten() {
            let name = sub.file_name();
            let name = name.to_string_lossy();
            if name.len() != 2 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
                continue;
            }
            let Ok(files) = fs::read_dir(sub.path()) else {
                continue;
            };
            for f in files.flatten() {
                let fname = f.file_name();
                let Some(key) = fname.to_str().and_then(|n| n.strip_suffix(".kv")) else {
                    continue;
                };
                if let Ok(m) = f.metadata() {
                    held.insert(
                        key.to_string(),
                        Held {
                            bytes: m.len(),
                            used: m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                        },
                    );
                }
            }
        }
        held
    }

    fn rescan(&self) {
        let held = self.scan();
        *self.index.lock().unwrap_or_else(|e| e.into_inner()) = held;
    }

    /// Removes what killed writers left in tmp/.
    fn remove_stale_tmp(&self) {
        let Ok(files) = fs::read_dir(self.dir.join("tmp")) else {
            return;
        };
        for f in files.flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            let pid: Option<u32> = name.split('.').nth(1).and_then(|p| p.parse().ok());
            let alive = match pid {
                Some(p) if Path::new("/proc/self").exists() => {
                    Path::new(&format!("/proc/{p}")).exists()
                }
                _ => true,
            };
            let old = f
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > STALE_TMP);
            if !alive || old {
                let _ = fs::remove_file(f.path());
            }
        }
    }

    /// The block of `spec`, if a valid copy is held. A copy that fails a check is deleted and
    /// counted.
    pub fn load<B>(
        &self,
        spec: &BlockSpec,
        build: &mut dyn FnMut(&mut Fill<'_>) -> ape_attn::Result<B>,
    ) -> Option<B> {
        let key = hex(&spec.key());
        let path = self.path(&key);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                if e.kind() != std::io::ErrorKind::NotFound {
                    warn(format!("{}: {e}", path.display()));
                }
                self.counters.add(Count::Miss, 1);
                return None;
            }
        };
        // The reader asks for a few large pieces: no buffering of the data (a buffer only for
        // the header's small reads).
        match read_block(BufReader::with_capacity(4096, &file), spec, build) {
            Ok(b) => {
                let now = SystemTime::now();
                // The last use, for eviction; a read-only folder still serves.
                let _ = file.set_modified(now);
                let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
                let bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
                index.insert(key, Held { bytes, used: now });
                self.counters.add(Count::Hit, 1);
                Some(b)
            }
            Err(StoreError::Corrupt(why)) => {
                warn(format!(
                    "{}: {why}; removed, the block is encoded again",
                    path.display()
                ));
                let _ = fs::remove_file(&path);
                self.index
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&key);
                self.counters.add(Count::Corrupt, 1);
                self.counters.add(Count::Miss, 1);
                None
            }
            Err(e) => {
                warn(format!("{}: {e}", path.display()));
                self.counters.add(Count::Miss, 1);
                None
            }
        }
    }

    /// Takes the encode lock of `key` (a file in locks/ held with `flock`), waiting until
    /// `deadline` at most; says whether it had to wait. The holder removes the file as it lets
    /// go, so a waiter that then gets the lock on the removed file tries again on the new one.
    pub fn lock_key(&self, key: &[u8; 32], deadline: Instant) -> (Option<KeyLock>, bool) {
        use std::os::unix::fs::MetadataExt;
        let path = self.dir.join("locks").join(format!("{}.lock", hex(key)));
        let mut pause = Duration::from_millis(1);
        let mut waited = false;
        loop {
            let file = match OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
            {
                Ok(f) => f,
                Err(e) => {
                    warn(format!("{}: {e}", path.display()));
                    return (None, waited);
                }
            };
            match file.try_lock() {
                Ok(()) => {
                    // Still the file at that name (not one its last holder has removed)?
                    let same = match (file.metadata(), fs::metadata(&path)) {
                        (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
                        _ => false,
                    };
                    if same {
                        return (Some(KeyLock { file, path }), waited);
                    }
                }
                Err(fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    waited = true;
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(20));
                }
                Err(fs::TryLockError::WouldBlock) => {
                    warn("waited too long for another process encoding the same block; encoding it here too");
                    return (None, true);
                }
                Err(fs::TryLockError::Error(e)) => {
                    warn(format!("{}: {e}", path.display()));
                    return (None, waited);
                }
            }
        }
    }

    /// Writes a stored block (`bytes`, from [`BlockSpec::encode`]): whole or not at all. A full
    /// disk or any other failure is a warning and a count, never an error of the request.
    pub fn save(&self, spec: &BlockSpec, bytes: &[u8]) {
        let key = hex(&spec.key());
        let n = bytes.len() as u64;
        if n > self.budget {
            self.counters.add(Count::WriteError, 1);
            warn(format!(
                "a block of {n} bytes is larger than the disk tier's budget of {} bytes; not stored",
                self.budget
            ));
            return;
        }
        self.make_room(&key, n);
        match self.write_atomically(&key, bytes) {
            Ok(()) => {
                self.counters.add(Count::Write, 1);
                self.index.lock().unwrap_or_else(|e| e.into_inner()).insert(
                    key,
                    Held {
                        bytes: n,
                        used: SystemTime::now(),
                    },
                );
            }
            Err(e) => {
                self.counters.add(Count::WriteError, 1);
                warn(format!(
                    "cannot write a block under {}: {e}; not stored",
                    self.dir.display()
                ));
            }
        }
    }

    fn write_atomically(&self, key: &str, bytes: &[u8]) -> std::io::Result<()> {
        let serial = self.tmp_serial.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .dir
            .join("tmp")
            .join(format!("{key}.{}.{serial}.tmp", std::process::id()));
        let result = (|| {
            let mut f = File::create(&tmp)?;
            for piece in bytes.chunks(WRITE_PIECE) {
                f.write_all(piece)?;
                crash_point();
            }
            f.sync_all()?;
            crash_point();
            drop(f);
            let dest = self.path(key);
            let parent = dest.parent().unwrap_or(&self.dir);
            fs::create_dir_all(parent)?;
            fs::rename(&tmp, &dest)?;
            crash_point();
            // The rename itself reaches the disk with its folder's entry.
            File::open(parent)?.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Removes the least recently used blocks (not `keep`) until `incoming` more bytes fit.
    fn make_room(&self, keep: &str, incoming: u64) {
        let total = |i: &HashMap<String, Held>| {
            i.iter()
                .filter(|(k, _)| *k != keep)
                .map(|(_, h)| h.bytes)
                .sum::<u64>()
        };
        {
            let index = self.index.lock().unwrap_or_else(|e| e.into_inner());
            if total(&index) + incoming <= self.budget {
                return;
            }
        }
        // Other processes write here too: decide on what the folder holds now.
        self.rescan();
        let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
        let mut by_age: Vec<(String, Held)> = index
            .iter()
            .filter(|(k, _)| *k != keep)
            .map(|(k, h)| (k.clone(), *h))
            .collect();
        by_age.sort_by_key(|(_, h)| h.used);
        let mut held = total(&index);
        for (k, h) in by_age {
            if held + incoming <= self.budget {
                break;
            }
            match fs::remove_file(self.path(&k)) {
                Ok(()) => self.counters.add(Count::Eviction, 1),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    warn(format!("cannot remove {}: {e}", self.path(&k).display()));
                    continue;
                }
            }
            index.remove(&k);
            held -= h.bytes;
        }
    }

    /// This process's counters since the last flush.
    pub fn counters(&self) -> TierCounters {
        self.counters.get()
    }

    /// Adds this process's counters to the folder's stats file (under a lock, written to a
    /// temporary name and renamed: a crash leaves the old file or the new one).
    pub fn flush_counters(&self) {
        let delta = self.counters.take();
        if delta == TierCounters::default() {
            return;
        }
        let _lock = self.lock_file("stats.lock");
        let mut total = self.read_counters();
        total += delta;
        let tmp = self
            .dir
            .join("tmp")
            .join(format!("stats.{}.tmp", std::process::id()));
        let result = (|| {
            let text = serde_json::to_vec_pretty(&total).map_err(std::io::Error::other)?;
            fs::write(&tmp, text)?;
            fs::rename(&tmp, self.dir.join(STATS))
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            warn(format!("cannot record the disk tier's counters: {e}"));
        }
    }

    fn lock_file(&self, name: &str) -> Option<File> {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join("locks").join(name))
            .ok()?;
        f.lock().ok()?;
        Some(f)
    }

    /// The counters recorded in the folder (zero when none are, or the file is damaged).
    fn read_counters(&self) -> TierCounters {
        match fs::read(self.dir.join(STATS)) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                warn(format!(
                    "{}: {e}; the counters start again from zero",
                    STATS
                ));
                TierCounters::default()
            }),
            Err(_) => TierCounters::default(),
        }
    }

    /// What the folder holds, and the counters of every process that used it (this one's
    /// included).
    pub fn stats(&self) -> TierStats {
        let held = self.scan();
        let mut counters = self.read_counters();
        counters += self.counters.get();
        TierStats {
            blocks: held.len() as u64,
            bytes: held.values().map(|h| h.bytes).sum(),
            counters,
        }
    }

    /// Removes every block, leftover and the counters; returns the blocks removed.
    pub fn clear(&self) -> Result<u64, StoreError> {
        let held = self.scan();
        let mut removed = 0;
        for k in held.keys() {
            match fs::remove_file(self.path(k)) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::Io(e)),
            }
        }
        if let Ok(files) = fs::read_dir(self.dir.join("tmp")) {
            for f in files.flatten() {
                let _ = fs::remove_file(f.path());
            }
        }
        match fs::remove_file(self.dir.join(STATS)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(StoreError::Io(e)),
            _ => {}
        }
        self.counters.take();
        self.index.lock().unwrap_or_else(|e| e.into_inner()).clear();
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::super::format::{BlockFormat, StoredDType, StoredScheme};
    use super::*;

    pub(crate) fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ape-disk-test-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn spec(t: u32, n: usize) -> BlockSpec {
        BlockSpec {
            model: [1; 32],
            format: BlockFormat {
                encoder: "test".into(),
                dtype: StoredDType::F32,
                layers: 1,
                kv_heads: 1,
                head_dim: 4,
            },
            scheme: StoredScheme::Alone,
            pos: 0,
            prefix: vec![],
            tokens: vec![t; n],
        }
    }

    fn data(s: &BlockSpec) -> Vec<u8> {
        vec![s.tokens[0] as u8; s.format.data_bytes(s.tokens.len())]
    }

    /// Reads the block as one buffer.
    fn load(d: &DiskTier, s: &BlockSpec) -> Option<Vec<u8>> {
        let n = s.format.data_bytes(s.tokens.len());
        d.load(s, &mut |fill: &mut Fill<'_>| {
            let mut buf = vec![0u8; n];
            fill(&mut buf)?;
            Ok(buf)
        })
    }

    #[test]
    fn blocks_persist_across_opens_and_damaged_ones_are_removed_and_counted() {
        let dir = temp_dir("persist");
        let s = spec(3, 10);
        {
            let d = DiskTier::open(&dir, 1 << 20).unwrap();
            assert!(load(&d, &s).is_none());
            d.save(&s, &s.encode(&data(&s)).unwrap());
            d.flush_counters();
        }
        let d = DiskTier::open(&dir, 1 << 20).unwrap();
        assert_eq!(load(&d, &s), Some(data(&s)));
        let st = d.stats();
        assert_eq!(
            (
                st.blocks,
                st.counters.hits,
                st.counters.misses,
                st.counters.writes
            ),
            (1, 1, 1, 1)
        );
        // A flipped byte: refused, deleted, counted.
        let path = d.path(&hex(&s.key()));
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 40;
        bytes[last] ^= 0x10;
        fs::write(&path, &bytes).unwrap();
        assert!(load(&d, &s).is_none());
        assert!(!path.exists());
        assert_eq!(d.stats().counters.corrupt, 1);
        // A truncated one too.
        d.save(&s, &s.encode(&data(&s)).unwrap());
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        assert!(load(&d, &s).is_none());
        assert_eq!(d.stats().counters.corrupt, 2);
        // A block stored under another block's name is not served as that block.
        let other = spec(4, 10);
        d.save(&other, &other.encode(&data(&other)).unwrap());
        fs::copy(d.path(&hex(&other.key())), &path).unwrap();
        assert!(load(&d, &s).is_none());
        assert_eq!(load(&d, &other), Some(data(&other)));
        assert_eq!(d.clear().unwrap(), 1);
        assert_eq!(d.stats().blocks, 0);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_least_recently_used_blocks_go_first_and_the_budget_holds() {
        let dir = temp_dir("lru");
        let specs: Vec<BlockSpec> = (0..6).map(|t| spec(t, 50)).collect();
        let size = specs[0].stored_bytes() as u64;
        // Room for three blocks.
        let d = DiskTier::open(&dir, 3 * size + size / 2).unwrap();
        for s in &specs[..3] {
            d.save(s, &s.encode(&data(s)).unwrap());
            std::thread::sleep(Duration::from_millis(20));
        }
        // Use block 0 again: block 1 is now the oldest.
        assert!(load(&d, &specs[0]).is_some());
        std::thread::sleep(Duration::from_millis(20));
        d.save(&specs[3], &specs[3].encode(&data(&specs[3])).unwrap());
        assert!(
            load(&d, &specs[1]).is_none(),
            "block 1 was the least recently used"
        );
        for i in [0, 2, 3] {
            assert!(load(&d, &specs[i]).is_some(), "block {i}");
        }
        let st = d.stats();
        assert!(st.bytes <= d.budget());
        assert_eq!((st.blocks, st.counters.evictions), (3, 1));
        // Larger than the whole budget: not stored, counted.
        let big = spec(9, 400);
        d.save(&big, &big.encode(&data(&big)).unwrap());
        assert!(load(&d, &big).is_none());
        assert_eq!(d.stats().counters.write_errors, 1);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn leftovers_of_dead_writers_are_removed_and_a_foreign_folder_is_refused() {
        let dir = temp_dir("tmp");
        drop(DiskTier::open(&dir, 1 << 20).unwrap());
        // A pid that cannot be running (above the kernel's pid limit).
        let dead = dir.join("tmp").join("ab.4294967.0.tmp");
        let live = dir
            .join("tmp")
            .join(format!("ab.{}.0.tmp", std::process::id()));
        fs::write(&dead, b"half a block").unwrap();
        fs::write(&live, b"being written").unwrap();
        drop(DiskTier::open(&dir, 1 << 20).unwrap());
        assert!(!dead.exists() && live.exists());
        let foreign = temp_dir("foreign");
        fs::create_dir_all(&foreign).unwrap();
        fs::write(foreign.join("notes.txt"), b"mine").unwrap();
        assert!(matches!(
            DiskTier::open(&foreign, 1 << 20),
            Err(StoreError::Config(_))
        ));
        let _ = fs::remove_dir_all(&dir);
        let _ = fs::remove_dir_all(&foreign);
    }
}
