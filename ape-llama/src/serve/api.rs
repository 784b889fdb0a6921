//! The HTTP API's bodies: parsing and checking a request (a pure function of its bytes, fuzzed
//! with the other parsers), the prompt it asks for, the replies and the OpenAI-style errors.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::engine::{Mode, Prompt};
use crate::tokenizer::Tokenizer;
use ape_attn::{ApeParams, ApeVariant};

/// What the server accepts, checked before a request reaches the model.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest request body, bytes (413 beyond it).
    pub max_body_bytes: usize,
    /// Most documents in one request.
    pub max_documents: usize,
    /// Most tokens of one document.
    pub max_document_tokens: usize,
    /// Most stop sequences (OpenAI allows 4).
    pub max_stop: usize,
    /// Most messages in one request.
    pub max_messages: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 8 << 20,
            max_documents: 64,
            max_document_tokens: 4096,
            max_stop: 4,
            max_messages: 256,
        }
    }
}

/// An error as the client sees it: an HTTP status and OpenAI's error object.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, `server_error`, ...
    pub kind: &'static str,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    /// A machine-readable code (`context_length_exceeded`, `body_too_large`, ...).
    pub code: Option<&'static str>,
    /// What went wrong, for a person.
    pub message: String,
}

impl ApiError {
    /// A 400 about `param`.
    pub fn invalid(param: impl Into<Option<String>>, message: impl Into<String>) -> Self {
        Self {
            status: 400,
            kind: "invalid_request_error",
            param: param.into(),
            code: None,
            message: message.into(),
        }
    }

    /// The same error with `code` set.
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// Any status.
    pub fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            param: None,
            code: None,
            message: message.into(),
        }
    }

    /// A failure inside the server (500).
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "server_error", message)
    }

    /// The body: `{"error": {"message", "type", "param", "code"}}`.
    pub fn body(&self) -> Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.kind, self.message)
    }
}

impl From<ape_attn::Error> for ApiError {
    fn from(e: ape_attn::Error) -> Self {
        use ape_attn::Error as E;
        match e {
            E::InvalidInput(m) | E::Shape(m) => ApiError::invalid(None, m),
            e @ E::InvalidParameter { .. } => ApiError::invalid(None, e.to_string()),
            E::OutOfRange(m) => ApiError::invalid(None, m).with_code("context_length_exceeded"),
            E::CacheFull(m) => ApiError::new(503, "server_error", format!("cache full: {m}"))
                .with_code("cache_full"),
            other => ApiError::internal(other.to_string()),
        }
    }
}

/// A message's content: a string, or OpenAI's list of parts (text parts only).
#[derive(Deserialize, Debug)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize, Debug)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize, Debug)]
struct RawMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

/// A document: `{"text": ..., "title": ...}` or a plain string.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
enum RawDocument {
    Text(String),
    Object {
        text: String,
        #[serde(default)]
        title: Option<String>,
    },
}

#[derive(Deserialize, Debug)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// The `ape` extension object.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct RawApe {
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    scale: Option<f64>,
    #[serde(default)]
    scaled_mass: Option<bool>,
}

#[derive(Deserialize, Debug, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize, Debug)]
struct RawChat {
    #[serde(default)]
    model: Option<String>,
    messages: Vec<RawMessage>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    n: Option<u64>,
    #[serde(default)]
    documents: Option<Vec<RawDocument>>,
    #[serde(default)]
    ape: Option<RawApe>,
    #[serde(default)]
    frequency_penalty: Option<f64>,
    #[serde(default)]
    presence_penalty: Option<f64>,
    #[serde(default)]
    logprobs: Option<bool>,
    #[serde(default)]
    tools: Option<Value>,
}

/// A chat message, its role checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// `system`, `user` or `assistant` (`developer` is read as `system`).
    pub role: Role,
    /// Its text.
    pub content: String,
}

/// Who wrote a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The system prompt.
    System,
    /// The user.
    User,
    /// The model.
    Assistant,
}

/// A passage sent with the request: one cached block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Document {
    /// Its text.
    pub text: String,
    /// Its title, if given (written above the text).
    pub title: Option<String>,
}

impl Document {
    /// The text the model reads: the title on its own line when there is one, the text, one
    /// newline at the end (the layout `ape run` gives a passage file).
    pub fn rendered(&self) -> String {
        match &self.title {
            Some(t) if !t.trim().is_empty() => format!("{}\n{}\n", t.trim(), self.text.trim_end()),
            _ => format!("{}\n", self.text.trim_end()),
        }
    }
}

/// How the answer's tokens are chosen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0: greedy; otherwise the softmax temperature.
    pub temperature: f64,
    /// Nucleus: only the most likely tokens whose probabilities add up to `top_p` are drawn from.
    pub top_p: f64,
    /// The generator's seed (a request without one gets a fresh seed).
    pub seed: Option<u64>,
}

/// A checked `POST /v1/chat/completions` body.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatRequest {
    /// The model name the client gave (any is accepted; replies name the served model).
    pub model: Option<String>,
    /// The conversation, at least one message, the last one the user's.
    pub messages: Vec<Message>,
    /// The passages, each a block (empty: an ordinary chat request).
    pub documents: Vec<Document>,
    /// The encoding mode asked for (`None`: the server's).
    pub mode: Option<ModeChoice>,
    /// Most tokens to generate (`None`: the server's default, within the window).
    pub max_tokens: Option<usize>,
    /// Sampling.
    pub sampling: SamplingParams,
    /// Strings that end the answer (not included in it).
    pub stop: Vec<String>,
    /// Server-sent events instead of one reply.
    pub stream: bool,
    /// With `stream`: a last event with the usage.
    pub include_usage: bool,
}

/// The encoding mode a request asks for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ModeChoice {
    /// One of the four modes, fully given.
    Mode(Mode),
    /// APE with the server's own `T` and `S` for the values not given.
    Ape {
        /// `T`, if given.
        temperature: Option<f32>,
        /// `S`, if given.
        scale: Option<f32>,
        /// The older form of `S`.
        scaled_mass: bool,
    },
}

impl ModeChoice {
    /// The mode, with `default` filling what the request left out.
    pub fn resolve(self, default: Mode) -> Result<Mode, ApiError> {
        match self {
            ModeChoice::Mode(m) => Ok(m),
            ModeChoice::Ape {
                temperature,
                scale,
                scaled_mass,
            } => {
                let (t0, s0) = match default {
                    Mode::Ape(p) => (p.temperature(), p.scale()),
                    _ => (ApeParams::DEFAULT_TEMPERATURE, ApeParams::DEFAULT_SCALE),
                };
                let variant = if scaled_mass {
                    ApeVariant::ScaledMass
                } else {
                    ApeVariant::Released
                };
                ApeParams::new(temperature.unwrap_or(t0), scale.unwrap_or(s0))
                    .map(|p| Mode::Ape(p.with_variant(variant)))
                    .map_err(|e| ApiError::invalid(Some("ape".into()), e.to_string()))
            }
        }
    }
}

/// Parses a mode's name as the CLI spells it.
pub fn parse_mode(name: &str) -> Option<ModeChoice> {
    Some(match name {
        "sequential" => ModeChoice::Mode(Mode::Sequential),
        "parallel" => ModeChoice::Mode(Mode::Parallel),
        "block-attention" | "block_attention" | "block" => ModeChoice::Mode(Mode::BlockAttention),
        "ape" => ModeChoice::Ape {
            temperature: None,
            scale: None,
            scaled_mass: false,
        },
        _ => return None,
    })
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::invalid(
            None,
            "the request body is empty: send a JSON object",
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        let what = if e.is_syntax() || e.is_eof() {
            "the request body is not valid JSON"
        } else {
            "the request body does not match the API"
        };
        ApiError::invalid(None, format!("{what}: {e}"))
    })
}

fn parse_ape(raw: Option<RawApe>) -> Result<Option<ModeChoice>, ApiError> {
    let Some(a) = raw else {
        return Ok(None);
    };
    let param = |f: &str| Some(format!("ape.{f}"));
    let check = |name: &str, v: Option<f64>| -> Result<Option<f32>, ApiError> {
        match v {
            None => Ok(None),
            Some(x) if x.is_finite() && x > 0.0 && (x as f32).is_finite() && x as f32 > 0.0 => {
                Ok(Some(x as f32))
            }
            Some(x) => Err(ApiError::invalid(
                param(name),
                format!("ape.{name} must be finite and > 0, got {x}"),
            )),
        }
    };
    let temperature = check("temperature", a.temperature)?;
    let scale = check("scale", a.scale)?;
    let mode = match a.mode.as_deref() {
        None => None,
        Some(name) => Some(parse_mode(name).ok_or_else(|| {
            ApiError::invalid(
                param("mode"),
                format!("unknown mode {name:?}: one of sequential, parallel, ape, block-attention"),
            )
        })?),
    };
    let tuned = temperature.is_some() || scale.is_some() || a.scaled_mass.is_some();
    match mode {
        Some(ModeChoice::Mode(m)) if tuned => Err(ApiError::invalid(
            param("mode"),
            format!(
                "ape.temperature, ape.scale and ape.scaled_mass apply to mode \"ape\", not {:?}",
                m.name()
            ),
        )),
        Some(ModeChoice::Mode(m)) => Ok(Some(ModeChoice::Mode(m))),
        // `T`/`S` without a mode: APE with those values.
        Some(ModeChoice::Ape { .. }) | None if tuned || mode.is_some() => {
            Ok(Some(ModeChoice::Ape {
                temperature,
                scale,
                scaled_mass: a.scaled_mass.unwrap_or(false),
            }))
        }
        _ => Ok(None),
    }
}

fn parse_documents(
    raw: Option<Vec<RawDocument>>,
    limits: &Limits,
) -> Result<Vec<Document>, ApiError> {
    let raw = raw.unwrap_or_default();
    if raw.len() > limits.max_documents {
        return Err(ApiError::invalid(
            Some("documents".into()),
            format!(
                "{} documents, more than the server's limit of {}",
                raw.len(),
                limits.max_documents
            ),
        ));
    }
    raw.into_iter()
        .enumerate()
        .map(|(i, d)| {
            let (text, title) = match d {
                RawDocument::Text(t) => (t, None),
                RawDocument::Object { text, title } => (text, title),
            };
            if text.trim().is_empty() {
                return Err(ApiError::invalid(
                    Some(format!("documents[{i}].text")),
                    format!("document {i} is empty"),
                ));
            }
            Ok(Document { text, title })
        })
        .collect()
}

/// Parses and checks a chat completion request. Everything that can be checked without the
/// tokenizer is checked here; token counts are checked by [`build_prompt`] and the window by
/// the server.
pub fn parse_chat_request(body: &[u8], limits: &Limits) -> Result<ChatRequest, ApiError> {
    let raw: RawChat = parse_json(body)?;
    let param = |p: &str| Some(p.to_string());
    if raw.messages.is_empty() {
        return Err(ApiError::invalid(param("messages"), "messages is empty"));
    }
    if raw.messages.len() > limits.max_messages {
        return Err(ApiError::invalid(
            param("messages"),
            format!(
                "{} messages, more than the server's limit of {}",
                raw.messages.len(),
                limits.max_messages
            ),
        ));
    }
    let mut messages = Vec::with_capacity(raw.messages.len());
    for (i, m) in raw.messages.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            other => {
                return Err(ApiError::invalid(
                    Some(format!("messages[{i}].role")),
                    format!(
                        "role {other:?} is not supported: system, developer, user or assistant"
                    ),
                ))
            }
        };
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for (j, p) in parts.into_iter().enumerate() {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => text.push_str(&t),
                        (kind, _) => {
                            return Err(ApiError::invalid(
                                Some(format!("messages[{i}].content[{j}]")),
                                format!(
                                    "content part of type {kind:?}: only text parts are supported"
                                ),
                            ))
                        }
                    }
                }
                text
            }
        };
        messages.push(Message { role, content });
    }
    match messages.last() {
        Some(m) if m.role == Role::User && !m.content.trim().is_empty() => {}
        Some(m) if m.role == Role::User => {
            return Err(ApiError::invalid(
                param("messages"),
                "the last message (the question) is empty",
            ))
        }
        _ => {
            return Err(ApiError::invalid(
                param("messages"),
                "the last message must be the user's (the question to answer)",
            ))
        }
    }
    if let Some(n) = raw.n {
        if n != 1 {
            return Err(ApiError::invalid(
                param("n"),
                format!("n = {n}: only n = 1 is supported"),
            ));
        }
    }
    for (name, v) in [
        ("frequency_penalty", raw.frequency_penalty),
        ("presence_penalty", raw.presence_penalty),
    ] {
        if v.is_some_and(|v| v != 0.0) {
            return Err(ApiError::invalid(
                param(name),
                format!("{name} is not supported (only 0)"),
            ));
        }
    }
    if raw.logprobs == Some(true) {
        return Err(ApiError::invalid(
            param("logprobs"),
            "logprobs are not supported",
        ));
    }
    if raw.tools.as_ref().is_some_and(|t| !t.is_null()) {
        return Err(ApiError::invalid(param("tools"), "tools are not supported"));
    }
    let max_tokens = match (raw.max_completion_tokens, raw.max_tokens) {
        (Some(0), _) | (None, Some(0)) => {
            return Err(ApiError::invalid(
                param("max_tokens"),
                "max_tokens must be at least 1",
            ))
        }
        (Some(n), _) | (None, Some(n)) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
        (None, None) => None,
    };
    let temperature = raw.temperature.unwrap_or(1.0);
    if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
        return Err(ApiError::invalid(
            param("temperature"),
            format!("temperature must be between 0 and 2, got {temperature}"),
        ));
    }
    let top_p = raw.top_p.unwrap_or(1.0);
    if !(top_p.is_finite() && top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            param("top_p"),
            format!("top_p must be in (0, 1], got {top_p}"),
        ));
    }
    let stop = match raw.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > limits.max_stop {
        return Err(ApiError::invalid(
            param("stop"),
            format!("{} stop sequences, at most {}", stop.len(), limits.max_stop),
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid(param("stop"), "a stop sequence is empty"));
    }
    let stream = raw.stream.unwrap_or(false);
    Ok(ChatRequest {
        model: raw.model,
        messages,
        documents: parse_documents(raw.documents, limits)?,
        mode: parse_ape(raw.ape)?,
        max_tokens,
        sampling: SamplingParams {
            temperature,
            top_p,
            seed: raw.seed.map(|s| s as u64),
        },
        stop,
        stream,
        include_usage: stream && raw.stream_options.is_some_and(|o| o.include_usage),
    })
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawDocumentsRequest {
    documents: Vec<RawDocument>,
    #[serde(default)]
    ape: Option<RawApe>,
    #[serde(default)]
    system: Option<String>,
}

/// A checked `POST /v1/documents` body: passages to encode ahead of the questions.
#[derive(Clone, Debug, PartialEq)]
pub struct DocumentsRequest {
    /// The passages.
    pub documents: Vec<Document>,
    /// The mode whose blocks to encode (`None`: the server's).
    pub mode: Option<ModeChoice>,
    /// The system prompt the questions will use (APE and parallel encode passages after it).
    pub system: Option<String>,
}

/// Parses and checks a `POST /v1/documents` body.
pub fn parse_documents_request(body: &[u8], limits: &Limits) -> Result<DocumentsRequest, ApiError> {
    let raw: RawDocumentsRequest = parse_json(body)?;
    if raw.documents.is_empty() {
        return Err(ApiError::invalid(
            Some("documents".into()),
            "documents is empty",
        ));
    }
    Ok(DocumentsRequest {
        documents: parse_documents(Some(raw.documents), limits)?,
        mode: parse_ape(raw.ape)?,
        system: raw.system,
    })
}

const TURN_END: &str = "<|im_end|>\n";
const ASSISTANT: &str = "<|im_start|>assistant\n";
const USER: &str = "<|im_start|>user\n";

/// The prompt of a conversation over documents, in the chat template of the project's models
/// (ChatML): the system turn and the user header are the shared prefix, each document one
/// context, and the conversation's turns with the final question the question part. A single
/// question over documents gives exactly [`Prompt::chat`]'s prompt (what `ape run` builds), so
/// the server and the CLI share blocks. Earlier turns go after the documents, so that a
/// conversation's passages stay cached from turn to turn. Without documents the user's first
/// message follows the prefix as written; with them the last one is introduced as `Question:`.
/// Text from the client is encoded as text: control tokens written in it cannot open or close a
/// turn.
pub fn build_prompt(
    tok: &Tokenizer,
    default_system: &str,
    messages: &[Message],
    documents: &[Document],
    limits: &Limits,
) -> Result<Prompt, ApiError> {
    let system: Vec<&str> = messages
        .iter()
        .filter(|m| m.role == Role::System)
        .map(|m| m.content.as_str())
        .collect();
    let system = if system.is_empty() {
        default_system.to_string()
    } else {
        system.join("\n")
    };
    let turns: Vec<&Message> = messages.iter().filter(|m| m.role != Role::System).collect();
    let Some((last, earlier)) = turns.split_last() else {
        return Err(ApiError::invalid(
            Some("messages".into()),
            "no user message",
        ));
    };
    let passages: Vec<String> = documents.iter().map(Document::rendered).collect();
    let enc = |r: ape_attn::Result<Vec<u32>>| r.map_err(|e| ApiError::internal(e.to_string()));
    let mut prompt = if earlier.is_empty() && !documents.is_empty() {
        Prompt::chat(tok, &system, &passages, &last.content).map_err(ApiError::from)?
    } else {
        // Which turn is open: the user's (the prefix opens it), the assistant's (its header
        // written), or none (the last turn ended).
        #[derive(PartialEq)]
        enum Open {
            User,
            Assistant,
            None,
        }
        let mut question = Vec::new();
        let mut open = Open::User;
        let control = |q: &mut Vec<u32>, s: String| -> Result<(), ApiError> {
            q.extend(enc(tok.encode(&s))?);
            Ok(())
        };
        for m in earlier {
            let before = match (&open, m.role) {
                (Open::User, Role::User) => String::new(),
                (Open::Assistant, Role::User) => format!("{TURN_END}{USER}"),
                (Open::None, Role::User) => USER.to_string(),
                (Open::User, _) => format!("{TURN_END}{ASSISTANT}"),
                (Open::Assistant, _) => String::new(),
                (Open::None, _) => ASSISTANT.to_string(),
            };
            if !before.is_empty() {
                control(&mut question, before)?;
            }
            question.extend(enc(tok.encode_text(&m.content))?);
            if m.role == Role::User {
                control(&mut question, format!("{TURN_END}{ASSISTANT}"))?;
                open = Open::Assistant;
            } else {
                control(&mut question, TURN_END.to_string())?;
                open = Open::None;
            }
        }
        match open {
            Open::User => {}
            Open::Assistant => control(&mut question, format!("{TURN_END}{USER}"))?,
            Open::None => control(&mut question, USER.to_string())?,
        }
        let text = if documents.is_empty() {
            last.content.clone()
        } else {
            format!("Question: {}", last.content)
        };
        question.extend(enc(tok.encode_text(&text))?);
        question.extend(enc(tok.encode(&format!("{TURN_END}{ASSISTANT}")))?);
        Prompt {
            prefix: enc(tok.encode_start(&format!("<|im_start|>system\n{system}{TURN_END}{USER}")))?,
            contexts: passages
                .iter()
                .map(|p| enc(tok.encode_text(p)))
                .collect::<Result<_, _>>()?,
            question,
        }
    };
    for (i, c) in prompt.contexts.iter().enumerate() {
        if c.len() > limits.max_document_tokens {
            return Err(ApiError::invalid(
                Some(format!("documents[{i}]")),
                format!(
                    "document {i} has {} tokens, more than the server's limit of {}",
                    c.len(),
                    limits.max_document_tokens
                ),
            )
            .with_code("document_too_long"));
        }
    }
    prompt.contexts.shrink_to_fit();
    Ok(prompt)
}

/// Positions a prompt takes in `mode` before its first generated token: the contexts side by
/// side (APE, parallel) or one after another (sequential, Block-Attention).
pub fn prompt_positions(prompt: &Prompt, mode: Mode) -> usize {
    let lens = prompt.contexts.iter().map(Vec::len);
    prompt.question.len()
        + prompt.prefix.len()
        + match mode {
            Mode::Parallel | Mode::Ape(_) => lens.max().unwrap_or(0),
            Mode::Sequential | Mode::BlockAttention => lens.sum::<usize>(),
        }
}

/// Tokens a prompt holds in all (the `prompt_tokens` of the usage).
pub fn prompt_tokens(prompt: &Prompt) -> usize {
    prompt.prefix.len()
        + prompt.contexts.iter().map(Vec::len).sum::<usize>()
        + prompt.question.len()
}

/// Where a request's document blocks came from, counted per tier.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DocumentSources {
    /// Read from this server's memory.
    pub memory: usize,
    /// Read from the disk tier.
    pub disk: usize,
    /// Read from the shared Redis tier.
    pub redis: usize,
    /// Encoded for this request.
    pub encoded: usize,
}

/// The reply's `usage`, with the server's own counts under `ape`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Usage {
    /// Tokens of the prompt (the documents included).
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// The sum.
    pub total_tokens: usize,
    /// What this server adds.
    pub ape: UsageApe,
}

/// The server's share of the usage.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct UsageApe {
    /// The mode the request ran in.
    pub mode: String,
    /// Tokens run through the model for this request's prompt: documents not found in any tier,
    /// and the question.
    pub tokens_encoded: usize,
    /// Where each document's block came from.
    pub documents: DocumentSources,
    /// From the request's admission to its first token, milliseconds.
    pub time_to_first_token_ms: f64,
    /// Time spent waiting for a free slot, milliseconds.
    pub queue_ms: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<ChatRequest, ApiError> {
        parse_chat_request(body.as_bytes(), &Limits::default())
    }

    #[test]
    fn a_minimal_request_takes_openais_defaults() {
        let r = parse(r#"{"model":"x","messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        assert_eq!(r.messages.len(), 1);
        assert_eq!(r.sampling.temperature, 1.0);
        assert_eq!(r.sampling.top_p, 1.0);
        assert!(!r.stream && r.documents.is_empty() && r.mode.is_none());
    }

    #[test]
    fn documents_modes_and_stops_are_read() {
        let r = parse(
            r#"{"messages":[{"role":"system","content":"s"},{"role":"user","content":[{"type":"text","text":"q"}]}],
                "documents":[{"text":"a","title":"t"},"b"],"ape":{"mode":"ape","temperature":0.5},
                "stop":"END","stream":true,"stream_options":{"include_usage":true},"seed":-1}"#,
        )
        .unwrap();
        assert_eq!(r.documents.len(), 2);
        assert_eq!(r.documents[0].rendered(), "t\na\n");
        assert_eq!(r.stop, vec!["END".to_string()]);
        assert!(r.include_usage);
        assert_eq!(r.sampling.seed, Some(u64::MAX));
        let Some(ModeChoice::Ape {
            temperature: Some(t),
            scale: None,
            ..
        }) = r.mode
        else {
            panic!("{:?}", r.mode)
        };
        assert_eq!(t, 0.5);
    }

    #[test]
    fn bad_requests_name_their_field() {
        for (body, param) in [
            (r#"{"messages":[]}"#, "messages"),
            (
                r#"{"messages":[{"role":"tool","content":"x"}]}"#,
                "messages[0].role",
            ),
            (
                r#"{"messages":[{"role":"assistant","content":"x"}]}"#,
                "messages",
            ),
            (
                r#"{"messages":[{"role":"user","content":" "}]}"#,
                "messages",
            ),
            (
                r#"{"messages":[{"role":"user","content":"q"}],"max_tokens":0}"#,
                "max_tokens",
            ),
            (
                r#"{"messages":[{"role":"user","content":"q"}],"temperature":3}"#,
                "temperature",
            ),
            (
                r#"{"messages":[{"role":"user","content":"q"}],"top_p":0}"#,
                "top_p",
            ),
            (r#"{"messages":[{"role":"user","content":"q"}],"n":2}"#, "n"),
            (
                r#"{"messages":[{"role":"user","content":"q"}],"documents":[{"text":""}]}"#,
                "documents[0].text",
            ),
            (
                r#"{"messages":[{"role":"user","content":"q"}],"ape":{"mode":"fast"}}"#,
                "ape.mode",
            ),
            (
                r#"{"messages":[{"role":"user","content":"q"}],"ape":{"temperature":-1}}"#,
                "ape.temperature",
            ),
            (
                r#"{"messages":[{"role":"user","content":"q"}],"ape":{"scale":0}}"#,
                "ape.scale",
            ),
            (
                r#"{"messages":[{"role":"user","content":"q"}],"ape":{"mode":"sequential","scale":1}}"#,
                "ape.mode",
            ),
            (
                r#"{"messages":[{"role":"user","content":"q"}],"stop":["a","b","c","d","e"]}"#,
                "stop",
            ),
        ] {
            let e = parse(body).unwrap_err();
            assert_eq!(e.status, 400, "{body}");
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {e}");
        }
        for body in [
            "",
            "{",
            "[]",
            r#"{"messages":"hi"}"#,
            r#"{"messages":[{"role":"user","content":5}]}"#,
        ] {
            let e = parse(body).unwrap_err();
            assert_eq!((e.status, e.kind), (400, "invalid_request_error"), "{body}");
        }
        // A T that overflows f32 is refused, not turned into infinity.
        let e =
            parse(r#"{"messages":[{"role":"user","content":"q"}],"ape":{"temperature":1e300}}"#)
                .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("ape.temperature"));
    }

    #[test]
    fn the_mode_falls_back_to_the_servers() {
        let server = Mode::Ape(ApeParams::new(0.8, 0.7).unwrap());
        let m = ModeChoice::Ape {
            temperature: Some(0.5),
            scale: None,
            scaled_mass: false,
        }
        .resolve(server)
        .unwrap();
        let Mode::Ape(p) = m else { panic!() };
        assert_eq!((p.temperature(), p.scale()), (0.5, 0.7));
    }
}
