//! `ape serve` end to end: the real server process on a free loopback port, the default model on
//! the CPU, a real HTTP client. What a RAG application sees: answers streamed and not, documents
//! encoded once and read back in another order, every bad input answered with a clear error, a
//! client that leaves, the API key, concurrent requests answered as they are alone, and memory
//! that does not grow under load.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A running `ape serve`, stopped with SIGTERM when dropped.
struct Server {
    child: Child,
    base: String,
    stderr: Arc<Mutex<String>>,
}

/// Held by each test: one server runs at a time, since each takes the machine's cores, and the
/// deadlines the tests wait on assume it has them.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static ONE: Mutex<()> = Mutex::new(());
    ONE.lock().unwrap_or_else(|e| e.into_inner())
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        Self::try_start(extra).unwrap_or_else(|log| panic!("ape serve did not start:\n{log}"))
    }

    /// Starts the server on a free port; the error is what it printed.
    fn try_start(extra: &[&str]) -> Result<Server, String> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ape"))
            .args(["serve", "--device", "cpu", "--no-store"])
            .args(if extra.contains(&"--addr") {
                &[][..]
            } else {
                &["--addr", "127.0.0.1:0"][..]
            })
            .args(extra)
            .env("APE_MODEL", common::default_model())
            .env_remove("APE_API_KEY")
            .env_remove("APE_STORE")
            .env_remove("APE_REDIS")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ape serve");
        let mut lines = BufReader::new(child.stderr.take().expect("stderr"));
        let log = Arc::new(Mutex::new(String::new()));
        let deadline = Instant::now() + Duration::from_secs(120);
        let base = loop {
            let mut line = String::new();
            if lines.read_line(&mut line).unwrap_or(0) == 0 || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(log.lock().unwrap().clone());
            }
            log.lock().unwrap().push_str(&line);
            if let Some(rest) = line.split("listening on ").nth(1) {
                break rest
                    .split_whitespace()
                    .next()
                    .expect("an address")
                    .to_string();
            }
        };
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut rest = String::new();
            let _ = lines.read_to_string(&mut rest);
            sink.lock().unwrap().push_str(&rest);
        });
        Ok(Server {
            child,
            base,
            stderr: log,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = client()
            .post(self.url(path))
            .json(body)
            .send()
            .expect("request");
        let status = r.status().as_u16();
        (status, r.json().expect("a JSON reply"))
    }

    fn chat(&self, body: &Value) -> Value {
        let (status, v) = self.post("/v1/chat/completions", body);
        assert_eq!(status, 200, "{v}");
        v
    }

    /// A streamed answer: its text, the finish reason and the usage chunk.
    fn chat_stream(&self, body: &Value) -> (String, String, Value) {
        let mut body = body.clone();
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let r = client()
            .post(self.url("/v1/chat/completions"))
            .json(&body)
            .send()
            .expect("request");
        assert_eq!(r.status().as_u16(), 200);
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        let text = r.text().expect("the stream");
        let mut answer = String::new();
        let (mut finish, mut usage, mut done) = (String::new(), Value::Null, false);
        for data in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let v: Value = serde_json::from_str(data).expect("a JSON chunk");
            assert_eq!(v["object"], "chat.completion.chunk");
            if let Some(c) = v["choices"].get(0) {
                answer.push_str(c["delta"]["content"].as_str().unwrap_or(""));
                if let Some(f) = c["finish_reason"].as_str() {
                    finish = f.to_string();
                }
            }
            if !v["usage"].is_null() {
                usage = v["usage"].clone();
            }
        }
        assert!(done, "the stream ends with [DONE]: {text}");
        (answer, finish, usage)
    }

    fn metric(&self, name: &str) -> f64 {
        let text = client()
            .get(self.url("/metrics"))
            .send()
            .expect("metrics")
            .text()
            .expect("metrics text");
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("the server's /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("VmRSS")
    }

    /// SIGTERM, then the exit status and everything it printed.
    fn stop(mut self) -> (std::process::ExitStatus, String) {
        let status = self.terminate();
        (status, self.stderr.lock().unwrap().clone())
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return self.child.wait().expect("wait");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
        }
    }
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .expect("client")
}

/// Fictional passages (the model cannot answer from memory) and questions over them.
fn passages() -> Vec<String> {
    let names = [
        "Mira Kovac",
        "Tomas Brell",
        "Ilse Varga",
        "Oren Maddix",
        "Kasia Lund",
        "Piet Arno",
    ];
    let towns = [
        "Esterhill",
        "Marrow Bay",
        "Quillfen",
        "Dunmere",
        "Harrowgate",
        "Salt Cove",
    ];
    let things = [
        "bakery",
        "clock shop",
        "ferry line",
        "printing press",
        "tea house",
        "boatyard",
    ];
    (0..6)
        .map(|i| {
            format!(
                "The {} of {} was founded by {} in {}. It is known across the region for its \
                 careful work, and {} still visits it every spring.",
                things[i],
                towns[i],
                names[i],
                1901 + 7 * i,
                names[(i + 1) % 6]
            )
        })
        .collect()
}

fn request(docs: &[&String], question: &str, max_tokens: usize) -> Value {
    json!({
        "model": "any",
        "messages": [{"role": "user", "content": question}],
        "documents": docs.iter().map(|d| json!({"text": d})).collect::<Vec<_>>(),
        "temperature": 0,
        "max_tokens": max_tokens,
    })
}

fn answer(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .expect("an answer")
        .to_string()
}

#[test]
fn answers_streamed_and_not_agree_and_report_usage() {
    let _serial = one_at_a_time();
    let s = Server::start(&[]);
    let health: Value = client()
        .get(s.url("/health"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(health["status"], "ok");
    let models: Value = client()
        .get(s.url("/v1/models"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(models["data"][0]["object"], "model");
    let p = passages();
    let body = request(
        &[&p[0], &p[1], &p[2]],
        "Who founded the bakery of Esterhill?",
        24,
    );
    let v = s.chat(&body);
    assert_eq!(v["object"], "chat.completion");
    let text = answer(&v);
    assert!(!text.is_empty());
    let u = &v["usage"];
    let (prompt, completion) = (
        u["prompt_tokens"].as_u64().unwrap(),
        u["completion_tokens"].as_u64().unwrap(),
    );
    assert!((1..=24).contains(&completion), "{u}");
    assert_eq!(u["total_tokens"].as_u64().unwrap(), prompt + completion);
    assert_eq!(u["ape"]["mode"], "ape");
    assert_eq!(u["ape"]["documents"]["encoded"], 3, "{u}");
    assert!(u["ape"]["time_to_first_token_ms"].as_f64().unwrap() > 0.0);
    let reason = v["choices"][0]["finish_reason"].as_str().unwrap();
    assert!(
        reason == "stop" || (reason == "length" && completion == 24),
        "{v}"
    );

    let (streamed, finish, usage) = s.chat_stream(&body);
    assert_eq!(streamed, text, "the stream's text is the reply's");
    assert_eq!(finish, reason);
    assert_eq!(usage["completion_tokens"], u["completion_tokens"]);
    // The second time every document came from memory.
    assert_eq!(usage["ape"]["documents"]["memory"], 3, "{usage}");

    // A chat request without documents is answered too, and a stop sequence ends the text
    // before it.
    let plain = s.chat(&json!({
        "messages": [{"role": "system", "content": "You count."}, {"role": "user", "content": "Count from 1 to 20, separated by commas."}],
        "temperature": 0, "max_tokens": 40,
    }));
    let full = answer(&plain);
    if let Some(cut) = full.find('5') {
        let stopped = s.chat(&json!({
            "messages": [{"role": "system", "content": "You count."}, {"role": "user", "content": "Count from 1 to 20, separated by commas."}],
            "temperature": 0, "max_tokens": 40, "stop": ["5"],
        }));
        assert_eq!(
            answer(&stopped),
            full[..cut],
            "the text up to the stop sequence"
        );
        assert_eq!(stopped["choices"][0]["finish_reason"], "stop");
    }
    // Sampling with a seed is repeatable.
    let mut sampled = body.clone();
    sampled["temperature"] = json!(0.9);
    sampled["seed"] = json!(42);
    sampled["top_p"] = json!(0.9);
    assert_eq!(answer(&s.chat(&sampled)), answer(&s.chat(&sampled)));
    let (status, log) = s.stop();
    assert!(status.success(), "SIGTERM ends it cleanly: {status}\n{log}");
}

#[test]
fn documents_are_encoded_once_and_reused_in_any_order() {
    let _serial = one_at_a_time();
    let s = Server::start(&[]);
    let p = passages();
    let first = s.chat(&request(
        &[&p[0], &p[1], &p[2], &p[3]],
        "Who founded the clock shop?",
        8,
    ));
    assert_eq!(first["usage"]["ape"]["documents"]["encoded"], 4);
    // Another question over a subset in another order: only the question is encoded.
    let second = s.chat(&request(&[&p[3], &p[1]], "Where is the ferry line?", 8));
    let u = &second["usage"];
    assert_eq!(u["ape"]["documents"]["memory"], 2, "{u}");
    assert_eq!(u["ape"]["documents"]["encoded"], 0, "{u}");
    let prompt = u["prompt_tokens"].as_u64().unwrap();
    let encoded = u["ape"]["tokens_encoded"].as_u64().unwrap();
    assert!(
        encoded < 30 && encoded + 40 < prompt,
        "only the question is encoded: {u}"
    );
    // Passages sent ahead of the questions.
    let (status, v) = s.post(
        "/v1/documents",
        &json!({"documents": [{"text": p[4]}, {"text": p[5], "title": "Boats"}]}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["data"][0]["source"], "encoded");
    let third = s.chat(&json!({
        "messages": [{"role": "user", "content": "Who founded the boatyard?"}],
        "documents": [{"text": p[5], "title": "Boats"}, p[4]],
        "temperature": 0, "max_tokens": 4,
    }));
    assert_eq!(third["usage"]["ape"]["documents"]["memory"], 2, "{third}");
    // Block-Attention's blocks are its own: encoded alone, then read back.
    let mut block = request(&[&p[0], &p[1]], "Who founded the bakery?", 4);
    block["ape"] = json!({"mode": "block-attention"});
    assert_eq!(s.chat(&block)["usage"]["ape"]["documents"]["encoded"], 2);
    block["documents"] = json!([p[1], p[0]]);
    assert_eq!(s.chat(&block)["usage"]["ape"]["documents"]["memory"], 2);
    assert!(s.metric("ape_document_blocks_total{source=\"memory\"}") >= 6.0);
}

/// Every bad input gets an OpenAI-style error with the right status, and the server goes on.
#[test]
fn bad_input_gets_a_clear_error() {
    let _serial = one_at_a_time();
    let s = Server::start(&["--max-body", "64K", "--max-document-tokens", "600"]);
    let p = passages();
    let q = |extra: Value| {
        let mut b = json!({"messages": [{"role": "user", "content": "Who?"}], "max_tokens": 4});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let long_doc = "The river ran past the old mill and the bakery. ".repeat(80);
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "malformed JSON",
            b"{\"messages\": [".to_vec(),
            400,
            "not valid JSON",
        ),
        ("no body", Vec::new(), 400, "empty"),
        (
            "wrong type",
            br#"{"messages": "hello"}"#.to_vec(),
            400,
            "does not match",
        ),
        (
            "unknown mode",
            q(json!({"ape": {"mode": "fastest"}}))
                .to_string()
                .into_bytes(),
            400,
            "unknown mode",
        ),
        (
            "T not positive",
            q(json!({"ape": {"temperature": 0}}))
                .to_string()
                .into_bytes(),
            400,
            "ape.temperature",
        ),
        (
            "S too large for f32",
            q(json!({"ape": {"scale": 1e300}})).to_string().into_bytes(),
            400,
            "ape.scale",
        ),
        (
            "S not a number",
            br#"{"messages":[{"role":"user","content":"q"}],"ape":{"scale":"big"}}"#.to_vec(),
            400,
            "does not match",
        ),
        (
            "empty document",
            q(json!({"documents": [{"text": "  "}]}))
                .to_string()
                .into_bytes(),
            400,
            "document 0 is empty",
        ),
        (
            "oversized document",
            q(json!({"documents": [long_doc]})).to_string().into_bytes(),
            400,
            "more than the server's limit of 600",
        ),
        (
            "prompt past the window",
            q(json!({"documents": vec![p[0].repeat(9); 30], "ape": {"mode": "sequential"}}))
                .to_string()
                .into_bytes(),
            400,
            "window",
        ),
        (
            "max_tokens past the window",
            q(json!({"max_tokens": 9000})).to_string().into_bytes(),
            400,
            "does not fit",
        ),
        (
            "max_tokens 0",
            q(json!({"max_tokens": 0})).to_string().into_bytes(),
            400,
            "at least 1",
        ),
        (
            "last message not the user's",
            br#"{"messages":[{"role":"assistant","content":"x"}]}"#.to_vec(),
            400,
            "must be the user's",
        ),
        (
            "body over the limit",
            q(json!({"documents": [p[0].repeat(600)]}))
                .to_string()
                .into_bytes(),
            413,
            "larger than",
        ),
    ];
    for (what, body, status, needle) in cases {
        let r = client()
            .post(s.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .expect("request");
        assert_eq!(r.status().as_u16(), status, "{what}");
        let v: Value = r.json().unwrap_or_else(|e| panic!("{what}: not JSON: {e}"));
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "{what}: {v}");
        assert!(v["error"]["type"].is_string(), "{what}: {v}");
    }
    let window_case = client()
        .post(s.url("/v1/chat/completions"))
        .json(&q(json!({"max_tokens": 9000})))
        .send()
        .unwrap()
        .json::<Value>()
        .unwrap();
    assert_eq!(window_case["error"]["code"], "context_length_exceeded");
    let nowhere = client().get(s.url("/v1/nowhere")).send().unwrap();
    assert_eq!(nowhere.status().as_u16(), 404);
    // Still serving.
    s.chat(&request(&[&p[0]], "Who founded the bakery?", 2));
    assert!(
        s.metric("ape_http_requests_total{endpoint=\"/v1/chat/completions\",status=\"400\"}")
            >= 12.0
    );
}

#[test]
fn a_full_queue_answers_503_with_retry_after() {
    let _serial = one_at_a_time();
    let s = Arc::new(Server::start(&["--max-active", "1", "--max-queue", "1"]));
    let p = passages();
    // Long sampled answers keep the one slot busy.
    let busy = json!({
        "messages": [{"role": "user", "content": "Write a long story about the bakery."}],
        "documents": [p[0]], "temperature": 2.0, "seed": 3, "max_tokens": 400,
    });
    let mut handles = Vec::new();
    for _ in 0..4 {
        let (s, busy) = (s.clone(), busy.clone());
        handles.push(std::thread::spawn(move || {
            let r = client()
                .post(s.url("/v1/chat/completions"))
                .json(&busy)
                .send()
                .expect("request");
            let retry = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            (r.status().as_u16(), retry)
        }));
        std::thread::sleep(Duration::from_millis(300));
    }
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let refused: Vec<_> = results.iter().filter(|r| r.0 == 503).collect();
    assert!(
        !refused.is_empty(),
        "one slot and a queue of one: {results:?}"
    );
    assert!(
        refused.iter().all(|r| r.1.as_deref() == Some("1")),
        "{results:?}"
    );
    assert!(
        results.iter().all(|r| r.0 == 200 || r.0 == 503),
        "{results:?}"
    );
}

#[test]
fn a_client_that_leaves_ends_its_sequence() {
    let _serial = one_at_a_time();
    let s = Server::start(&[]);
    let p = passages();
    let body = json!({
        "messages": [{"role": "user", "content": "Tell me everything about these places, at length."}],
        "documents": [p[0], p[1]], "temperature": 1.8, "seed": 11, "max_tokens": 4000,
        "stream": true,
    });
    let mut r = client()
        .post(s.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .expect("request");
    let mut buf = [0u8; 2048];
    let mut got = 0;
    while got < 3 {
        let n = r.read(&mut buf).expect("stream");
        assert!(n > 0, "the stream ended early");
        got += String::from_utf8_lossy(&buf[..n]).matches("data: ").count();
    }
    assert_eq!(s.metric("ape_active_sequences"), 1.0);
    drop(r);
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.metric("ape_active_sequences") != 0.0 {
        assert!(
            Instant::now() < deadline,
            "the sequence still runs after its client left"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let generated = s.metric("ape_completion_tokens_total");
    assert!(
        generated < 3000.0,
        "{generated} tokens: it stopped when the client left"
    );
    // Its blocks are released (not pinned): the server goes on serving.
    s.chat(&request(&[&p[1], &p[0]], "Who founded the bakery?", 2));
}

#[test]
fn the_api_key_is_required_and_public_addresses_need_one() {
    let _serial = one_at_a_time();
    let s = Server::start(&["--api-key", "s3cret"]);
    let chat = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
    let send = |key: Option<&str>| {
        let mut r = client().post(s.url("/v1/chat/completions")).json(&chat);
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        r.send().expect("request").status().as_u16()
    };
    assert_eq!(send(None), 401);
    assert_eq!(send(Some("wrong")), 401);
    assert_eq!(send(Some("s3cret")), 200);
    assert_eq!(
        client()
            .get(s.url("/v1/models"))
            .send()
            .unwrap()
            .status()
            .as_u16(),
        401
    );
    assert_eq!(
        client()
            .get(s.url("/metrics"))
            .send()
            .unwrap()
            .status()
            .as_u16(),
        401
    );
    assert_eq!(
        client()
            .get(s.url("/health"))
            .send()
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    drop(s);
    let refused = Server::try_start(&["--addr", "0.0.0.0:0"])
        .err()
        .expect("refused");
    assert!(refused.contains("not a loopback address"), "{refused}");
}

/// A RAG workload from 8 concurrent clients: no errors, every greedy answer the one the same
/// request gets alone, and the server's memory flat from round to round.
#[test]
fn concurrent_clients_get_the_answers_of_single_requests() {
    let _serial = one_at_a_time();
    let s = Arc::new(Server::start(&[]));
    let p = passages();
    let questions = [
        "Who founded the bakery?",
        "When was the ferry line founded?",
        "Who visits the tea house every spring?",
        "Where is the boatyard?",
        "What is the clock shop known for?",
    ];
    // 120 requests: 3 of the 6 passages in a seeded order each, a question.
    let mut rng = 0x9e37_79b9_u64;
    let mut next = |n: usize| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % n as u64) as usize
    };
    let bodies: Vec<Value> = (0..120)
        .map(|_| {
            let mut idx: Vec<usize> = (0..6).collect();
            for i in (1..6).rev() {
                idx.swap(i, next(i + 1));
            }
            let docs: Vec<&String> = idx[..3].iter().map(|&i| &p[i]).collect();
            request(&docs, questions[next(questions.len())], 12)
        })
        .collect();
    let unique: std::collections::BTreeMap<String, Value> =
        bodies.iter().map(|b| (b.to_string(), b.clone())).collect();
    let alone: std::collections::HashMap<String, String> = unique
        .iter()
        .map(|(k, b)| (k.clone(), answer(&s.chat(b))))
        .collect();
    let mut rss = Vec::new();
    for round in 0..3 {
        let work = Arc::new(Mutex::new(bodies.clone()));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let (s, work) = (s.clone(), work.clone());
                std::thread::spawn(move || {
                    let mut out = Vec::new();
                    loop {
                        // Not in the loop's condition: its guard would live through the request.
                        let next = work.lock().unwrap().pop();
                        let Some(b) = next else { break };
                        let (status, v) = s.post("/v1/chat/completions", &b);
                        out.push((b.to_string(), status, v));
                    }
                    out
                })
            })
            .collect();
        let results: Vec<_> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        assert_eq!(results.len(), bodies.len());
        let mut differ = Vec::new();
        for (key, status, v) in &results {
            assert_eq!(*status, 200, "round {round}: {v}");
            if answer(v) != alone[key] {
                differ.push((alone[key].clone(), answer(v)));
            }
        }
        for (a, b) in &differ {
            println!("round {round}: alone {a:?} vs in a batch {b:?}");
        }
        assert!(
            differ.is_empty(),
            "{} answers differ in a batch",
            differ.len()
        );
        rss.push(s.rss_kib());
    }
    let batched = s.metric("ape_decode_batch_rows_sum") / s.metric("ape_decode_batch_rows_count");
    println!("RSS per round (KiB): {rss:?}; mean decode batch {batched:.2} rows");
    assert!(
        batched > 1.5,
        "concurrent requests decode together: {batched:.2} rows per step"
    );
    assert!(
        rss[2] <= rss[0] + rss[0] / 10 + 16 * 1024,
        "memory grows from round to round: {rss:?} KiB"
    );
}

/// A long prompt is prefilled in pieces with the running answers' decode steps between them: a
/// stream running meanwhile is never held up for more than a fraction of that prefill.
#[test]
fn a_long_prefill_does_not_stall_a_running_answer() {
    let _serial = one_at_a_time();
    // A short grace: the server is stopped below with the story still running.
    let s = Arc::new(Server::start(&[
        "--prefill-chunk",
        "64",
        "--shutdown-grace",
        "1",
    ]));
    let body = json!({
        "messages": [{"role": "user", "content": "Tell me a very long story about a river town."}],
        "temperature": 1.8, "seed": 5, "max_tokens": 3000, "stream": true,
    });
    let mut r = client()
        .post(s.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .expect("request");
    // Read the stream on its own thread, noting when each piece arrives.
    let arrivals = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let seen = arrivals.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.lock().unwrap().push(Instant::now());
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while arrivals.lock().unwrap().len() < 5 {
        assert!(Instant::now() < deadline, "the story did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A new request with 3 long documents (about 3 x 500 tokens, encoded now).
    let long: Vec<String> = (0..3)
        .map(|i| format!("Chapter {i}. ") + &passages()[i].repeat(14))
        .collect();
    let start = Instant::now();
    let v = s.chat(&json!({
        "messages": [{"role": "user", "content": "Who founded the bakery?"}],
        "documents": long, "temperature": 0, "max_tokens": 1,
    }));
    let prefill = start.elapsed();
    let ttft = v["usage"]["ape"]["time_to_first_token_ms"]
        .as_f64()
        .unwrap()
        / 1e3;
    assert!(
        v["usage"]["ape"]["tokens_encoded"].as_u64().unwrap() > 1200,
        "{v}"
    );
    let gaps: Vec<Duration> = {
        let a = arrivals.lock().unwrap();
        a.windows(2)
            .filter(|w| w[1] > start && w[0] < start + prefill)
            .map(|w| w[1] - w[0])
            .collect()
    };
    let worst = gaps.iter().max().copied().unwrap_or_default();
    println!(
        "prefill of {} tokens: {:.2} s (ttft {ttft:.2} s); the running stream got {} pieces meanwhile, longest gap {:.3} s",
        v["usage"]["ape"]["tokens_encoded"],
        prefill.as_secs_f64(),
        gaps.len(),
        worst.as_secs_f64()
    );
    assert!(
        gaps.len() >= 10,
        "the running answer went on during the prefill: {gaps:?}"
    );
    assert!(
        worst.as_secs_f64() < 0.25 * ttft,
        "a gap of {worst:?} during a prefill of {ttft:.2} s"
    );
    // Past the grace period the running story ends with an error event, and the server exits.
    let s = Arc::into_inner(s).expect("the only handle");
    let (status, log) = s.stop();
    assert!(status.success(), "{status}\n{log}");
    let _ = reader.join();
}
