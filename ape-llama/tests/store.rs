//! The block store end to end, through the `ape` command on the default model: a second process
//! reads every passage instead of encoding it, another model file reads none of them, killed
//! writers, damaged files and a full disk never change an answer, and a real `redis-server`
//! shares blocks between processes and can stop without stopping them.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const PASSAGES: [&str; 4] = [
    "The Lantern Bakery was founded by Mira Kovac in 1987 in the river town of Esterhill.\n",
    "Esterhill is a small town on the river Vel, known for its stone bridges and its autumn fair.\n",
    "The best-known loaf of the Lantern Bakery is a dark rye bread baked with caraway seeds.\n",
    "In 2004 the bakery opened a second shop in Marrow Bay, run by Tomas Kovac, Mira's nephew.\n",
];
const QUESTION: &str = "Who founded the Lantern Bakery?";

/// A folder of its own for one test, removed at the end.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("ape-store-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("scratch folder");
        Self(d)
    }

    /// The passage files, written once.
    fn passages(&self) -> Vec<String> {
        PASSAGES
            .iter()
            .enumerate()
            .map(|(i, text)| {
                let p = self.0.join(format!("p{i}.txt"));
                std::fs::write(&p, text).expect("passage");
                p.display().to_string()
            })
            .collect()
    }

    fn path(&self, name: &str) -> String {
        self.0.join(name).display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn ape() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ape"));
    c.env("APE_MODEL", common::default_model())
        .env_remove("APE_STORE")
        .env_remove("APE_REDIS")
        .env_remove("APE_STORE_BUDGET");
    c
}

/// What one `ape run` printed.
#[derive(Debug)]
struct Run {
    answer: String,
    stderr: String,
    /// Tokens encoded before the first answer token.
    encoded: usize,
    /// Where each block came from, in prompt order (`prefix`, then the passages).
    sources: Vec<String>,
}

fn run_args(passages: &[&str], mode: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec!["run".into()];
    for p in passages {
        args.push("--context".into());
        args.push(p.to_string());
    }
    for a in [
        "--question",
        QUESTION,
        "--max-tokens",
        "12",
        "--device",
        "cpu",
        "--mode",
        mode,
    ] {
        args.push(a.into());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn parse(out: Output) -> Run {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "ape run failed: {stderr}");
    let encoded = stderr
        .split(" tokens encoded)")
        .next()
        .and_then(|s| s.rsplit('(').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no token count in {stderr:?}"));
    let sources = stderr
        .lines()
        .find_map(|l| l.strip_prefix("blocks ("))
        .map(|l| {
            l.split_once("): ")
                .expect("blocks line")
                .1
                .split(", ")
                .map(|s| s.rsplit(' ').next().expect("a tier").to_string())
                .collect()
        })
        .unwrap_or_default();
    Run {
        answer: stdout.trim().to_string(),
        stderr,
        encoded,
        sources,
    }
}

fn run(passages: &[&str], mode: &str, extra: &[&str]) -> Run {
    parse(
        ape()
            .args(run_args(passages, mode, extra))
            .output()
            .expect("ape runs"),
    )
}

fn all(sources: &[String], tier: &str) -> bool {
    !sources.is_empty() && sources.iter().all(|s| s == tier)
}

/// `ape cache stats` for `args`, as text.
fn stats(args: &[&str]) -> String {
    let out = ape()
        .args(["cache", "stats"])
        .args(args)
        .output()
        .expect("ape runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The number before `what` in the disk tier's line of `ape cache stats`.
fn disk_count(stats: &str, what: &str) -> u64 {
    let line = stats
        .lines()
        .find(|l| l.starts_with("disk"))
        .expect("disk line");
    let before = line.split(what).next().expect("field");
    before
        .rsplit(|c: char| !c.is_ascii_digit())
        .find(|s| !s.is_empty())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {what:?} in {line:?}"))
}

#[test]
fn a_second_process_reads_every_passage_in_any_order_or_subset_and_answers_the_same() {
    let s = Scratch::new("second");
    let files = s.passages();
    let p: Vec<&str> = files.iter().map(String::as_str).collect();
    let store = s.path("store");
    for mode in ["ape", "block-attention"] {
        let clean = run(&p, mode, &["--no-store"]);
        let first = run(&p, mode, &["--store", &store]);
        assert_eq!(first.answer, clean.answer, "{mode}");
        // Block-Attention reads the prefix APE stored (both encode it alone, from position 0).
        let shared = if mode == "ape" { "encoded" } else { "disk" };
        assert_eq!(first.sources[0], shared, "{mode}");
        assert!(
            all(&first.sources[1..], "encoded"),
            "{mode}: {:?}",
            first.sources
        );
        let second = run(&p, mode, &["--store", &store]);
        assert_eq!(
            second.answer, first.answer,
            "{mode}: the stored blocks answer the same"
        );
        assert!(all(&second.sources, "disk"), "{mode}: {:?}", second.sources);
        assert_eq!(second.sources.len(), p.len() + 1, "{mode}");
        // Another order and a subset read the same blocks (APE's depend on the prefix only,
        // Block-Attention's on nothing but their tokens).
        let reordered = [p[3], p[1], p[0]];
        let again = run(&reordered, mode, &["--store", &store]);
        assert!(all(&again.sources, "disk"), "{mode}: {:?}", again.sources);
        assert_eq!(
            again.encoded, second.encoded,
            "{mode}: only the question is encoded"
        );
        assert_eq!(
            again.answer,
            run(&reordered, mode, &["--no-store"]).answer,
            "{mode}: reordered from the store = reordered encoded"
        );
        // The question alone is what the second run encoded.
        let passage_tokens = first.encoded - second.encoded;
        assert!(passage_tokens > 40, "{mode}: {first:?} {second:?}");
    }
    // APE's blocks depend on the system prompt: another one reads only Block-Attention's
    // prefix (encoded alone, shared) and encodes its passages.
    let other = run(
        &p,
        "ape",
        &["--store", &store, "--system", "Answer briefly."],
    );
    assert_eq!(
        other.sources.iter().filter(|s| *s == "encoded").count(),
        p.len() + 1
    );
    let st = stats(&["--store", &store]);
    assert_eq!(disk_count(&st, "corrupt dropped"), 0, "{st}");
}

#[test]
fn another_model_file_reads_none_of_the_blocks() {
    let s = Scratch::new("model");
    let files = s.passages();
    let p: Vec<&str> = files[..2].iter().map(String::as_str).collect();
    let store = s.path("store");
    let first = run(&p, "ape", &["--store", &store]);
    assert!(all(&first.sources, "encoded"));
    // The same model with one weight's lowest bit changed: a "re-quantised" file.
    let mut bytes = std::fs::read(common::default_model()).expect("model");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    let other = s.path("other.gguf");
    std::fs::write(&other, bytes).expect("copy");
    let out = ape()
        .env("APE_MODEL", &other)
        .args(run_args(&p, "ape", &["--store", &store]))
        .output()
        .expect("ape runs");
    let changed = parse(out);
    assert!(all(&changed.sources, "encoded"), "{:?}", changed.sources);
    assert_eq!(disk_count(&stats(&["--store", &store]), "blocks"), 6);
}

#[test]
fn damaged_blocks_are_dropped_counted_and_encoded_again() {
    let s = Scratch::new("damage");
    let files = s.passages();
    let p: Vec<&str> = files.iter().map(String::as_str).collect();
    let store = s.path("store");
    let first = run(&p, "ape", &["--store", &store]);
    let mut blocks: Vec<PathBuf> = walk(Path::new(&store))
        .into_iter()
        .filter(|f| f.extension().is_some_and(|x| x == "kv"))
        .collect();
    blocks.sort();
    assert_eq!(blocks.len(), p.len() + 1);
    // Truncate one, flip a byte of another's data, and one byte of a third's header.
    let b = std::fs::read(&blocks[0]).unwrap();
    std::fs::write(&blocks[0], &b[..b.len() / 3]).unwrap();
    let mut b = std::fs::read(&blocks[1]).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 0x04;
    std::fs::write(&blocks[1], b).unwrap();
    let mut b = std::fs::read(&blocks[2]).unwrap();
    b[120] ^= 0x01;
    std::fs::write(&blocks[2], b).unwrap();
    let second = run(&p, "ape", &["--store", &store]);
    assert_eq!(second.answer, first.answer);
    assert_eq!(
        second.sources.iter().filter(|s| *s == "encoded").count(),
        3,
        "{:?}",
        second.sources
    );
    assert_eq!(
        second
            .stderr
            .matches("; removed, the block is encoded again")
            .count(),
        3,
        "{}",
        second.stderr
    );
    let third = run(&p, "ape", &["--store", &store]);
    assert!(
        all(&third.sources, "disk"),
        "re-encoded blocks were stored again"
    );
    assert_eq!(third.answer, first.answer);
    assert_eq!(
        disk_count(&stats(&["--store", &store]), "corrupt dropped"),
        3
    );
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// `ape cache warm` killed again and again while it encodes and writes blocks: at random
/// moments (SIGKILL), and at random steps inside the writes (the planted fault
/// `APE_STORE_CRASH_AFTER`, which aborts the process there). Every later run answers as a clean
/// run does, and no damaged block is ever found.
#[test]
fn processes_killed_while_writing_leave_no_block_that_loads_wrong() {
    let s = Scratch::new("kill");
    // Sixteen new passages a round: the warm spends most of its time encoding and writing.
    let files = |round: usize| -> Vec<String> {
        (0..16)
            .map(|i| {
                let f = s.path(&format!("ledger{round}-{i}.txt"));
                let text = format!(
                    "{} Record {i} of the bakery's ledger for year {} lists {} loaves.\n",
                    PASSAGES[i % 4].trim(),
                    1990 + round,
                    37 * i + 5
                );
                std::fs::write(&f, text).unwrap();
                f
            })
            .collect()
    };
    let store = s.path("store");
    let warm = |files: &[String], crash_after: Option<u64>| {
        let mut c = ape();
        c.args(["cache", "warm", "--device", "cpu", "--store", &store]);
        for f in files {
            c.args(["--context", f]);
        }
        if let Some(n) = crash_after {
            c.env("APE_STORE_CRASH_AFTER", n.to_string());
        }
        c.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn")
    };
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    // A block of these passages is about 1.7 MB: 27 pieces, the flush and the rename.
    let (mut partial_left, mut aborted) = (0, 0);
    let mut some = Vec::new();
    for round in 0..16 {
        let files = files(round);
        some.extend(files[..2].iter().cloned());
        let mut child;
        if round % 2 == 0 {
            // Past the model's load (about a second here), into the encoding and writing.
            child = warm(&files, None);
            std::thread::sleep(Duration::from_millis(700 + next(2500)));
            let _ = child.kill();
        } else {
            child = warm(&files, Some(1 + next(16 * 28)));
        }
        let status = child.wait().expect("wait");
        if round % 2 == 1 && status.code().is_none() {
            aborted += 1;
        }
        let tmp = std::fs::read_dir(Path::new(&store).join("tmp"))
            .map(|d| d.count())
            .unwrap_or(0);
        partial_left += usize::from(tmp > 0);
        eprintln!("round {round}: {status}, {tmp} partial writes left");
    }
    assert!(
        aborted >= 6,
        "the planted crash fired in {aborted} of 8 runs"
    );
    assert!(
        partial_left > 0,
        "no crash landed inside a write: the test did not test what it says"
    );
    // A run over some of them reads what was written whole, encodes the rest, answers as a
    // clean run does, and finds nothing damaged.
    let p: Vec<&str> = some.iter().step_by(3).map(String::as_str).collect();
    let after = run(&p, "ape", &["--store", &store]);
    let clean = run(&p, "ape", &["--no-store"]);
    assert_eq!(after.answer, clean.answer);
    assert!(!after.stderr.contains("removed"), "{}", after.stderr);
    let st = stats(&["--store", &store]);
    assert_eq!(disk_count(&st, "corrupt dropped"), 0, "{st}");
    assert!(disk_count(&st, "blocks") > 0, "{st}");
    // Leftovers of the killed writers are gone once the store is opened again.
    assert_eq!(
        std::fs::read_dir(Path::new(&store).join("tmp"))
            .unwrap()
            .count(),
        0
    );
}

/// A disk that fills up (a 3 MiB tmpfs, in a mount namespace of the test's own), and a budget of
/// a few bytes: the answer is given, unchanged, and the failed writes are counted.
#[test]
fn a_full_disk_and_a_tiny_budget_never_cost_the_answer() {
    let s = Scratch::new("full");
    let files = s.passages();
    let p: Vec<&str> = files.iter().map(String::as_str).collect();
    let clean = run(&p, "ape", &["--no-store"]);
    let tiny = run(
        &p,
        "ape",
        &["--store", &s.path("tiny"), "--store-budget", "100"],
    );
    assert_eq!(tiny.answer, clean.answer);
    assert!(
        tiny.stderr.contains("larger than the disk tier's budget"),
        "{}",
        tiny.stderr
    );
    assert_eq!(
        disk_count(&stats(&["--store", &s.path("tiny")]), "write errors"),
        p.len() as u64 + 1
    );

    let mnt = s.path("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let ape_bin = env!("CARGO_BIN_EXE_ape");
    let quoted: Vec<String> = run_args(&p, "ape", &["--store", &format!("{mnt}/store")])
        .iter()
        .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
        .collect();
    let script = format!(
        "mount -t tmpfs -o size=3m tmpfs '{mnt}' || exit 99\n\
         for i in 1 2; do '{ape_bin}' {args} || exit $?; echo '=== run done'; done\n\
         '{ape_bin}' cache stats --store '{mnt}/store'",
        args = quoted.join(" ")
    );
    let out = Command::new("unshare")
        .args(["-rm", "sh", "-c", &script])
        .env("APE_MODEL", common::default_model())
        .env_remove("APE_STORE")
        .env_remove("APE_REDIS")
        .output()
        .expect("unshare runs (util-linux)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(
        out.status.code(),
        Some(99),
        "cannot mount a tmpfs in a user namespace here: {stderr}"
    );
    assert!(out.status.success(), "{stderr}");
    let answers: Vec<&str> = stdout.split("=== run done").collect();
    assert_eq!(answers.len(), 3, "{stdout}");
    for a in &answers[..2] {
        assert_eq!(a.trim(), clean.answer, "{stdout}");
    }
    assert!(
        stderr.contains("No space left on device"),
        "the disk was to fill up: {stderr}"
    );
    let write_errors = disk_count(answers[2], "write errors");
    assert!(write_errors > 0, "{stdout}");
    assert_eq!(disk_count(answers[2], "corrupt dropped"), 0, "{stdout}");
}

/// Two processes started together on the same passages and store: each block is encoded by
/// one of them, the other waits and reads it.
#[test]
fn two_processes_at_once_encode_each_passage_once() {
    let s = Scratch::new("race");
    let files = s.passages();
    let p: Vec<&str> = files.iter().map(String::as_str).collect();
    let store = s.path("store");
    let spawn = || {
        ape()
            .args(run_args(&p, "ape", &["--store", &store]))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn")
    };
    let (a, b) = (spawn(), spawn());
    let a = parse(a.wait_with_output().unwrap());
    let b = parse(b.wait_with_output().unwrap());
    assert_eq!(a.answer, b.answer);
    let encoded = |r: &Run| r.sources.iter().filter(|s| *s == "encoded").count();
    assert_eq!(
        encoded(&a) + encoded(&b),
        p.len() + 1,
        "{:?} {:?}",
        a.sources,
        b.sources
    );
    let st = stats(&["--store", &store]);
    assert_eq!(disk_count(&st, "written"), p.len() as u64 + 1, "{st}");
}

/// A `redis-server` of the test's own on a free loopback port, stopped when dropped.
struct Redis {
    child: Option<Child>,
    port: u16,
}

impl Redis {
    fn start() -> Self {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
            l.local_addr().unwrap().port()
        };
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/test.sh installs Debian's package)");
        let r = Self {
            child: Some(child),
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        r
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
fn processes_share_passages_through_redis_and_go_on_when_it_stops() {
    let s = Scratch::new("redis");
    let files = s.passages();
    let p: Vec<&str> = files.iter().map(String::as_str).collect();
    let mut redis = Redis::start();
    let url = redis.url();
    let clean = run(&p, "ape", &["--no-store"]);
    // Two processes with no disk tier: the second reads everything the first encoded.
    let first = run(&p, "ape", &["--no-store", "--redis", &url]);
    assert!(all(&first.sources, "encoded"));
    let second = run(&p, "ape", &["--no-store", "--redis", &url]);
    assert!(all(&second.sources, "redis"), "{:?}", second.sources);
    assert_eq!(second.answer, clean.answer);
    assert_eq!(first.encoded, clean.encoded);
    assert!(second.encoded < first.encoded);
    // Block-Attention's blocks too.
    let ba = run(&p, "block-attention", &["--no-store", "--redis", &url]);
    let ba2 = run(&p, "block-attention", &["--no-store", "--redis", &url]);
    assert!(
        all(&ba2.sources, "redis") && ba2.answer == ba.answer,
        "{:?}",
        ba2.sources
    );
    // A Redis hit is written to the disk tier: the next process reads it from disk.
    let store = s.path("store");
    let from_redis = run(&p, "ape", &["--store", &store, "--redis", &url]);
    assert!(all(&from_redis.sources, "redis"));
    let from_disk = run(&p, "ape", &["--store", &store, "--redis", &url]);
    assert!(all(&from_disk.sources, "disk"), "{:?}", from_disk.sources);
    let st = stats(&["--store", &store, "--redis", &url]);
    let redis_line = st
        .lines()
        .find(|l| l.starts_with("redis"))
        .expect("redis line");
    assert!(
        redis_line.contains(&format!("{} blocks", 2 * (p.len() + 1) - 1)),
        "{st}"
    );

    // Redis stops while a process is encoding: it warns, and answers.
    let mut c = ape();
    let system = ["--system", "Answer in one word."];
    c.args(run_args(
        &p[..2],
        "parallel",
        &["--no-store", "--redis", &url, system[0], system[1]],
    ));
    let child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    std::thread::sleep(Duration::from_millis(1200));
    redis.stop();
    let mid = parse(child.wait_with_output().unwrap());
    assert_eq!(
        mid.answer,
        run(&p[..2], "parallel", &["--no-store", system[0], system[1]]).answer
    );
    // Stopped before a run: what is on disk is read without asking Redis; what is not is
    // encoded after a warning, and the answer is the same.
    let down = run(&p, "ape", &["--store", &store, "--redis", &url]);
    assert!(all(&down.sources, "disk"), "{:?}", down.sources);
    assert_eq!(down.answer, clean.answer);
    let new_prefix = ["--store", &store, "--redis", &url, system[0], system[1]];
    let down = run(&p, "ape", &new_prefix);
    assert!(down.stderr.contains("unreachable"), "{}", down.stderr);
    assert!(all(&down.sources, "encoded"), "{:?}", down.sources);
    assert_eq!(
        down.answer,
        run(&p, "ape", &["--no-store", system[0], system[1]]).answer
    );
    assert!(all(&run(&p, "ape", &new_prefix).sources, "disk"));
    let st = stats(&["--store", &store, "--redis", &url]);
    assert!(st.contains("redis") && st.contains("unreachable"), "{st}");
}
