//! `ape serve`: an OpenAI-compatible HTTP server where the passages sent with a question
//! (`documents`) are encoded once, kept in the block store, and reused in any order and subset by
//! later requests (docs/SERVE.md).
//!
//! Two halves: the HTTP side ([axum] on a tokio runtime of its own thread) parses and checks each
//! request, tokenizes it and queues it; the model's loop ([`Server::run`], on the caller's thread,
//! which owns the engine) admits queued requests between decode steps, prefills each in pieces,
//! and decodes every running sequence's next token in one batched forward pass. They talk through
//! a bounded queue (full: 503 with `Retry-After`) and one event channel per request; a client that
//! leaves closes its channel, and its sequence ends at the next step.

pub mod api;
mod metrics;
mod scheduler;
mod text;

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::engine::{Engine, Mode};
use crate::model::LlamaModel;
use crate::tokenizer::Tokenizer;
use api::{ApiError, Limits};
use metrics::Metrics;
use scheduler::{ChatJob, DocumentsJob, Event, Scheduler, Work};

/// How the server runs.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Where to listen.
    pub addr: SocketAddr,
    /// The key clients must send as `Authorization: Bearer KEY` (`None`: no key).
    pub api_key: Option<String>,
    /// Listen on a non-loopback address without a key (refused otherwise).
    pub public_without_key: bool,
    /// The mode of requests that do not choose one.
    pub mode: Mode,
    /// The system prompt of requests without a system message.
    pub system: String,
    /// The model's name in replies and `GET /v1/models`.
    pub model_name: String,
    /// Sequences generated at once (one batched decode step runs them all).
    pub max_active: usize,
    /// Requests waiting for a slot beyond which new ones get 503.
    pub max_queue: usize,
    /// Largest prefill piece, tokens: the running sequences take a decode step between pieces.
    pub prefill_chunk: usize,
    /// `max_tokens` of a request that gives none (within the room the window leaves).
    pub default_max_tokens: usize,
    /// How long in-flight requests may run after SIGTERM/SIGINT before they are ended.
    pub shutdown_grace: Duration,
    /// Request limits.
    pub limits: Limits,
}

impl ServeOptions {
    /// The defaults, listening on `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            api_key: None,
            public_without_key: false,
            mode: Mode::Ape(ape_attn::ApeParams::default()),
            system: "You are a helpful assistant. Answer the question using the passages.".into(),
            model_name: "ape".into(),
            max_active: 8,
            max_queue: 64,
            prefill_chunk: 256,
            default_max_tokens: 512,
            shutdown_grace: Duration::from_secs(30),
            limits: Limits::default(),
        }
    }
}

/// What the model's loop and the HTTP handlers share.
pub(crate) struct Shared {
    opts: ServeOptions,
    metrics: Arc<Metrics>,
    ready: OnceLock<Ready>,
    /// Set once the grace period after a shutdown signal has passed: the loop ends what runs.
    abort: AtomicBool,
    next_id: AtomicU64,
    started: u64,
}

struct Ready {
    tokenizer: Arc<Tokenizer>,
    window: usize,
    /// Where the model runs, for `GET /health`.
    device: String,
}

/// The state of the HTTP handlers.
#[derive(Clone)]
struct AppState {
    shared: Arc<Shared>,
    jobs: SyncSender<Work>,
}

/// A server listening, its model not yet attached: `GET /health` answers 503 until
/// [`Server::run`] is called with the engine.
pub struct Server {
    shared: Arc<Shared>,
    jobs: Receiver<Work>,
    addr: SocketAddr,
    http: std::thread::JoinHandle<Result<(), String>>,
}

fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

impl Server {
    /// Binds `opts.addr` and starts answering HTTP. Refuses a non-loopback address without an
    /// API key unless `opts.public_without_key`.
    pub fn start(opts: ServeOptions) -> ape_attn::Result<Self> {
        use ape_attn::Error;
        if opts.api_key.as_deref().is_some_and(str::is_empty) {
            return Err(Error::InvalidInput("the API key is empty".into()));
        }
        if !is_loopback(&opts.addr) && opts.api_key.is_none() && !opts.public_without_key {
            return Err(Error::InvalidInput(format!(
                "{} is not a loopback address: give an API key (--api-key or APE_API_KEY), or \
                 --public-without-key to serve anyone who can reach it",
                opts.addr
            )));
        }
        if opts.max_active == 0 || opts.max_queue == 0 || opts.prefill_chunk == 0 {
            return Err(Error::InvalidInput(
                "--max-active, --max-queue and --prefill-chunk must be at least 1".into(),
            ));
        }
        let listener = TcpListener::bind(opts.addr)
            .map_err(|e| Error::InvalidInput(format!("cannot listen on {}: {e}", opts.addr)))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::InvalidInput(format!("listener: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::InvalidInput(format!("listener: {e}")))?;
        let metrics =
            Arc::new(Metrics::new().map_err(|e| Error::InvalidInput(format!("metrics: {e}")))?);
        let (tx, rx) = sync_channel(opts.max_queue);
        let shared = Arc::new(Shared {
            opts,
            metrics,
            ready: OnceLock::new(),
            abort: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            started: unix_now(),
        });
        let state = AppState {
            shared: shared.clone(),
            jobs: tx,
        };
        let http = std::thread::Builder::new()
            .name("ape-http".into())
            .spawn(move || http_main(listener, state))
            .map_err(|e| Error::InvalidInput(format!("cannot start the HTTP thread: {e}")))?;
        Ok(Self {
            shared,
            jobs: rx,
            addr,
            http,
        })
    }

    /// The address it listens on (the port chosen when port 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves with `engine` until SIGTERM or SIGINT: then no new connection is taken, requests
    /// in flight finish (or, after the grace period, end with a 503 error), and this returns.
    /// `device` says where the model runs (shown by `GET /health`); `on_ready` is called once
    /// requests are answered (the place to tell the user the server is up).
    pub fn run<M: LlamaModel>(
        self,
        engine: Engine<M>,
        tokenizer: Tokenizer,
        device: &str,
        on_ready: impl FnOnce(),
    ) -> ape_attn::Result<()> {
        let tokenizer = Arc::new(tokenizer);
        let window = engine.model.config().context_length;
        let _ = self.shared.ready.set(Ready {
            tokenizer: tokenizer.clone(),
            window,
            device: device.to_string(),
        });
        on_ready();
        Scheduler {
            engine,
            tok: &tokenizer,
            shared: &self.shared,
            jobs: self.jobs,
        }
        .run();
        match self.http.join() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ape_attn::Error::InvalidInput(format!("HTTP server: {e}"))),
            Err(_) => Err(ape_attn::Error::InvalidInput(
                "the HTTP thread panicked".into(),
            )),
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn http_main(listener: TcpListener, state: AppState) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("ape-http-worker")
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())?;
        let shared = state.shared.clone();
        let app = router(state);
        let signal_shared = shared.clone();
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                shutdown_signal().await;
                eprintln!(
                    "shutting down: finishing the requests in flight (at most {:.0} s)",
                    signal_shared.opts.shutdown_grace.as_secs_f64()
                );
                let grace = signal_shared.opts.shutdown_grace;
                let s = signal_shared.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(grace).await;
                    s.abort.store(true, Ordering::Relaxed);
                });
            })
            .await
            .map_err(|e| e.to_string())
    })?;
    // Connections are closed; the router (and the queue's sender with it) is dropped, so the
    // model's loop sees the queue close once it has emptied it.
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

fn router(state: AppState) -> Router {
    let guarded = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/documents", post(documents))
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics_text))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .route("/health", get(health))
        .merge(guarded)
        .fallback(not_found)
        .with_state(state)
}

fn error_response(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = (status, Json(e.body())).into_response();
    if e.status == 503 || e.status == 429 {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    if e.status == 401 {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}

fn count(shared: &Shared, endpoint: &str, status: u16) {
    shared
        .metrics
        .requests
        .with_label_values(&[endpoint, &status.to_string()])
        .inc();
}

/// Compares without stopping at the first difference.
fn same_key(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(key) = state.shared.opts.api_key.as_deref() else {
        return next.run(req).await;
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(g) if same_key(g.as_bytes(), key.as_bytes()) => next.run(req).await,
        _ => {
            let e = ApiError::new(
                401,
                "authentication_error",
                "missing or wrong API key: send Authorization: Bearer <key>",
            )
            .with_code("invalid_api_key");
            count(&state.shared, req.uri().path(), 401);
            error_response(&e)
        }
    }
}

async fn not_found(req: Request) -> Response {
    error_response(
        &ApiError::new(
            404,
            "invalid_request_error",
            format!("no route {} {}", req.method(), req.uri().path()),
        )
        .with_code("not_found"),
    )
}

async fn health(State(state): State<AppState>) -> Response {
    match state.shared.ready.get() {
        Some(r) => Json(json!({
            "status": "ok",
            "model": state.shared.opts.model_name,
            "device": r.device,
        }))
        .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "loading"})),
        )
            .into_response(),
    }
}

async fn models(State(state): State<AppState>) -> Response {
    count(&state.shared, "/v1/models", 200);
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.shared.opts.model_name,
            "object": "model",
            "created": state.shared.started,
            "owned_by": "ape-attn",
        }]
    }))
    .into_response()
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.shared.metrics.render(),
    )
        .into_response()
}

/// The body, at most `limit` bytes (413 beyond).
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Vec<u8>, ApiError> {
    let too_large = || {
        ApiError::new(
            413,
            "invalid_request_error",
            format!("the request body is larger than the server's limit of {limit} bytes"),
        )
        .with_code("body_too_large")
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    match axum::body::to_bytes(body, limit).await {
        Ok(b) => Ok(b.to_vec()),
        Err(e) => {
            // axum reports the limit through its error's source chain.
            let mut cause: Option<&dyn std::error::Error> = Some(&e);
            let mut over = false;
            while let Some(c) = cause {
                over |= c.to_string().contains("length limit");
                cause = c.source();
            }
            if over {
                Err(too_large())
            } else {
                Err(ApiError::invalid(
                    None,
                    format!("cannot read the request body: {e}"),
                ))
            }
        }
    }
}

fn ready(shared: &Shared) -> Result<&Ready, ApiError> {
    shared.ready.get().ok_or_else(|| {
        ApiError::new(503, "server_error", "the model is still loading").with_code("loading")
    })
}

/// Queues work for the model's loop.
fn submit(state: &AppState, work: Work) -> Result<(), ApiError> {
    match state.jobs.try_send(work) {
        Ok(()) => {
            state.shared.metrics.queue_depth.inc();
            Ok(())
        }
        Err(TrySendError::Full(_)) => Err(ApiError::new(
            503,
            "server_error",
            format!(
                "the server is busy: {} requests are waiting; retry later",
                state.shared.opts.max_queue
            ),
        )
        .with_code("queue_full")),
        Err(TrySendError::Disconnected(_)) => {
            Err(
                ApiError::new(503, "server_error", "the server is shutting down")
                    .with_code("shutting_down"),
            )
        }
    }
}

/// A tokenized, checked request ready to queue.
struct Admitted {
    job: ChatJob,
    stream: bool,
    include_usage: bool,
    rx: UnboundedReceiver<Event>,
}

async fn prepare_chat(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Admitted, ApiError> {
    let shared = &state.shared;
    let ready = ready(shared)?;
    let bytes = read_body(headers, body, shared.opts.limits.max_body_bytes).await?;
    let opts = shared.opts.clone();
    let tok = ready.tokenizer.clone();
    let window = ready.window;
    // Parsing and tokenizing take CPU time in proportion to the body: off the async workers.
    let (req, prompt, mode) = tokio::task::spawn_blocking(move || {
        let req = api::parse_chat_request(&bytes, &opts.limits)?;
        let mode = match req.mode {
            Some(choice) => choice.resolve(opts.mode)?,
            None => opts.mode,
        };
        let prompt = api::build_prompt(
            &tok,
            &opts.system,
            &req.messages,
            &req.documents,
            &opts.limits,
        )?;
        Ok::<_, ApiError>((req, prompt, mode))
    })
    .await
    .map_err(|e| ApiError::internal(format!("request parsing failed: {e}")))??;
    let needed = api::prompt_positions(&prompt, mode);
    if needed >= window {
        return Err(ApiError::invalid(
            Some("messages".into()),
            format!(
                "the prompt needs {needed} positions in {} mode, and the model's window is {window}: \
                 send fewer or shorter documents",
                mode.name()
            ),
        )
        .with_code("context_length_exceeded"));
    }
    let room = window - needed;
    let max_tokens = match req.max_tokens {
        Some(n) if n > room => {
            return Err(ApiError::invalid(
                Some("max_tokens".into()),
                format!(
                "max_tokens {n} does not fit: the prompt takes {needed} of the model's {window} \
                     positions in {} mode, leaving {room}",
                mode.name()
            ),
            )
            .with_code("context_length_exceeded"))
        }
        Some(n) => n,
        None => room.min(shared.opts.default_max_tokens),
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    Ok(Admitted {
        job: ChatJob {
            prompt,
            mode,
            max_tokens,
            sampling: req.sampling,
            stop: req.stop,
            queued_at: Instant::now(),
            events: tx,
        },
        stream: req.stream,
        include_usage: req.include_usage,
        rx,
    })
}

async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    req: Request,
) -> Response {
    const ENDPOINT: &str = "/v1/chat/completions";
    let shared = state.shared.clone();
    let admitted = match prepare_chat(&state, &headers, req.into_body()).await {
        Ok(a) => a,
        Err(e) => {
            count(&shared, ENDPOINT, e.status);
            return error_response(&e);
        }
    };
    let Admitted {
        job,
        stream,
        include_usage,
        mut rx,
    } = admitted;
    if let Err(e) = submit(&state, Work::Chat(job)) {
        count(&shared, ENDPOINT, e.status);
        return error_response(&e);
    }
    let id = format!(
        "chatcmpl-{:x}{:08x}",
        shared.started,
        shared.next_id.fetch_add(1, Ordering::Relaxed)
    );
    let created = unix_now();
    let model = shared.opts.model_name.clone();
    if !stream {
        let mut text = String::new();
        loop {
            match rx.recv().await {
                Some(Event::Text(t)) => text.push_str(&t),
                Some(Event::Done {
                    finish_reason,
                    usage,
                }) => {
                    count(&shared, ENDPOINT, 200);
                    return Json(json!({
                        "id": id,
                        "object": "chat.completion",
                        "created": created,
                        "model": model,
                        "choices": [{
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": finish_reason,
                            "logprobs": null,
                        }],
                        "usage": usage,
                        "system_fingerprint": null,
                    }))
                    .into_response();
                }
                Some(Event::Error(e)) => {
                    count(&shared, ENDPOINT, e.status);
                    return error_response(&e);
                }
                None => {
                    let e = ApiError::internal("the request ended without an answer");
                    count(&shared, ENDPOINT, 500);
                    return error_response(&e);
                }
            }
        }
    }
    count(&shared, ENDPOINT, 200);
    let head = Arc::new(json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": null,
    }));
    // One chunk: the common fields, the choices, and the usage when given.
    let chunk = move |choices: Value, usage: Option<&api::Usage>| -> SseEvent {
        let mut v = (*head).clone();
        v["choices"] = choices;
        if let Some(u) = usage {
            v["usage"] = json!(u);
        }
        SseEvent::default().data(v.to_string())
    };
    let delta = |delta: Value, finish: Option<&str>| json!([{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}]);
    let first = chunk(
        delta(json!({"role": "assistant", "content": ""}), None),
        None,
    );
    let events = futures_util::stream::unfold(Some(rx), move |rx| {
        let chunk = chunk.clone();
        async move {
            let mut rx = rx?;
            let out: Vec<SseEvent> = match rx.recv().await {
                Some(Event::Text(t)) => {
                    return Some((
                        vec![chunk(delta(json!({"content": t}), None), None)],
                        Some(rx),
                    ))
                }
                Some(Event::Done {
                    finish_reason,
                    usage,
                }) => {
                    let mut v = vec![chunk(delta(json!({}), Some(finish_reason)), None)];
                    if include_usage {
                        v.push(chunk(json!([]), Some(&usage)));
                    }
                    v.push(SseEvent::default().data("[DONE]"));
                    v
                }
                Some(Event::Error(e)) => vec![
                    SseEvent::default().data(e.body().to_string()),
                    SseEvent::default().data("[DONE]"),
                ],
                None => vec![SseEvent::default().data("[DONE]")],
            };
            Some((out, None))
        }
    })
    .flat_map(futures_util::stream::iter);
    let all = futures_util::stream::once(async move { first })
        .chain(events)
        .map(Ok::<_, std::convert::Infallible>);
    Sse::new(all)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

async fn documents(State(state): State<AppState>, headers: HeaderMap, req: Request) -> Response {
    const ENDPOINT: &str = "/v1/documents";
    let shared = state.shared.clone();
    let result = async {
        let ready = ready(&shared)?;
        let bytes = read_body(&headers, req.into_body(), shared.opts.limits.max_body_bytes).await?;
        let opts = shared.opts.clone();
        let tok = ready.tokenizer.clone();
        let (n, prompt, mode) = tokio::task::spawn_blocking(move || {
            let req = api::parse_documents_request(&bytes, &opts.limits)?;
            let mode = match req.mode {
                Some(choice) => choice.resolve(opts.mode)?,
                None => opts.mode,
            };
            if mode == Mode::Sequential {
                return Err(ApiError::invalid(
                    Some("ape.mode".into()),
                    "sequential mode caches nothing: encode for parallel, ape or block-attention",
                ));
            }
            let system = req.system.unwrap_or_else(|| opts.system.clone());
            // The question is not part of any block: any question reads the same blocks.
            let question = [api::Message {
                role: api::Role::User,
                content: "?".into(),
            }];
            let prompt = api::build_prompt(&tok, &system, &question, &req.documents, &opts.limits)?;
            Ok((req.documents.len(), prompt, mode))
        })
        .await
        .map_err(|e| ApiError::internal(format!("request parsing failed: {e}")))??;
        let needed = api::prompt_positions(&prompt, mode);
        if needed > ready.window {
            return Err(ApiError::invalid(
                Some("documents".into()),
                format!(
                    "these documents need {needed} positions in {} mode, more than the model's \
                     window of {}",
                    mode.name(),
                    ready.window
                ),
            )
            .with_code("context_length_exceeded"));
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        submit(
            &state,
            Work::Documents(DocumentsJob {
                prompt,
                mode,
                reply: tx,
            }),
        )?;
        let blocks = rx
            .await
            .map_err(|_| ApiError::internal("the request ended without an answer"))??;
        debug_assert_eq!(blocks.len(), n);
        let encoded: usize = blocks
            .iter()
            .filter(|b| b.1 == crate::store::Source::Encoded)
            .map(|b| b.0)
            .sum();
        Ok(json!({
            "object": "list",
            "mode": mode.name(),
            "data": blocks.iter().enumerate().map(|(i, (tokens, source))| json!({
                "index": i,
                "tokens": tokens,
                "source": source.name(),
            })).collect::<Vec<_>>(),
            "usage": {"tokens_encoded": encoded},
        }))
    }
    .await;
    match result {
        Ok(v) => {
            count(&shared, ENDPOINT, 200);
            Json(v).into_response()
        }
        Err(e) => {
            count(&shared, ENDPOINT, e.status);
            error_response(&e)
        }
    }
}
