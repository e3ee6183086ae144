//! A real browser against a real `khub serve`: a page on an allowed origin
//! creates a channel (a CORS-preflighted `POST`), lists its devices (a
//! preflighted `GET` with `Authorization`) and says hello over `/ws`; the same
//! page served from another origin gets nothing. Needs Debian's `chromium`
//! (headless); skipped without it unless `KHUB_REQUIRE_BROWSER=1` (as in CI,
//! which installs it).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::net::Member;
use khub::ids::ChannelId;

const CHROMIUM: &str = "chromium";

/// Kills a child process when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Serves `page` at `/` on `listener` and sends every `/report?…` query to
/// `reports`, until the process ends.
fn serve_page(listener: TcpListener, page: String, reports: mpsc::Sender<String>) {
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut stream = stream;
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
            // Skip the headers.
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).unwrap_or(0) <= 2 {
                    break;
                }
            }
            let body = if let Some(query) = path.strip_prefix("/report?") {
                let _ = reports.send(query.to_owned());
                String::new()
            } else if path == "/" {
                page.clone()
            } else {
                String::new()
            };
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
}

/// The test page: what it tries against the relay, reported back as JSON.
fn page(relay: SocketAddr, member: &Member) -> String {
    let create = serde_json::json!({
        "channel": member.channel.to_string(),
        "device": member.device.to_string(),
        "token_hash": khub::protocol::b64::encode(member.token.hash().0),
    });
    format!(
        r#"<!doctype html><meta charset="utf-8"><script>
const relay = "http://{relay}";
async function attempt(f) {{ try {{ return await f(); }} catch (e) {{ return "blocked: " + e.name; }} }}
async function run() {{
  const out = {{}};
  out.create = await attempt(async () => (await fetch(relay + "/channels", {{
    method: "POST", headers: {{ "content-type": "application/json" }}, body: {create:?} }})).status);
  out.devices = await attempt(async () => {{
    const r = await fetch(relay + "/channels/{channel}/devices", {{ headers: {{ "authorization": {auth:?} }} }});
    return r.status + " " + (await r.text()).length;
  }});
  out.ws = await new Promise((done) => {{
    const ws = new WebSocket("ws://{relay}/ws");
    ws.onopen = () => ws.send({hello:?});
    ws.onmessage = (m) => done(JSON.parse(m.data).type);
    ws.onerror = () => done("error");
    setTimeout(() => done("timeout"), 8000);
  }});
  await fetch("/report?" + encodeURIComponent(JSON.stringify(out)));
}}
run();
</script>"#,
        create = create.to_string(),
        channel = member.channel,
        auth = member.auth(),
        hello = member.hello(0),
    )
}

/// Opens `url` in headless Chromium and waits for the page's report.
fn visit(
    url: &str,
    reports: &mpsc::Receiver<String>,
    profile: &std::path::Path,
) -> serde_json::Value {
    let _browser = Killed(
        Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--no-first-run",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(url)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromium starts"),
    );
    let report = reports
        .recv_timeout(Duration::from_secs(60))
        .expect("the page reported within 60 s");
    let decoded = percent_decode(&report);
    serde_json::from_str(&decoded).unwrap_or_else(|e| panic!("report {decoded:?}: {e}"))
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&text[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

#[test]
fn a_page_on_an_allowed_origin_uses_the_relay_and_another_origin_gets_nothing() {
    let present = Command::new(CHROMIUM)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !present {
        assert!(
            std::env::var_os("KHUB_REQUIRE_BROWSER").is_none(),
            "KHUB_REQUIRE_BROWSER is set but chromium is missing: apt-get install chromium"
        );
        eprintln!("skipped: needs Debian's chromium");
        return;
    }
    let allowed_site = TcpListener::bind("127.0.0.1:0").unwrap();
    let other_site = TcpListener::bind("127.0.0.1:0").unwrap();
    let allowed_origin = format!("http://{}/", allowed_site.local_addr().unwrap());
    let mut relay = Command::new(env!("CARGO_BIN_EXE_khub"))
        .args([
            "serve",
            "--memory",
            "--listen",
            "127.0.0.1:0",
            "--allowed-origin",
        ])
        .arg(&allowed_origin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let line = common::first_line(relay.stdout.take().unwrap());
    let relay_addr: SocketAddr = line
        .split_whitespace()
        .find_map(|w| w.trim_end_matches(',').parse().ok())
        .unwrap();
    let mut relay_log = relay.stderr.take().unwrap();
    let relay = Killed(relay);
    let profile = common::tempdir("chromium");

    let (reports, received) = mpsc::channel();
    let alice = Member::new(ChannelId::random(&mut khub::crypto::os_rng()));
    serve_page(allowed_site, page(relay_addr, &alice), reports.clone());
    let started = Instant::now();
    let seen = visit(&allowed_origin, &received, &profile.join("allowed"));
    assert_eq!(
        seen["create"], 201,
        "the preflighted POST created the channel: {seen}"
    );
    let devices = seen["devices"].as_str().unwrap_or_default();
    assert!(
        devices.starts_with("200 "),
        "the preflighted GET with authorization: {seen}"
    );
    assert_eq!(seen["ws"], "ready", "the WebSocket hello: {seen}");

    let mallory = Member::new(ChannelId::random(&mut khub::crypto::os_rng()));
    let other_origin = format!("http://{}/", other_site.local_addr().unwrap());
    serve_page(other_site, page(relay_addr, &mallory), reports);
    let refused = visit(&other_origin, &received, &profile.join("other"));
    assert!(
        refused["create"]
            .as_str()
            .is_some_and(|s| s.starts_with("blocked")),
        "another origin cannot create a channel: {refused}"
    );
    assert!(
        refused["devices"]
            .as_str()
            .is_some_and(|s| s.starts_with("blocked")),
        "{refused}"
    );
    assert_eq!(
        refused["ws"], "error",
        "another origin cannot open /ws: {refused}"
    );
    let took = started.elapsed();

    // The relay says what it refused, and stored nothing for the other page.
    drop(relay);
    let mut log = String::new();
    let _ = relay_log.read_to_string(&mut log);
    assert!(
        log.contains("refused a browser origin that is not allowed")
            && log.contains(other_origin.trim_end_matches('/')),
        "the refusal is logged: {log}"
    );
    println!("both visits took {took:?}");
}
