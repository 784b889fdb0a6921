//! `ape serve`: the OpenAI-compatible server (ape_llama::serve) with the model on a device.

use super::*;
use ape_llama::serve::{api::Limits, ServeOptions, Server};
use std::net::SocketAddr;

#[derive(clap::Args)]
pub(crate) struct ServeArgs {
    /// GGUF file or Hugging Face directory (default: SmolLM2-135M-Instruct, fetched by
    /// scripts/fetch-model.sh).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Where to run (auto: GPU 0 when one is usable, else the CPU).
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    /// Address to listen on. Loopback by default; any other address needs --api-key (or
    /// --public-without-key).
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Require `Authorization: Bearer KEY` on every endpoint but /health.
    #[arg(long, env = "APE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Serve a non-loopback address without an API key (anyone who reaches it may use it).
    #[arg(long)]
    public_without_key: bool,
    /// The mode of requests that do not choose one (`"ape": {"mode": ...}` in a request).
    #[arg(long, value_enum, default_value_t = ModeArg::Ape)]
    mode: ModeArg,
    /// APE attention temperature T of requests that do not give one (finite, > 0).
    #[arg(long, allow_hyphen_values = true, default_value_t = ApeParams::DEFAULT_TEMPERATURE)]
    temperature: f32,
    /// APE scaling factor S of requests that do not give one (finite, > 0).
    #[arg(long, allow_hyphen_values = true, default_value_t = ApeParams::DEFAULT_SCALE)]
    scale: f32,
    /// System prompt of requests without a system message.
    #[arg(long, default_value = DEFAULT_SYSTEM)]
    system: String,
    /// The model's name in replies and /v1/models (default: the model file's name).
    #[arg(long)]
    model_name: Option<String>,
    /// CPU threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Sequences generated at once: each decode step runs them all as one batched forward pass.
    #[arg(long, default_value_t = 8)]
    max_active: usize,
    /// Requests that may wait for a slot; beyond them a request gets 503 with Retry-After.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Largest prefill piece in tokens: running sequences take a decode step between two
    /// pieces, so a long prompt holds them up for one piece at a time.
    #[arg(long, default_value_t = 256)]
    prefill_chunk: usize,
    /// max_tokens of a request that gives none (within what the window leaves).
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    /// Most documents in one request.
    #[arg(long, default_value_t = 64)]
    max_documents: usize,
    /// Most tokens of one document.
    #[arg(long, default_value_t = 4096)]
    max_document_tokens: usize,
    /// Largest request body (e.g. 8M, 512K).
    #[arg(long, default_value = "8M", value_parser = parse_body)]
    max_body: u64,
    /// Seconds in-flight requests may run after SIGTERM/SIGINT before they are ended.
    #[arg(long, default_value_t = 30.0)]
    shutdown_grace: f64,
    #[command(flatten)]
    store: StoreArgs,
}

fn parse_body(s: &str) -> Result<u64, String> {
    ape_llama::store::parse_size(s)
}

pub(crate) fn serve(a: ServeArgs) -> ape_attn::Result<()> {
    let ape = ApeParams::new(a.temperature, a.scale)?;
    if !(a.shutdown_grace.is_finite() && a.shutdown_grace >= 0.0) {
        return Err(Error::InvalidInput(
            "--shutdown-grace must be a number of seconds >= 0".into(),
        ));
    }
    if let Some(n) = a.threads {
        if n == 0 {
            return Err(Error::InvalidInput("--threads must be at least 1".into()));
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .map_err(|e| Error::InvalidInput(format!("--threads: {e}")))?;
    }
    let path = model_path(a.model.clone())?;
    let model_name = a.model_name.clone().unwrap_or_else(|| {
        path.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "ape".into())
    });
    let mut opts = ServeOptions::new(a.addr);
    opts.api_key = a.api_key.clone();
    opts.public_without_key = a.public_without_key;
    opts.mode = a.mode.mode(ape);
    opts.system = a.system.clone();
    opts.model_name = model_name.clone();
    opts.max_active = a.max_active;
    opts.max_queue = a.max_queue;
    opts.prefill_chunk = a.prefill_chunk;
    opts.default_max_tokens = a.max_tokens.max(1);
    opts.shutdown_grace = Duration::from_secs_f64(a.shutdown_grace);
    opts.limits = Limits {
        max_body_bytes: usize::try_from(a.max_body).unwrap_or(usize::MAX),
        max_documents: a.max_documents,
        max_document_tokens: a.max_document_tokens,
        ..Limits::default()
    };
    // Listen first (GET /health answers "loading"), then load the model.
    let store = a.store.open(true)?;
    let server = Server::start(opts)?;
    let addr = server.local_addr();
    eprintln!("ape serve: loading {} ...", path.display());
    let loaded = load(&path, a.device, store.clone())?;
    let ready_line = format!(
        "ape serve: listening on http://{addr} (model {model_name} on {}, mode {}, {} sequences at once)",
        loaded.device,
        a.mode.mode(ape).name(),
        a.max_active
    );
    let tokenizer = loaded.tokenizer;
    let device = loaded.device;
    let result = with_engine!(loaded.backend, engine => server.run(engine, tokenizer, &device, || {
        eprintln!("{ready_line}")
    }));
    store.flush();
    eprintln!("ape serve: stopped");
    result
}
