//! Compiles every `kernels/*.cu` into one fatbin (sm_80 and sm_90a cubins plus compute_80 PTX)
//! and embeds it in the crate.
//!
//! nvcc is looked for in this order: `$NVCC`, `$CUDA_HOME/bin/nvcc`, `$CUDA_PATH/bin/nvcc`, `nvcc`
//! on `PATH`, then the project-local install made by `scripts/install-nvcc.sh` (`.tools/cuda`).
//! With none found (or `APE_ATTN_CPU_ONLY=1`) the crate is built CPU-only: one cargo warning, and
//! every GPU entry point returns `Error::KernelsNotBuilt`. A kernel that fails to compile fails the
//! build with nvcc's message.
//!
//! The fatbin is kept in `<target dir>/kernel-cache/`, named by a hash of everything that goes
//! into it (nvcc and its version, the flags, every file of `kernels/`), so the builds of one
//! checkout that differ only in profile or features (clippy, doc, test, release) compile the
//! kernels once.

use std::env;
use std::fs;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Real architectures compiled to SASS, plus PTX for forward compatibility.
const GENCODE: &[&str] = &[
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90a,code=sm_90a",
    "-gencode=arch=compute_80,code=compute_80",
];
const ARCHS: &str = "sm_80, sm_90a, compute_80 (PTX)";

fn main() {
    println!("cargo::rustc-check-cfg=cfg(ape_kernels)");
    println!("cargo::rerun-if-changed=kernels");
    #[cfg(feature = "emulator")]
    println!("cargo::rerun-if-changed=emulator");
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "PATH",
        "APE_ATTN_CPU_ONLY",
        "APE_ATTN_NVCC_FLAGS",
    ] {
        println!("cargo::rerun-if-env-changed={var}");
    }

    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("set by cargo"));
    let kernel_dir = manifest_dir.join("kernels");

    #[cfg(feature = "emulator")]
    build_emulator(&manifest_dir);

    if env::var("APE_ATTN_CPU_ONLY").is_ok_and(|v| !v.is_empty() && v != "0") {
        cpu_only("APE_ATTN_CPU_ONLY is set; unset it and rebuild");
        return;
    }
    let nvcc = match find_nvcc(&manifest_dir) {
        Ok(Some(nvcc)) => nvcc,
        Ok(None) => {
            cpu_only(
                "no nvcc found ($NVCC, $CUDA_HOME/bin, $CUDA_PATH/bin, PATH, .tools/cuda); \
                 run scripts/install-nvcc.sh (the pinned CUDA 13.0 compiler) and rebuild",
            );
            return;
        }
        Err(msg) => fail(&msg),
    };

    let mut sources: Vec<PathBuf> = fs::read_dir(&kernel_dir)
        .unwrap_or_else(|e| fail(&format!("cannot read {}: {e}", kernel_dir.display())))
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|ext| ext == "cu"))
        .collect();
    sources.sort();
    if sources.is_empty() {
        fail(&format!("no .cu files in {}", kernel_dir.display()));
    }

    // One translation unit that includes every kernel file, so that the whole crate is one module
    // image (one fatbin) without relocatable device code.
    let unity = out_dir.join("ape_attn_kernels.cu");
    let body: String = sources
        .iter()
        .map(|p| format!("#include \"{}\"\n", p.display()))
        .collect();
    fs::write(&unity, body)
        .unwrap_or_else(|e| fail(&format!("cannot write {}: {e}", unity.display())));

    let fatbin = out_dir.join("ape_attn_kernels.fatbin");
    let flags: Vec<String> = ["-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr"]
        .iter()
        .chain(GENCODE)
        .map(|f| f.to_string())
        .chain(
            env::var("APE_ATTN_NVCC_FLAGS")
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_string),
        )
        .collect();
    let version = nvcc_version(&nvcc).unwrap_or_else(|| "unknown version".to_string());
    let cached = cache_path(&out_dir, &kernel_dir, &nvcc, &version, &flags);
    let from_cache = cached
        .as_ref()
        .is_some_and(|c| fs::copy(c, &fatbin).is_ok());
    if !from_cache {
        let mut cmd = Command::new(&nvcc);
        cmd.arg("-fatbin")
            .args(&flags)
            .args(["--threads", "0"])
            .arg(format!("-I{}", kernel_dir.display()))
            .arg("-o")
            .arg(&fatbin)
            .arg(&unity);
        let output = cmd
            .output()
            .unwrap_or_else(|e| fail(&format!("cannot run {}: {e}", nvcc.display())));
        if !output.status.success() {
            eprintln!("{}", String::from_utf8_lossy(&output.stdout));
            eprintln!("{}", String::from_utf8_lossy(&output.stderr));
            fail(&format!(
                "nvcc failed to compile the kernels ({}): see its message above",
                output.status
            ));
        }
        if let Some(c) = &cached {
            store_in_cache(&fatbin, c);
        }
    }

    let size = fs::metadata(&fatbin).map(|m| m.len()).unwrap_or(0);
    println!("cargo::rustc-cfg=ape_kernels");
    println!("cargo::rustc-env=APE_ATTN_FATBIN={}", fatbin.display());
    println!(
        "cargo::rustc-env=APE_ATTN_KERNEL_BUILD=nvcc {version} ({}), {ARCHS}, {} kernel files, {size} bytes",
        nvcc.display(),
        sources.len()
    );
}

/// Where the fatbin of these inputs is cached: `<target dir>/kernel-cache/<hash>.fatbin`, the
/// target dir being four levels above `OUT_DIR` (`<target>[/<triple>]/<profile>/build/<pkg>/out`).
/// None when a kernel file cannot be read (the build then compiles, and fails if nvcc does).
fn cache_path(
    out_dir: &Path,
    kernel_dir: &Path,
    nvcc: &Path,
    version: &str,
    flags: &[String],
) -> Option<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(kernel_dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    // Two 64-bit hashes of the same inputs under different prefixes: a 128-bit name.
    let mut name = String::new();
    for salt in ["ape-attn kernels a", "ape-attn kernels b"] {
        let mut h = DefaultHasher::new();
        salt.hash(&mut h);
        nvcc.hash(&mut h);
        kernel_dir.hash(&mut h);
        version.hash(&mut h);
        flags.hash(&mut h);
        for f in &files {
            f.file_name().hash(&mut h);
            fs::read(f).ok()?.hash(&mut h);
        }
        name.push_str(&format!("{:016x}", h.finish()));
    }
    let target = out_dir.ancestors().nth(4)?;
    Some(target.join("kernel-cache").join(format!("{name}.fatbin")))
}

/// Puts a freshly compiled fatbin in the cache (written aside, then renamed, so that a
/// concurrent build never reads half a file); a failure only costs the next build a compile.
fn store_in_cache(fatbin: &Path, cached: &Path) {
    let Some(dir) = cached.parent() else { return };
    let tmp = cached.with_extension(format!("tmp{}", std::process::id()));
    let stored = fs::create_dir_all(dir).is_ok()
        && fs::copy(fatbin, &tmp).is_ok()
        && fs::rename(&tmp, cached).is_ok();
    if !stored {
        let _ = fs::remove_file(&tmp);
    }
}

/// The kernel emulator (feature `emulator`): the same kernel sources compiled for the CPU by the
/// host C++ compiler, linked in as `ape_emu_launch` (emulator/runtime.cpp, which includes
/// kernels/*.cu). Independent of nvcc: it builds on machines with no CUDA at all.
#[cfg(feature = "emulator")]
fn build_emulator(manifest_dir: &Path) {
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if arch != "x86_64" || os != "linux" {
        fail(&format!(
            "the kernel emulator (feature `emulator`) runs on x86_64 Linux only, not {arch} {os}"
        ));
    }
    cc::Build::new()
        .cpp(true)
        .file(manifest_dir.join("emulator/runtime.cpp"))
        .include(manifest_dir.join("kernels"))
        .define("APE_EMULATE", None)
        .flag("-std=c++17")
        // The kernels pun 16-bit pairs through uint32_t as CUDA code does.
        .flag("-fno-strict-aliasing")
        .flag("-Wno-unknown-pragmas")
        // Fast enough to test with at every profile.
        .opt_level(2)
        .debug(false)
        .compile("ape_attn_emulator");
}

fn cpu_only(reason: &str) {
    println!(
        "cargo::warning=ape-attn: CUDA kernels not built: {reason}. \
         This is a CPU-only build: GPU entry points return Error::KernelsNotBuilt."
    );
    println!("cargo::rustc-env=APE_ATTN_KERNEL_BUILD=not built: {reason}");
}

fn fail(msg: &str) -> ! {
    eprintln!("ape-attn build: {msg}");
    std::process::exit(1);
}

fn is_file(p: &Path) -> bool {
    p.is_file()
}

/// Ok(None) when there is no nvcc anywhere; Err when `$NVCC` names something that is not there
/// (an explicit choice that cannot be honoured is an error, not a silent CPU-only build).
fn find_nvcc(manifest_dir: &Path) -> Result<Option<PathBuf>, String> {
    if let Some(explicit) = env::var_os("NVCC").filter(|v| !v.is_empty()) {
        let p = PathBuf::from(&explicit);
        if is_file(&p) {
            return Ok(Some(p));
        }
        if let Some(found) = search_path(&explicit.to_string_lossy()) {
            return Ok(Some(found));
        }
        return Err(format!("NVCC={} does not exist", p.display()));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = env::var_os(var).filter(|v| !v.is_empty()) {
            let p = PathBuf::from(home).join("bin").join("nvcc");
            if is_file(&p) {
                return Ok(Some(p));
            }
        }
    }
    if let Some(p) = search_path("nvcc") {
        return Ok(Some(p));
    }
    Ok(local_install(manifest_dir))
}

fn search_path(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_file(p))
}

/// The nvcc that `scripts/install-nvcc.sh` puts in `.tools/cuda` (a Python venv).
fn local_install(manifest_dir: &Path) -> Option<PathBuf> {
    let lib = manifest_dir.join(".tools/cuda/lib");
    let mut pythons: Vec<PathBuf> = fs::read_dir(lib)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    pythons.sort();
    pythons
        .into_iter()
        .map(|py| py.join("site-packages/nvidia/cu13/bin/nvcc"))
        .find(|p| is_file(p))
}

fn nvcc_version(nvcc: &Path) -> Option<String> {
    let out = Command::new(nvcc).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "Cuda compilation tools, release 13.0, V13.0.88"
    text.lines()
        .find_map(|l| l.split(", ").find(|w| w.starts_with('V')))
        .map(|v| v.trim_start_matches('V').to_string())
}
