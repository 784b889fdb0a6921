//! The server's Prometheus metrics (`GET /metrics`).

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Every metric the server exports, registered once.
pub(crate) struct Metrics {
    registry: Registry,
    /// HTTP requests answered, by endpoint and status code.
    pub(crate) requests: IntCounterVec,
    /// Requests waiting for a slot.
    pub(crate) queue_depth: IntGauge,
    /// Sequences being generated.
    pub(crate) active: IntGauge,
    /// From admission to the first token.
    pub(crate) ttft: Histogram,
    /// Between two tokens of one answer.
    pub(crate) token_latency: Histogram,
    /// Time a request waited for a slot.
    pub(crate) queue_wait: Histogram,
    /// Rows in each batched decode step.
    pub(crate) batch_rows: Histogram,
    /// Prompt tokens received, and tokens actually run through the model for prompts.
    pub(crate) prompt_tokens: IntCounter,
    pub(crate) encoded_tokens: IntCounter,
    /// Tokens generated.
    pub(crate) completion_tokens: IntCounter,
    /// Document blocks read, by where they came from (memory, disk, redis, encoded).
    pub(crate) blocks: IntCounterVec,
    /// Bytes of K/V those blocks hold, by where they came from.
    pub(crate) block_bytes: IntCounterVec,
    /// Bytes and blocks each tier holds now.
    pub(crate) tier_bytes: IntGaugeVec,
    pub(crate) tier_blocks: IntGaugeVec,
}

fn buckets(lo: f64, factor: f64, n: usize) -> Vec<f64> {
    prometheus::exponential_buckets(lo, factor, n).unwrap_or_default()
}

impl Metrics {
    pub(crate) fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some("ape".into()), None)?;
        let r = &registry;
        fn reg<T: prometheus::core::Collector + Clone + 'static>(
            r: &Registry,
            m: T,
        ) -> Result<T, prometheus::Error> {
            r.register(Box::new(m.clone()))?;
            Ok(m)
        }
        Ok(Self {
            requests: reg(
                r,
                IntCounterVec::new(
                    Opts::new("http_requests_total", "HTTP requests answered"),
                    &["endpoint", "status"],
                )?,
            )?,
            queue_depth: reg(
                r,
                IntGauge::new("queue_depth", "Requests waiting for a generation slot")?,
            )?,
            active: reg(
                r,
                IntGauge::new("active_sequences", "Sequences being generated")?,
            )?,
            ttft: reg(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "time_to_first_token_seconds",
                        "From a request's admission to its first token",
                    )
                    .buckets(buckets(0.005, 2.0, 14)),
                )?,
            )?,
            token_latency: reg(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "inter_token_latency_seconds",
                        "Between two tokens of one answer",
                    )
                    .buckets(buckets(0.001, 2.0, 14)),
                )?,
            )?,
            queue_wait: reg(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "queue_wait_seconds",
                        "Time a request waited for a generation slot",
                    )
                    .buckets(buckets(0.001, 2.0, 16)),
                )?,
            )?,
            batch_rows: reg(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "decode_batch_rows",
                        "Sequences in each batched decode step",
                    )
                    .buckets(vec![1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0, 64.0]),
                )?,
            )?,
            prompt_tokens: reg(
                r,
                IntCounter::new("prompt_tokens_total", "Prompt tokens received")?,
            )?,
            encoded_tokens: reg(
                r,
                IntCounter::new(
                    "prompt_tokens_encoded_total",
                    "Prompt tokens run through the model (the rest were read from the block store)",
                )?,
            )?,
            completion_tokens: reg(
                r,
                IntCounter::new("completion_tokens_total", "Tokens generated")?,
            )?,
            blocks: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "document_blocks_total",
                        "Document blocks read, by where they came from",
                    ),
                    &["source"],
                )?,
            )?,
            block_bytes: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "document_block_bytes_total",
                        "K/V bytes of the document blocks read, by where they came from",
                    ),
                    &["source"],
                )?,
            )?,
            tier_bytes: reg(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "store_bytes",
                        "Bytes of K/V each tier of the block store holds",
                    ),
                    &["tier"],
                )?,
            )?,
            tier_blocks: reg(
                r,
                IntGaugeVec::new(
                    Opts::new("store_blocks", "Blocks each tier of the block store holds"),
                    &["tier"],
                )?,
            )?,
            registry,
        })
    }

    /// The text exposition format.
    pub(crate) fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}
