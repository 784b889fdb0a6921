//! The `ape` command's bad-input paths: one clear line on stderr and a non-zero exit.

mod common;

use std::process::Command;

fn ape(args: &[&str]) -> (i32, String, String) {
    // The block store in a folder of the test binary's own, not the default .cache/ape/blocks.
    let store = std::env::temp_dir().join(format!("ape-cli-test-store-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_ape"))
        .args(args)
        .env("APE_MODEL", common::default_model())
        .env("APE_STORE", store)
        .env_remove("APE_REDIS")
        .output()
        .expect("ape runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn passage() -> tempfile_path::Path {
    tempfile_path::write("The Lantern Bakery was founded by Mira Kovac.\n")
}

/// A file under the target dir (no extra dependency).
mod tempfile_path {
    pub struct Path(pub std::path::PathBuf);
    impl Drop for Path {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    pub fn write(text: &str) -> Path {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "ape-cli-test-{}-{}.txt",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&p, text).expect("write temp file");
        Path(p)
    }
}

fn assert_one_line_error(code: i32, stderr: &str, needle: &str) {
    assert_ne!(code, 0, "must fail: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected, got {stderr:?}");
    assert!(
        lines[0].contains(needle),
        "{:?} should mention {needle:?}",
        lines[0]
    );
}

#[test]
fn missing_file_empty_question_and_bad_parameters_are_one_line_errors() {
    let p = passage();
    let file = p.0.to_str().expect("utf-8 path");
    let (c, _, e) = ape(&[
        "run",
        "--context",
        "/nonexistent/passage.txt",
        "--question",
        "Who?",
    ]);
    assert_one_line_error(c, &e, "/nonexistent/passage.txt");
    let (c, _, e) = ape(&["run", "--context", file, "--question", "  "]);
    assert_one_line_error(c, &e, "question is empty");
    let (c, _, e) = ape(&[
        "run",
        "--context",
        file,
        "--question",
        "Who?",
        "--temperature",
        "0",
    ]);
    assert_one_line_error(c, &e, "temperature T");
    let (c, _, e) = ape(&[
        "run",
        "--context",
        file,
        "--question",
        "Who?",
        "--scale",
        "NaN",
    ]);
    assert_one_line_error(c, &e, "scaling factor S");
    let (c, _, e) = ape(&[
        "run",
        "--context",
        file,
        "--question",
        "Who?",
        "--sampling-temperature",
        "-1",
    ]);
    assert_one_line_error(c, &e, "sampling temperature");
    // A value starting with '-' reaches the check (it used to be taken for a flag).
    let (c, _, e) = ape(&[
        "run",
        "--context",
        file,
        "--question",
        "Who?",
        "--temperature",
        "-inf",
    ]);
    assert_one_line_error(c, &e, "temperature T");
    let (c, _, e) = ape(&[
        "run",
        "--context",
        file,
        "--question",
        "Who?",
        "--model",
        "/nonexistent.gguf",
    ]);
    assert_one_line_error(c, &e, "/nonexistent.gguf");
}

#[test]
fn eval_and_calibrate_refuse_empty_sets() {
    let (c, _, e) = ape(&["eval", "--docs", "0"]);
    assert_one_line_error(c, &e, "no examples");
    let (c, _, e) = ape(&["calibrate", "--per-position", "0"]);
    assert_one_line_error(c, &e, "nothing to calibrate");
    let (c, _, e) = ape(&["calibrate", "--temperatures", "0.5,-1"]);
    assert_one_line_error(c, &e, "temperature T");
    let (c, _, e) = ape(&["calibrate", "--scales", "0.9,0"]);
    assert_one_line_error(c, &e, "scaling factor S");
    // One candidate would make every answer right; past the generator's limits it used to retry
    // forever.
    let (c, _, e) = ape(&["eval", "--candidates", "1"]);
    assert_one_line_error(c, &e, "candidates");
    let (c, _, e) = ape(&["eval", "--candidates", "100000"]);
    assert_one_line_error(c, &e, "candidates");
    let (c, _, e) = ape(&["calibrate", "--docs", "2,100000"]);
    assert_one_line_error(c, &e, "documents");
    // A --json path that cannot be written fails before the run, not after it.
    let bad = "/nonexistent-dir/results.json";
    let (c, _, e) = ape(&["eval", "--docs", "1", "--json", bad]);
    assert_one_line_error(c, &e, bad);
    let (c, _, e) = ape(&["calibrate", "--docs", "2", "--json", bad]);
    assert_one_line_error(c, &e, bad);
}

#[test]
fn cuda_without_a_usable_gpu_is_a_one_line_error() {
    let p = passage();
    let (c, _, e) = ape(&[
        "run",
        "--context",
        p.0.to_str().expect("utf-8"),
        "--question",
        "Who?",
        "--device",
        "cuda",
    ]);
    assert_one_line_error(c, &e, "device");
}

#[test]
fn a_context_longer_than_the_window_is_refused_before_encoding() {
    let long = tempfile_path::write(&"word ".repeat(9000));
    let start = std::time::Instant::now();
    let (c, _, e) = ape(&[
        "run",
        "--context",
        long.0.to_str().expect("utf-8"),
        "--question",
        "Who?",
        "--mode",
        "sequential",
    ]);
    assert_one_line_error(c, &e, "window");
    // Refused up front, not after running 9000 tokens through the model.
    assert!(start.elapsed().as_secs() < 60);
}

#[test]
fn run_answers_and_help_explains_the_modes() {
    let p = passage();
    let (c, out, _) = ape(&[
        "run",
        "--context",
        p.0.to_str().expect("utf-8"),
        "--question",
        "Who founded the Lantern Bakery?",
        "--max-tokens",
        "12",
        "--mode",
        "sequential",
    ]);
    assert_eq!(c, 0);
    assert!(out.contains("Mira"), "answer: {out}");
    let (c, out, _) = ape(&["run", "--help"]);
    assert_eq!(c, 0);
    for mode in ["sequential", "parallel", "ape", "block-attention"] {
        assert!(out.contains(mode), "--help should explain {mode}");
    }
}

/// `--device emulator`: the GPU forward pass on the kernel emulator answers through the same
/// command, and its first answer position's top logits agree with the CPU pass's.
#[cfg(feature = "emulator")]
#[test]
fn the_emulated_gpu_path_runs_through_the_command() {
    let a = passage();
    let b = tempfile_path::write("The bakery is famous for its dark rye bread with caraway.\n");
    let top = |device: &str, mode: &str| -> Vec<(u32, f32)> {
        let (c, out, err) = ape(&[
            "run",
            "--device",
            device,
            "--mode",
            mode,
            "--context",
            a.0.to_str().expect("utf-8"),
            "--context",
            b.0.to_str().expect("utf-8"),
            "--question",
            "Who founded the Lantern Bakery?",
            "--print-logits",
            "2",
        ]);
        assert_eq!(c, 0, "{device} {mode}: {err}");
        out.lines()
            .map(|l| {
                let mut f = l.split_whitespace();
                let id = f.next().and_then(|x| x.parse().ok()).expect("token id");
                let logit = f.next().and_then(|x| x.parse().ok()).expect("logit");
                (id, logit)
            })
            .collect()
    };
    for mode in ["ape", "block-attention"] {
        let (cpu, emu) = (top("cpu", mode), top("emulator", mode));
        assert_eq!((cpu.len(), emu.len()), (2, 2));
        println!("{mode}: cpu {cpu:?}, emulator {emu:?}");
        if cpu[0].1 - cpu[1].1 > 0.1 {
            assert_eq!(emu[0].0, cpu[0].0, "{mode}: the same top-1 token");
        }
        assert!((emu[0].1 - cpu[0].1).abs() < 0.02 * cpu[0].1.abs().max(1.0));
    }
    let (c, out, err) = ape(&[
        "run",
        "--device",
        "emulator",
        "--context",
        a.0.to_str().expect("utf-8"),
        "--question",
        "Who founded the Lantern Bakery?",
        "--max-tokens",
        "4",
    ]);
    assert_eq!(c, 0, "{err}");
    assert!(!out.trim().is_empty());
    assert!(err.contains("kernel emulator"), "the device line: {err}");
}

/// The default device is `auto`: GPU 0 when one is usable, else the CPU, and the device line says
/// which (and, on the CPU, why no GPU was used).
#[test]
fn the_default_device_is_the_gpu_when_usable_else_the_cpu() {
    let a = passage();
    let (c, out, err) = ape(&[
        "run",
        "--context",
        a.0.to_str().expect("utf-8"),
        "--question",
        "Who founded the Lantern Bakery?",
        "--max-tokens",
        "2",
    ]);
    assert_eq!(c, 0, "{err}");
    assert!(!out.trim().is_empty());
    match ape_attn::cuda::Device::new(0) {
        // A usable device: the GPU, unless the model cannot load there (no cuBLAS, no memory).
        Ok(_) => assert!(
            err.contains("on GPU 0") || err.contains("no GPU used: "),
            "the device line: {err}"
        ),
        Err(e) => assert!(
            err.contains("on CPU") && err.contains(&format!("no GPU used: {e}")),
            "the device line: {err}"
        ),
    }
}

/// A directory under the system temp dir, removed when dropped.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new() -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "ape-cli-matrix-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).expect("create temp dir");
        Self(p)
    }

    fn file(&self, name: &str, bytes: &[u8]) -> String {
        let p = self.0.join(name);
        std::fs::write(&p, bytes).expect("write temp file");
        p.to_str().expect("utf-8 path").to_string()
    }

    fn path(&self, name: &str) -> String {
        self.0.join(name).to_str().expect("utf-8 path").to_string()
    }

    fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.0)
            .expect("read temp dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `args` as owned strings.
fn owned(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// One bad input: a clear line on stderr naming the problem, a non-zero exit, no panic, nothing
/// on stdout.
fn assert_refused(args: &[&str], needle: &str) {
    let (code, out, err) = ape(args);
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{args:?} panicked: {err}"
    );
    assert!(out.is_empty(), "{args:?} wrote to stdout: {out:?}");
    assert_ne!(code, 0, "{args:?} must fail: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{args:?}: one line expected, got {err:?}");
    println!("{:?} -> {}", &args[..args.len().min(6)], lines[0]);
    assert!(
        lines[0].to_lowercase().contains(&needle.to_lowercase()),
        "{args:?}: {:?} should mention {needle:?}",
        lines[0]
    );
}

/// The bad-input matrix: every way a user's files and arguments can be wrong, each refused with
/// one clear line and a non-zero exit, no panic, and nothing written.
#[test]
fn bad_input_matrix() {
    let dir = TempDir::new();
    let passage = dir.file(
        "passage.txt",
        b"The Lantern Bakery was founded by Mira Kovac.\n",
    );
    let run = |extra: &[&str]| -> Vec<String> {
        let mut a = owned(&["run", "--context", &passage, "--question", "Who?"]);
        a.extend(owned(extra));
        a
    };
    let check = |args: Vec<String>, needle: &str| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_refused(&args, needle);
    };

    // Model paths: missing, empty, truncated, wrong magic, a directory.
    let real = std::fs::read(common::default_model()).expect("the default model");
    let mut wrong_magic = real[..4096].to_vec();
    wrong_magic[..4].copy_from_slice(b"GGUX");
    let models = [
        (dir.path("missing.gguf"), "missing.gguf"),
        (dir.file("empty.gguf", b""), "truncated"),
        (dir.file("truncated.gguf", &real[..100_000]), "truncated"),
        (dir.file("header-only.gguf", &real[..1 << 21]), "truncated"),
        (
            dir.file("wrong-magic.gguf", &wrong_magic),
            "not a GGUF file",
        ),
        (dir.path(""), "directory without config.json"),
    ];
    for (model, needle) in &models {
        check(run(&["--model", model]), needle);
        if !model.ends_with('/') {
            check(
                vec!["inspect".into(), "--model".into(), model.clone()],
                needle,
            );
        }
        // --json is not left behind by a run that failed.
        let json = dir.path("out.json");
        check(
            owned(&["eval", "--docs", "1", "--model", model, "--json", &json]),
            needle,
        );
        assert!(!std::path::Path::new(&json).exists());
    }

    // A device that never ends (read whole, it would hang and exhaust memory).
    check(run(&["--model", "/dev/zero"]), "not a regular file");
    check(
        vec!["inspect".into(), "--model".into(), "/dev/zero".into()],
        "not a regular file",
    );

    // T and S: zero, negative, NaN, infinite, for every command that takes them.
    for bad in ["0", "-0.5", "NaN", "inf", "-inf"] {
        check(run(&["--temperature", bad]), "temperature T");
        check(run(&["--scale", bad]), "scaling factor S");
        for (flag, needle) in [
            ("--temperature", "temperature T"),
            ("--scale", "scaling factor S"),
        ] {
            check(vec!["eval".into(), flag.into(), bad.into()], needle);
        }
        for (flag, needle) in [
            ("--temperatures", "temperature T"),
            ("--scales", "scaling factor S"),
        ] {
            check(
                vec!["calibrate".into(), flag.into(), format!("0.9,{bad}")],
                needle,
            );
        }
    }
    // Arguments clap refuses: still one line, naming what is wrong.
    check(run(&["--temperature", "warm"]), "invalid value");
    check(run(&["--mode", "fast"]), "possible values");
    check(
        vec!["run".into(), "--question".into(), "Who?".into()],
        "--context",
    );

    // The block store's flags: a budget that is no size, a folder that cannot be made or holds
    // other files, a Redis URL that does not parse; `cache clear` of a tier that is off.
    check(run(&["--store-budget", "lots"]), "--store-budget");
    check(run(&["--store-budget", "-1G"]), "--store-budget");
    check(run(&["--store", "/dev/null/blocks"]), "/dev/null/blocks");
    let foreign = dir.path("mine");
    std::fs::create_dir_all(&foreign).expect("folder");
    std::fs::write(format!("{foreign}/notes.txt"), "mine").expect("file");
    check(run(&["--store", &foreign]), "holds other files");
    check(run(&["--redis", "http://nowhere"]), "redis URL");
    check(
        owned(&["cache", "clear", "--tier", "redis"]),
        "no Redis tier",
    );
    check(
        owned(&["cache", "clear", "--tier", "disk", "--no-store"]),
        "no disk tier",
    );
    check(
        owned(&[
            "cache",
            "warm",
            "--context",
            &passage,
            "--mode",
            "sequential",
        ]),
        "caches nothing",
    );
    check(
        owned(&["cache", "warm", "--context", &passage, "--no-store"]),
        "nothing to warm",
    );
    assert_eq!(
        std::fs::read_dir(&foreign).expect("folder").count(),
        1,
        "nothing written"
    );

    // --max-tokens: zero, more than the window, more than a number.
    check(run(&["--max-tokens", "0"]), "at least 1");
    check(
        vec!["demo".into(), "--max-tokens".into(), "0".into()],
        "at least 1",
    );
    check(run(&["--max-tokens", "1000000000000"]), "window");
    check(
        run(&["--max-tokens", "99999999999999999999999"]),
        "--max-tokens",
    );

    // Context files: binary, empty, blank, not UTF-8, a directory.
    for (name, bytes, needle) in [
        (
            "binary.bin",
            &b"\x7fELF\x02\x01\x01\0\0\0\0\0passage"[..],
            "binary",
        ),
        (
            "png.bin",
            &b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"[..],
            "not UTF-8",
        ),
        ("empty.txt", &b""[..], "empty"),
        ("blank.txt", &b" \n\t\n"[..], "empty"),
        ("latin1.txt", &b"caf\xe9 cr\xe8me"[..], "not UTF-8"),
    ] {
        let file = dir.file(name, bytes);
        check(
            owned(&["run", "--context", &file, "--question", "Who?"]),
            needle,
        );
    }
    for (context, needle) in [
        (dir.path(""), "directory"),
        ("/dev/zero".into(), "regular file"),
    ] {
        check(
            owned(&["run", "--context", &context, "--question", "Who?"]),
            needle,
        );
    }

    // A question longer than the model's window.
    let long = "word ".repeat(9000);
    check(
        owned(&["run", "--context", &passage, "--question", &long]),
        "window",
    );

    // --device cuda where no GPU is usable.
    if ape_attn::cuda::Device::new(0).is_err() {
        check(run(&["--device", "cuda"]), "device");
    }

    // --json that cannot be written: a missing directory, a directory, a directory's path, a
    // read-only file (left as it was).
    let read_only = dir.file("read-only.json", b"[]\n");
    let mut perms = std::fs::metadata(&read_only).expect("stat").permissions();
    perms.set_readonly(true);
    std::fs::set_permissions(&read_only, perms).expect("chmod");
    for (json, needle) in [
        (dir.path("missing-dir/out.json"), "missing-dir/out.json"),
        (dir.path(""), "directory"),
        (dir.path("not-yet/"), "directory"),
        (read_only.clone(), "read-only"),
    ] {
        for cmd in ["eval", "calibrate"] {
            check(owned(&[cmd, "--docs", "2", "--json", &json]), needle);
        }
    }

    assert_eq!(std::fs::read(&read_only).expect("read"), b"[]\n");

    // Nothing was written beside the inputs.
    let mut inputs: Vec<String> = owned(&[
        "passage.txt",
        "mine",
        "read-only.json",
        "empty.gguf",
        "truncated.gguf",
        "header-only.gguf",
        "wrong-magic.gguf",
        "binary.bin",
        "png.bin",
        "empty.txt",
        "blank.txt",
        "latin1.txt",
    ]);
    inputs.sort();
    assert_eq!(dir.entries(), inputs);
}

/// `ape serve` refuses what it cannot serve before loading anything: one line each.
#[test]
fn serve_refuses_bad_settings_in_one_line() {
    for (args, needle) in [
        (&["serve", "--addr", "nowhere"][..], "--addr"),
        (
            &["serve", "--addr", "127.0.0.1:0", "--temperature", "nan"],
            "temperature",
        ),
        (
            &["serve", "--addr", "127.0.0.1:0", "--threads", "0"],
            "--threads",
        ),
        (
            &["serve", "--addr", "127.0.0.1:0", "--max-active", "0"],
            "--max-active",
        ),
        (&["serve", "--addr", "0.0.0.0:0"], "not a loopback address"),
        (
            &["serve", "--addr", "127.0.0.1:0", "--api-key", ""],
            "API key is empty",
        ),
        (
            &["serve", "--addr", "127.0.0.1:0", "--max-body", "lots"],
            "--max-body",
        ),
    ] {
        let (c, _, e) = ape(args);
        assert_one_line_error(c, &e, needle);
    }
    // A port in use is a clear error too.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let addr = taken.local_addr().expect("its address").to_string();
    let (c, _, e) = ape(&["serve", "--addr", &addr]);
    assert_one_line_error(c, &e, "cannot listen on");
}
