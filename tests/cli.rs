//! The `khub` binary as other tools use it.

mod common;

use std::process::Command;

#[test]
fn khub_vectors_writes_the_published_files() {
    let out = std::env::temp_dir().join(format!("khub-vectors-{}", std::process::id()));
    let status = Command::new(env!("CARGO_BIN_EXE_khub"))
        .args(["vectors", "--out"])
        .arg(&out)
        .status()
        .expect("khub runs");
    assert!(status.success());
    for name in khub::vectors::FILES {
        let written = std::fs::read(out.join(name)).expect("file written");
        let published = std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/data")
                .join(name),
        )
        .expect("published file");
        assert_eq!(written, published, "{name}");
    }
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn unknown_commands_fail_with_usage() {
    let output = Command::new(env!("CARGO_BIN_EXE_khub"))
        .arg("frobnicate")
        .output()
        .expect("khub runs");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("Usage"));
}

#[test]
fn serve_refuses_an_envelope_limit_above_what_devices_open() {
    let mut serve = std::process::Command::new(env!("CARGO_BIN_EXE_khub"))
        .args(["serve", "--memory", "--listen", "127.0.0.1:0"])
        .args(["--max-envelope-bytes", "2000000"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("khub runs");
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = serve.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > std::time::Duration::from_secs(30) {
            serve.kill().unwrap();
            panic!("khub serve started with an envelope limit devices cannot use");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut serve.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success());
    assert!(
        stderr.contains("--max-envelope-bytes 2000000 is above 1114157"),
        "{stderr}"
    );
}

mod device_commands {
    //! The CLI contract end to end: a real relay process and real `khub`
    //! processes talking through pipes, as a person in two terminals would.

    use std::io::{BufRead, BufReader, Write};
    use std::path::PathBuf;
    use std::process::{Child, Command, Output, Stdio};
    use std::time::{Duration, Instant};

    const KHUB: &str = env!("CARGO_BIN_EXE_khub");
    const LIMIT: Duration = Duration::from_secs(60);

    struct World {
        relay: Child,
        url: String,
        dir: PathBuf,
    }

    impl World {
        fn new() -> Self {
            Self::with(&[])
        }

        /// A world whose in-memory relay runs with `extra` settings.
        fn with(extra: &[&str]) -> Self {
            let dir = crate::common::tempdir("cli");
            let mut args = vec!["--memory", "--listen", "127.0.0.1:0"];
            args.extend_from_slice(extra);
            let (relay, addr) = Self::serve(&args);
            Self {
                relay,
                url: format!("http://{addr}"),
                dir,
            }
        }

        /// `khub serve ARGS`, and the address it listens on.
        fn serve(args: &[&str]) -> (Child, String) {
            let mut relay = Command::new(KHUB)
                .arg("serve")
                .args(args)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let line = crate::common::first_line(relay.stdout.take().unwrap());
            let addr = line
                .split_whitespace()
                .find(|w| w.starts_with("127.0.0.1:"))
                .unwrap()
                .trim_end_matches(',')
                .to_owned();
            (relay, addr)
        }

        /// A world whose relay stores in a SQLite file, so that it can be
        /// stopped and started again on the same address.
        fn persistent() -> Self {
            let dir = crate::common::tempdir("cli");
            let db = dir.join("relay.sqlite3");
            let (relay, addr) =
                Self::serve(&["--db", db.to_str().unwrap(), "--listen", "127.0.0.1:0"]);
            Self {
                relay,
                url: format!("http://{addr}"),
                dir,
            }
        }

        /// Starts the persistent relay again where it was.
        fn restart_relay(&mut self) {
            let db = self.dir.join("relay.sqlite3");
            let addr = self.url.trim_start_matches("http://").to_owned();
            let (relay, _) = Self::serve(&["--db", db.to_str().unwrap(), "--listen", &addr]);
            self.relay = relay;
        }

        fn home(&self, name: &str) -> PathBuf {
            self.dir.join(name)
        }

        /// Runs `khub ARGS --home HOME` to completion, feeding `stdin`.
        fn run(&self, home: &str, args: &[&str], stdin: &str) -> Output {
            let mut child = Command::new(KHUB)
                .args(args)
                .arg("--home")
                .arg(self.home(home))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(stdin.as_bytes())
                .unwrap();
            wait(child)
        }

        fn ok(&self, home: &str, args: &[&str]) -> String {
            let output = self.run(home, args, "");
            assert!(
                output.status.success(),
                "khub {args:?} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            String::from_utf8(output.stdout).unwrap()
        }

        fn init(&self, home: &str, name: &str) {
            let out = self.ok(home, &["init", "--relay", &self.url, "--name", name]);
            // The next command, as printed, finds this home (quoted for a
            // shell where it has to be).
            let path = self.home(home).display().to_string();
            let shown = if path
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "/._-+".contains(c))
            {
                path
            } else {
                format!("'{}'", path.replace('\'', "'\\''"))
            };
            assert!(
                out.ends_with(&format!(
                    "next: run `khub invite --home {shown}` here and `khub join` on the other device\n"
                )),
                "{out}"
            );
        }

        /// Starts `khub invite` on `inviter`, waiting `timeout` seconds; returns
        /// it with its stdout and the first line (`code: …`) already read.
        fn start_invite(
            &self,
            inviter: &str,
            timeout: u32,
        ) -> (Child, BufReader<std::process::ChildStdout>, String) {
            let mut invite = Command::new(KHUB)
                .args(["invite", "--timeout", &timeout.to_string(), "--home"])
                .arg(self.home(inviter))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let mut stdout = BufReader::new(invite.stdout.take().unwrap());
            let mut first = String::new();
            stdout.read_line(&mut first).unwrap();
            (invite, stdout, first)
        }

        /// `khub listen` on `home`, and its stderr's lines as they come.
        fn listen_stderr(&self, home: &str) -> (Child, std::sync::mpsc::Receiver<String>) {
            let mut listener = Command::new(KHUB)
                .args(["listen", "--home"])
                .arg(self.home(home))
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let (tx, lines) = std::sync::mpsc::channel();
            let stderr = listener.stderr.take().unwrap();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            (listener, lines)
        }

        /// A code from `khub invite` on `inviter`, which is then killed: it
        /// neither answers nor says goodbye.
        fn vanished_invite(&self, inviter: &str) -> String {
            let (mut invite, _, first) = self.start_invite(inviter, 60);
            let code = first.strip_prefix("code: ").unwrap().trim().to_owned();
            invite.kill().unwrap();
            invite.wait().unwrap();
            code
        }

        /// `khub invite` on `inviter`, `khub join` on `joiner` with the code piped in.
        fn pair(
            &self,
            inviter: &str,
            joiner: &str,
            name: &str,
            typed: impl Fn(&str) -> String,
        ) -> (Output, Output) {
            self.pair_with(inviter, joiner, name, typed, &[])
        }

        /// [`pair`](Self::pair), with `extra` arguments for `khub join`.
        fn pair_with(
            &self,
            inviter: &str,
            joiner: &str,
            name: &str,
            typed: impl Fn(&str) -> String,
            extra: &[&str],
        ) -> (Output, Output) {
            let (invite, mut stdout, first) = self.start_invite(inviter, 30);
            let code = first
                .strip_prefix("code: ")
                .unwrap_or_else(|| panic!("first line {first:?}"))
                .trim()
                .to_owned();
            let mut args = vec![
                "join",
                "--relay",
                &self.url,
                "--name",
                name,
                "--timeout",
                "30",
            ];
            args.extend_from_slice(extra);
            let join = self.run(joiner, &args, &format!("{}\n", typed(&code)));
            let mut rest = String::new();
            std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
            let mut invite_output = wait(invite);
            invite_output.stdout = format!("{first}{rest}").into_bytes();
            (invite_output, join)
        }
    }

    impl World {
        /// Stops the relay, as if it went away.
        fn stop_relay(&mut self) {
            let _ = self.relay.kill();
            let _ = self.relay.wait();
        }
    }

    #[test]
    fn empty_sends_empty_drains_and_an_unreachable_relay_are_said_plainly() {
        let mut world = paired_world();
        // A typo in the relay's URL is the caller's, said as such.
        let typo = world.run("x", &["init", "--relay", "htp://nope", "--name", "x"], "");
        assert_eq!(typo.status.code(), Some(1));
        assert_eq!(
            String::from_utf8_lossy(&typo.stderr),
            "Error: \"htp://nope\" is not a relay URL like https://relay.example or http://127.0.0.1:3000\n"
        );
        let empty = world.run("a", &["send"], "");
        assert!(!empty.status.success());
        let stderr = String::from_utf8_lossy(&empty.stderr);
        assert!(stderr.contains("nothing to send"), "{stderr}");
        let drained = world.run("b", &["listen", "--drain"], "");
        assert!(drained.status.success());
        assert!(drained.stdout.is_empty());
        assert_eq!(String::from_utf8_lossy(&drained.stderr), "nothing new\n");
        // A relay URL whose path serves no relay.
        let wrong_path = format!("{}/khub", world.url);
        let nothing = world.run("z", &["init", "--relay", &wrong_path, "--name", "z"], "");
        assert_eq!(nothing.status.code(), Some(1));
        assert_eq!(
            String::from_utf8_lossy(&nothing.stderr),
            format!(
                "Error: nothing at {wrong_path} answers as a khub relay (HTTP 404): check the relay's address, with its path if it is served under one\n"
            )
        );
        // https:// to a relay served over plain HTTP.
        let tls_url = world.url.replacen("http://", "https://", 1);
        let plain = world.run("y", &["init", "--relay", &tls_url, "--name", "y"], "");
        assert_eq!(plain.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&plain.stderr);
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(
            lines[0],
            format!("Error: cannot reach the relay at {tls_url}")
        );
        assert_eq!(
            lines.last().copied(),
            Some(
                format!(
                    "  next: {tls_url} does not speak TLS: use http:// for a relay without TLS, or put it behind a TLS proxy"
                )
                .as_str()
            ),
            "{stderr}"
        );
        world.stop_relay();
        // Unreachable: a plain error with a hint, and no backtrace even when asked for.
        let invite = Command::new(KHUB)
            .args(["invite", "--home"])
            .arg(world.home("a"))
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!invite.status.success());
        let stderr = String::from_utf8_lossy(&invite.stderr);
        let lines: Vec<&str> = stderr.lines().collect();
        assert!(
            lines[0].starts_with(&format!("Error: cannot reach the relay at {}", world.url)),
            "{stderr}"
        );
        assert!(
            lines
                .last()
                .unwrap()
                .starts_with("  next: nothing answers at"),
            "{stderr}"
        );
        assert!(
            !stderr.contains("backtrace") && !stderr.contains('\x1b') && lines.len() <= 3,
            "{stderr}"
        );
        // `send` says at once that the relay does not answer, and keeps the
        // message.
        let sent = world.run("a", &["send", "--wait", "2", "kept"], "");
        assert!(sent.status.success());
        let stderr = String::from_utf8_lossy(&sent.stderr);
        assert!(
            stderr.starts_with(&format!("cannot reach the relay at {}: ", world.url))
                && stderr.ends_with(
                    "; the message is kept on this device, waiting up to 2 s for the relay\n"
                )
                && stderr.lines().count() == 1,
            "{stderr}"
        );
        assert_eq!(
            String::from_utf8_lossy(&sent.stdout),
            "queued offline: it goes out with the next `khub send` or `khub listen`\n"
        );
        let devices = world.run("a", &["devices"], "");
        assert!(devices.status.success());
        let stdout = String::from_utf8_lossy(&devices.stdout);
        assert!(
            stdout.contains("laptop  (this device)") && stdout.contains("phone"),
            "{stdout}"
        );
        let stderr = String::from_utf8_lossy(&devices.stderr);
        assert!(stderr.starts_with("could not ask the relay"), "{stderr}");
    }

    impl Drop for World {
        fn drop(&mut self) {
            let _ = self.relay.kill();
            let _ = self.relay.wait();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn wait(mut child: Child) -> Output {
        let deadline = Instant::now() + LIMIT;
        while child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "khub did not finish in time");
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().unwrap()
    }

    /// The six digits after "authentication string: ".
    fn sas(output: &Output) -> String {
        let text = String::from_utf8_lossy(&output.stdout);
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix("authentication string: "))
            .unwrap_or_else(|| panic!("no SAS in {text}"));
        line.chars().take(7).collect()
    }

    fn json_lines(text: &str) -> Vec<serde_json::Value> {
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn paired_world() -> World {
        pair_in(World::new())
    }

    fn pair_in(world: World) -> World {
        world.init("a", "laptop");
        let (invite, join) = world.pair("a", "b", "phone", |code| code.to_owned());
        assert!(
            invite.status.success(),
            "{}",
            String::from_utf8_lossy(&invite.stderr)
        );
        assert!(
            join.status.success(),
            "{}",
            String::from_utf8_lossy(&join.stderr)
        );
        assert_eq!(
            sas(&invite),
            sas(&join),
            "both screens show the same string"
        );
        world
    }

    #[test]
    fn two_devices_pair_through_pipes_and_talk_both_ways() {
        let world = paired_world();
        assert!(
            world
                .ok("a", &["send", "hello from the laptop"])
                .starts_with("sent")
        );
        let piped = world.run("b", &["send"], "hello from the phone\nsecond line");
        assert!(piped.status.success());
        let received = json_lines(&world.ok("b", &["listen", "--json", "--drain"]));
        assert_eq!(received.len(), 1);
        assert_eq!(received[0]["from_name"], "laptop");
        assert_eq!(received[0]["text"], "hello from the laptop");
        assert!(received[0]["seq"].as_u64().is_some() && received[0]["from"].as_str().is_some());
        assert_eq!(
            world.ok("a", &["listen", "--drain"]),
            "phone: hello from the phone\nsecond line\n"
        );
        // Drained means drained: nothing twice.
        assert_eq!(world.ok("a", &["listen", "--drain"]), "");
        let devices = world.ok("a", &["devices"]);
        assert!(
            devices.contains("laptop  (this device)") && devices.contains("phone"),
            "{devices}"
        );
    }

    #[test]
    fn a_third_device_joins_through_either_member_and_an_offline_device_catches_up() {
        let world = paired_world();
        let (invite, join) = world.pair("b", "c", "tablet", |code| {
            code.to_lowercase().replace('-', " ")
        });
        assert!(
            invite.status.success() && join.status.success(),
            "{}",
            String::from_utf8_lossy(&join.stderr)
        );
        let (invite, join) = world.pair("a", "d", "watch", |code| code.to_owned());
        assert!(invite.status.success() && join.status.success());
        // The tablet is offline while the laptop writes.
        for i in 0..3 {
            world.ok("a", &["send", &format!("note {i}")]);
        }
        world.ok("d", &["send", "from the watch"]);
        let texts: Vec<String> = json_lines(&world.ok("c", &["listen", "--json", "--drain"]))
            .iter()
            .map(|m| {
                format!(
                    "{}: {}",
                    m["from_name"].as_str().unwrap(),
                    m["text"].as_str().unwrap()
                )
            })
            .collect();
        assert_eq!(
            texts,
            [
                "laptop: note 0",
                "laptop: note 1",
                "laptop: note 2",
                "watch: from the watch"
            ]
        );
    }

    /// A child process killed when the test ends, however it ends.
    struct Running(Child);

    impl Drop for Running {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn one_home_shared_by_listen_sends_and_an_invite_loses_nothing() {
        let world = paired_world();
        // `khub listen` holds the laptop's home while other processes use it.
        let mut listen = Running(
            Command::new(KHUB)
                .args(["listen", "--json", "--home"])
                .arg(world.home("a"))
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let (lines, heard) = std::sync::mpsc::channel();
        let stdout = BufReader::new(listen.0.stdout.take().unwrap());
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                let _ = lines.send(line);
            }
        });
        // Fifty sends from the laptop's home, while the phone writes to it too.
        for i in 0..50 {
            let sent = world.ok("a", &["send", &format!("send {i:02}")]);
            assert!(sent.starts_with("sent"), "send {i}: {sent}");
            if i % 10 == 0 {
                world.ok("b", &["send", &format!("phone {i:02}")]);
            }
        }
        // An invite from the same home while the listener runs.
        let (invite, join) = world.pair("a", "c", "tablet", |code| code.to_owned());
        assert!(
            invite.status.success() && join.status.success(),
            "{}{}",
            String::from_utf8_lossy(&invite.stderr),
            String::from_utf8_lossy(&join.stderr)
        );
        assert!(
            world
                .ok("a", &["send", "after the tablet"])
                .starts_with("sent")
        );

        // The phone got every send once, in order; the tablet the last one.
        let from_laptop: Vec<String> = json_lines(&world.ok("b", &["listen", "--json", "--drain"]))
            .into_iter()
            .filter(|m| m["from_name"] == "laptop")
            .map(|m| m["text"].as_str().unwrap().to_owned())
            .collect();
        let expected: Vec<String> = (0..50)
            .map(|i| format!("send {i:02}"))
            .chain(["after the tablet".to_owned()])
            .collect();
        assert_eq!(from_laptop, expected);
        let tablet = json_lines(&world.ok("c", &["listen", "--json", "--drain"]));
        assert_eq!(tablet.last().unwrap()["text"], "after the tablet");
        // The listener heard each of the phone's five messages once.
        let deadline = Instant::now() + LIMIT;
        let mut phone = Vec::new();
        while phone.len() < 5 && Instant::now() < deadline {
            if let Ok(line) = heard.recv_timeout(Duration::from_millis(200)) {
                let message: serde_json::Value = serde_json::from_str(&line).unwrap();
                phone.push(message["text"].as_str().unwrap().to_owned());
            }
        }
        assert_eq!(
            phone,
            ["phone 00", "phone 10", "phone 20", "phone 30", "phone 40"]
        );
        // And the phone's view of the channel has all three devices.
        let devices = world.ok("b", &["devices"]);
        assert!(devices.contains("tablet"), "{devices}");
    }

    #[test]
    fn refused_envelopes_are_listed_by_khub_incidents_and_told_by_listen() {
        let world = paired_world();
        assert_eq!(world.ok("a", &["incidents"]), "no incidents recorded\n");
        // The phone's own credentials publish an envelope whose header is
        // right but whose body is no MLS message (a broken or hostile device).
        let state = rusqlite::Connection::open(world.home("b").join("device.sqlite3")).unwrap();
        let (channel, device, token): (Vec<u8>, Vec<u8>, Vec<u8>) = state
            .query_row("SELECT channel, device, token FROM identity", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap();
        let credentials = khub::protocol::Credentials {
            channel: khub::ids::ChannelId::from_slice(&channel).unwrap(),
            device: khub::ids::DeviceId::from_slice(&device).unwrap(),
            token: khub::crypto::token::AccessToken::from_slice(&token).unwrap(),
        };
        let header = khub::crypto::envelope::EnvelopeHeader {
            channel: credentials.channel,
            epoch: 1,
            sender: credentials.device,
            seq: 1_000,
        };
        let envelope = [&header.encode()[..], &[0x5a; 100]].concat();
        let addr: std::net::SocketAddr = world.url.trim_start_matches("http://").parse().unwrap();
        let auth = credentials.to_header();
        let published = tokio::runtime::Runtime::new().unwrap().block_on(crate::common::net::post_json(
            addr,
            "/sync",
            &[("authorization", auth.as_str())],
            &serde_json::json!({"cursor": 0, "publish": [khub::protocol::b64::encode(&envelope)]}),
        ));
        assert_eq!(published.status, 200);

        let drained = world.run("a", &["listen", "--drain"], "");
        assert!(drained.status.success());
        let stderr = String::from_utf8_lossy(&drained.stderr);
        assert!(
            stderr.contains("incident (relay seq ") && stderr.contains("malformed"),
            "{stderr}"
        );
        let listed = world.ok("a", &["incidents"]);
        assert!(
            listed.starts_with("relay seq ") && listed.contains("malformed from "),
            "{listed}"
        );
        let json = json_lines(&world.ok("a", &["incidents", "--json"]));
        assert_eq!(json.len(), 1);
        assert_eq!(json[0]["kind"], "malformed");
        assert_eq!(json[0]["sender"], credentials.device.to_string());
    }

    #[test]
    fn a_removed_device_can_no_longer_connect() {
        let world = paired_world();
        let (invite, join) = world.pair("a", "c", "tablet", |code| code.to_owned());
        assert!(invite.status.success() && join.status.success());
        // Removed by its name (`khub devices` lists names and ids).
        let removed = world.ok("a", &["remove", "tablet"]);
        assert!(
            removed.starts_with("removed tablet (") && removed.contains("new MLS epoch"),
            "{removed}"
        );
        let unknown = world.run("a", &["remove", "nobody"], "");
        assert!(!unknown.status.success());
        assert!(String::from_utf8_lossy(&unknown.stderr).contains("no device is named \"nobody\""));
        world.ok("a", &["send", "after the tablet left"]);
        // The removed device hears one plain message, and what to do next.
        for args in [
            &["listen", "--drain"][..],
            &["send", "still here?"][..],
            &["devices"][..],
            &["incidents"][..],
        ] {
            let refused = world.run("c", args, "");
            assert_eq!(
                refused.status.code(),
                Some(1),
                "{args:?} should fail for a removed device"
            );
            let stderr = String::from_utf8_lossy(&refused.stderr);
            let lines: Vec<&str> = stderr.lines().collect();
            assert_eq!(
                lines,
                [
                    "Error: this device was removed from the channel; pair it again to rejoin",
                    "  next: this home holds a removed device: `khub leave` forgets it, then `khub join` pairs it again",
                ],
                "{args:?}"
            );
        }
        assert_eq!(
            world.ok("b", &["listen", "--drain"]),
            "laptop: after the tablet left\n"
        );
        assert!(!world.ok("b", &["devices"]).contains("tablet"));
        // `join` refuses a home that holds a device, and says what to do.
        let held = world.run(
            "c",
            &["join", "--relay", &world.url, "--name", "tablet"],
            "42-7QK3-M9TZ\n",
        );
        assert_eq!(held.status.code(), Some(1));
        assert_eq!(
            String::from_utf8_lossy(&held.stderr),
            format!(
                "Error: {} already holds a device\n  next: use another --home, or `khub leave` to forget the device kept there (`khub join --force` pairs this home again in one step)\n",
                world.home("c").display()
            )
        );
        // `khub leave` forgets it; the same home pairs again.
        let refused = world.run("c", &["leave"], "");
        assert!(
            !refused.status.success(),
            "leave wants --yes without a terminal"
        );
        let left = world.ok("c", &["leave", "--yes"]);
        assert!(left.starts_with("forgot tablet ("), "{left}");
        let (invite, join) = world.pair("a", "c", "tablet", |code| code.to_owned());
        assert!(
            invite.status.success() && join.status.success(),
            "{}",
            String::from_utf8_lossy(&join.stderr)
        );
        // Removed again, it pairs again with `join --force`, no `leave` first.
        world.ok("a", &["remove", "tablet"]);
        let (invite, join) =
            world.pair_with("a", "c", "tablet", |code| code.to_owned(), &["--force"]);
        assert!(
            invite.status.success() && join.status.success(),
            "{}",
            String::from_utf8_lossy(&join.stderr)
        );
        assert!(
            String::from_utf8_lossy(&join.stderr).starts_with(&format!(
                "forgot the device kept in {}",
                world.home("c").display()
            )),
            "{}",
            String::from_utf8_lossy(&join.stderr)
        );
        assert_eq!(
            world
                .ok("c", &["send", "back again"])
                .lines()
                .next()
                .map(|l| l.starts_with("sent")),
            Some(true)
        );
    }

    #[test]
    fn ctrl_c_during_invite_ends_the_code_at_once() {
        let world = paired_world();
        let (invite, _stdout, first) = world.start_invite("a", 60);
        let code = first.strip_prefix("code: ").unwrap().trim().to_owned();
        let interrupted = Command::new("kill")
            .args(["-INT", &invite.id().to_string()])
            .status()
            .unwrap();
        assert!(interrupted.success());
        let output = wait(invite);
        assert!(!output.status.success());
        assert_eq!(
            String::from_utf8_lossy(&output.stderr).lines().last(),
            Some("Error: cancelled: the code no longer works, and the other device was told")
        );
        // The code is dead: a device that types it now is told at once.
        let started = Instant::now();
        let join = world.run(
            "c",
            &[
                "join",
                "--relay",
                &world.url,
                "--name",
                "late",
                "--timeout",
                "30",
            ],
            &format!("{code}\n"),
        );
        assert!(!join.status.success());
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "not left waiting"
        );
        assert_eq!(
            String::from_utf8_lossy(&join.stderr),
            "Error: this code no longer works: the device that showed it stopped waiting (cancelled, or out of time), or the code was already used; make a new code on it\n  next: `khub invite` on a device already in the channel shows a new code; type it on the new device with `khub join`\n"
        );
    }

    #[test]
    fn a_wrong_code_fails_on_both_sides() {
        let world = World::new();
        world.init("a", "laptop");
        let (invite, join) = world.pair("a", "b", "phone", |code| {
            format!("{}-AAAA-AAAA", code.split('-').next().unwrap())
        });
        for output in [&invite, &join] {
            assert!(!output.status.success());
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(
                stderr.contains("the code was wrong, or someone interfered"),
                "{stderr}"
            );
            // Both screens say which device makes the next code.
            assert!(
                stderr.ends_with("\n  next: `khub invite` on a device already in the channel shows a new code; type it on the new device with `khub join`\n"),
                "{stderr}"
            );
        }
        assert!(!world.home("b").join("device.sqlite3").exists());
        // A malformed code never reaches the relay.
        let typo = world.run(
            "b",
            &["join", "--relay", &world.url, "--name", "phone"],
            "42-7QK3\n",
        );
        assert!(String::from_utf8_lossy(&typo.stderr).contains("too short"));
    }

    #[test]
    fn listen_says_on_stderr_when_it_is_live_and_when_it_reconnects() {
        let mut world = pair_in(World::persistent());
        let (mut listener, lines) = world.listen_stderr("b");
        let next = || {
            lines
                .recv_timeout(LIMIT)
                .expect("listen said nothing in time")
        };
        assert_eq!(next(), "live: waiting for messages");
        world.stop_relay();
        let reconnecting = next();
        // With the reason.
        assert!(
            reconnecting.starts_with("reconnecting to the relay (attempt ")
                && reconnecting.contains(&format!("): cannot reach the relay at {}: ", world.url)),
            "{reconnecting}"
        );
        // Several more attempts (backoff from 0.2 s, doubling) fail the
        // same way meanwhile.
        std::thread::sleep(Duration::from_secs(3));
        world.restart_relay();
        // They are not repeated line by line (a line when the reason
        // changes: the relay gone, then refusing); live again once back.
        let mut said = 1;
        let live = loop {
            let line = next();
            if !line.starts_with("reconnecting") {
                break line;
            }
            said += 1;
        };
        assert!(said <= 2, "{said} reconnecting lines");
        assert_eq!(live, "live: waiting for messages");
        let _ = listener.kill();
        let _ = listener.wait();
        // Redirected stderr carries no colour codes.
        assert!(!reconnecting.contains('\x1b') && !live.contains('\x1b'));
    }

    #[test]
    fn listen_prints_messages_as_they_arrive() {
        let world = paired_world();
        let mut listener = Command::new(KHUB)
            .args(["listen", "--json", "--home"])
            .arg(world.home("b"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = listener.stdout.take().unwrap();
        world.ok("a", &["send", "live"]);
        let line = crate::common::first_line(stdout);
        let _ = listener.kill();
        let _ = listener.wait();
        let message: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(message["text"], "live");
    }

    #[test]
    fn an_invite_nobody_answers_times_out_with_a_clear_error() {
        let world = World::new();
        world.init("a", "laptop");
        let invite = world.run("a", &["invite", "--timeout", "1"], "");
        assert!(!invite.status.success());
        assert!(String::from_utf8_lossy(&invite.stdout).starts_with("code: "));
        let stderr = String::from_utf8_lossy(&invite.stderr);
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(
            lines,
            [
                "type this code on the other device with `khub join` (valid 1 s)",
                "Error: nobody entered the code within 1 seconds; make a new code",
                "  next: `khub invite` on a device already in the channel shows a new code; type it on the new device with `khub join`",
            ],
            "{stderr}"
        );
    }

    #[test]
    fn init_on_a_relay_with_an_operator_secret_says_whether_it_was_missing_or_wrong() {
        let secret = crate::common::tempdir("cli-operator");
        let file = secret.join("operator-secret");
        std::fs::write(&file, "correct horse battery staple\n").unwrap();
        let world = World::with(&["--operator-secret-file", file.to_str().unwrap()]);
        std::fs::remove_dir_all(&secret).unwrap();
        let init = |secret: Option<&str>| {
            let mut command = Command::new(KHUB);
            command
                .args(["init", "--relay", &world.url, "--name", "laptop", "--home"])
                .arg(world.home("a"))
                .env_remove("KHUB_OPERATOR_SECRET");
            if let Some(secret) = secret {
                command.env("KHUB_OPERATOR_SECRET", secret);
            }
            let output = command.output().unwrap();
            (
                output.status.success(),
                String::from_utf8_lossy(&output.stderr).into_owned(),
            )
        };
        let next = "  next: set KHUB_OPERATOR_SECRET to this relay's operator secret (its operator has it; it is never an argument)\n";
        assert_eq!(
            init(None),
            (
                false,
                format!(
                    "Error: the relay refused: creating channels on this relay needs its operator secret in X-Khub-Operator, and none was given (forbidden)\n{next}"
                )
            )
        );
        assert_eq!(
            init(Some("a guess of sixteen characters")),
            (
                false,
                format!(
                    "Error: the relay refused: the operator secret given in X-Khub-Operator is not this relay's (forbidden)\n{next}"
                )
            )
        );
        assert!(!world.home("a").join("device.sqlite3").exists());
        assert_eq!(
            init(Some("correct horse battery staple")),
            (true, String::new())
        );
    }

    #[test]
    fn send_says_why_the_relay_holds_a_message_back() {
        let world = World::with(&["--channel-quota-mib", "1"]);
        world.init("a", "laptop");
        // Two messages of 600 KB: the first fits the channel's 1 MiB quota,
        // the second no longer does.
        let big = "q".repeat(600_000);
        let first = world.run("a", &["send", "--wait", "20"], &big);
        assert!(
            first.status.success()
                && String::from_utf8_lossy(&first.stdout).starts_with("sent (relay seq "),
            "{}",
            String::from_utf8_lossy(&first.stderr)
        );
        let sent = world.run("a", &["send", "--wait", "10"], &big);
        assert!(sent.status.success());
        let stderr = String::from_utf8_lossy(&sent.stderr);
        assert!(
            stderr.starts_with("the relay does not store it for now: the relay refused: ")
                && stderr.ends_with(
                    "(over_quota); the message is kept on this device, waiting up to 10 s for the relay\n"
                ),
            "{stderr}"
        );
        assert_eq!(
            String::from_utf8_lossy(&sent.stdout),
            "queued: the relay has not stored it yet; it goes out with the next `khub send` or `khub listen`\n"
        );
        // `listen` sends it again, and says why it waits.
        let (mut listener, lines) = world.listen_stderr("a");
        // (After "live: waiting for messages", unless the refusal came
        // before that was said.)
        let held = loop {
            let line = lines
                .recv_timeout(LIMIT)
                .expect("listen said nothing in time");
            if line != "live: waiting for messages" {
                break line;
            }
        };
        let _ = listener.kill();
        let _ = listener.wait();
        assert!(
            held.starts_with(
                "the relay stores none of this device's messages for now (the relay refused: "
            ) && held.ends_with("(over_quota)); they wait on this device and go again"),
            "{held}"
        );
    }

    #[test]
    fn a_join_whose_inviter_vanished_says_so_when_its_time_is_up() {
        let world = World::new();
        world.init("a", "laptop");
        let code = world.vanished_invite("a");
        let join = world.run(
            "b",
            &[
                "join",
                "--relay",
                &world.url,
                "--name",
                "phone",
                "--timeout",
                "7",
            ],
            &format!("{code}\n"),
        );
        assert!(!join.status.success());
        // Past a few seconds the wait is said; at its end, why it failed.
        assert_eq!(
            String::from_utf8_lossy(&join.stderr),
            "waiting for the device that showed the code to answer (up to 7 s in all)\nError: the device that showed the code did not answer within 7 seconds (it may have stopped, or lost its connection); make a new code on it\n  next: `khub invite` on a device already in the channel shows a new code; type it on the new device with `khub join`\n"
        );
        assert!(!world.home("b").join("device.sqlite3").exists());
    }

    #[test]
    fn a_join_waits_no_longer_than_the_relay_keeps_the_code() {
        let world = World::with(&["--pairing-ttl-secs", "3"]);
        world.init("a", "laptop");
        let code = world.vanished_invite("a");
        let started = Instant::now();
        let join = world.run(
            "b",
            &[
                "join",
                "--relay",
                &world.url,
                "--name",
                "phone",
                "--timeout",
                "60",
            ],
            &format!("{code}\n"),
        );
        assert!(!join.status.success());
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "waited past the code's life at the relay"
        );
        let stderr = String::from_utf8_lossy(&join.stderr);
        assert!(
            stderr.starts_with("Error: the device that showed the code did not answer within ")
                || stderr.starts_with("Error: this code no longer works"),
            "{stderr}"
        );
        assert!(
            stderr.ends_with("  next: `khub invite` on a device already in the channel shows a new code; type it on the new device with `khub join`\n"),
            "{stderr}"
        );
    }

    /// A `khub peer` process: its stdin, and its JSON events as they come.
    struct Peer {
        child: Child,
        stdin: std::process::ChildStdin,
        events: std::sync::mpsc::Receiver<serde_json::Value>,
        /// Events read while looking for another kind, in order.
        skipped: Vec<serde_json::Value>,
    }

    impl Peer {
        fn start(world: &World, home: &str, args: &[&str]) -> Self {
            let mut child = Command::new(KHUB)
                .arg("peer")
                .args(["--relay", &world.url, "--timeout", "60", "--home"])
                .arg(world.home(home))
                .args(args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let stdout = BufReader::new(child.stdout.take().unwrap());
            let (tx, events) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                for line in stdout.lines().map_while(Result::ok) {
                    let event = serde_json::from_str(&line)
                        .unwrap_or_else(|_| panic!("not a JSON line: {line}"));
                    if tx.send(event).is_err() {
                        return;
                    }
                }
            });
            let stdin = child.stdin.take().unwrap();
            Self {
                child,
                stdin,
                events,
                skipped: Vec::new(),
            }
        }

        /// The next event named `name` (others are kept for later), within the limit.
        fn expect(&mut self, name: &str) -> serde_json::Value {
            if let Some(i) = self.skipped.iter().position(|e| e["event"] == name) {
                return self.skipped.remove(i);
            }
            let deadline = Instant::now() + LIMIT;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let event = self
                    .events
                    .recv_timeout(left)
                    .unwrap_or_else(|_| panic!("no {name} event in time"));
                assert_ne!(event["event"], "error", "the peer failed: {event}");
                if event["event"] == name {
                    return event;
                }
                self.skipped.push(event);
            }
        }

        fn say(&mut self, line: &str) {
            writeln!(self.stdin, "{line}").unwrap();
            self.stdin.flush().unwrap();
        }
    }

    #[test]
    fn two_reference_peers_pair_echo_and_report_in_json_lines() {
        let world = World::new();
        let mut echo = Peer::start(
            &world,
            "echo",
            &["--role", "invite", "--echo", "--count", "3"],
        );
        let code = echo.expect("code")["code"].as_str().unwrap().to_owned();
        let mut other = Peer::start(&world, "other", &["--role", "join", "--count", "3"]);
        other.say(&code);
        let joined = other.expect("joined");
        let paired = echo.expect("paired");
        assert_eq!(joined["sas"], paired["sas"], "both show the same SAS");
        other.expect("ready");
        for n in 0..3 {
            other.say(&format!("conformance {n}"));
            assert!(
                other.expect("sent")["seq"].as_u64().is_some(),
                "acked by the relay"
            );
        }
        for n in 0..3 {
            let got = echo.expect("message");
            assert_eq!(got["text"], format!("conformance {n}"));
            assert_eq!(got["from"], joined["device"]);
        }
        for n in 0..3 {
            assert_eq!(
                other.expect("message")["text"],
                format!("echo: conformance {n}")
            );
        }
        assert_eq!(echo.expect("done")["received"], 3);
        assert_eq!(other.expect("done")["received"], 3);
        // Each exits once done, though its stdin stays open (as a harness
        // that drives it may keep it).
        for peer in [echo, other] {
            let Peer { child, stdin, .. } = peer;
            let output = wait(child);
            assert!(output.status.success());
            drop(stdin);
        }
    }

    /// `khub note …` and what it printed: (exit ok, stdout, stderr).
    fn note(world: &World, home: &str, args: &[&str], stdin: &str) -> (bool, String, String) {
        let mut all = vec!["note"];
        all.extend_from_slice(args);
        let output = world.run(home, &all, stdin);
        (
            output.status.success(),
            String::from_utf8(output.stdout).unwrap(),
            String::from_utf8(output.stderr).unwrap(),
        )
    }

    #[test]
    fn notes_written_offline_on_two_devices_merge_and_say_so() {
        let mut world = pair_in(World::persistent());
        let (ok, id, err) = note(
            &world,
            "a",
            &["new", "--title", "Groceries", "--tags", "home,food"],
            "milk\neggs\nbread\n",
        );
        assert!(ok, "{err}");
        let id = id.trim().to_owned();
        assert_eq!(id.len(), 32, "the new note's id: {id}");
        assert_eq!(err, "saved and sent to the relay\n");
        let short = &id[..8];
        let (ok, list, _) = note(&world, "b", &["list"], "");
        assert!(ok);
        assert!(
            list.starts_with(short) && list.trim_end().ends_with("Groceries  [food, home]"),
            "{list}"
        );

        // The relay goes away; both devices edit the note anyway.
        world.stop_relay();
        let (ok, _, err) = note(&world, "a", &["edit", short], "oat milk\neggs\nbread\n");
        assert!(ok, "{err}");
        assert!(
            err.starts_with("offline: the relay did not answer"),
            "{err}"
        );
        assert!(err.ends_with("saved on this device; it goes out with the next `khub note`, `khub send` or `khub listen` that reaches the relay\n"), "{err}");
        let (ok, _, err) = note(
            &world,
            "b",
            &["edit", &id[..6], "--title", "Shopping"],
            "milk\neggs\nbread\nbutter\n",
        );
        assert!(ok, "{err}");
        let (ok, shown, _) = note(&world, "b", &["show", short], "");
        assert!(ok);
        assert!(
            shown.contains("status:  saved on this device only"),
            "{shown}"
        );

        world.restart_relay();
        for home in ["a", "b", "a"] {
            let (ok, _, err) = note(&world, home, &["list"], "");
            assert!(ok, "{err}");
        }
        let (_, on_a, _) = note(&world, "a", &["show", short], "");
        let (_, on_b, _) = note(&world, "b", &["show", short], "");
        assert_eq!(on_a, on_b, "both devices show the same note");
        assert!(
            on_a.starts_with("title:   Shopping\ntags:    food, home\n"),
            "{on_a}"
        );
        assert!(
            on_a.contains(
                "by laptop, phone; merged 1 set of edits made at once on different devices"
            ),
            "{on_a}"
        );
        assert!(
            on_a.ends_with("\noat milk\neggs\nbread\nbutter\n"),
            "{on_a}"
        );

        // Deleting hides it from the list, which says so; restoring brings
        // it back.
        let (ok, out, _) = note(&world, "b", &["rm", short], "");
        assert!(ok && out.starts_with("deleted "), "{out}");
        let (_, list, err) = note(&world, "a", &["list"], "");
        assert_eq!(
            (list.as_str(), err.as_str()),
            (
                "",
                "no notes but 1 deleted: `khub note list --deleted` shows them, `khub note restore ID` brings one back\n"
            )
        );
        let (_, list, _) = note(&world, "a", &["list", "--deleted"], "");
        assert!(list.trim_end().ends_with("(deleted)"), "{list}");
        let (ok, _, _) = note(&world, "a", &["restore", short], "");
        assert!(ok);
        let (_, json, _) = note(&world, "b", &["list", "--json"], "");
        let notes = json_lines(&json);
        assert_eq!(notes.len(), 1);
        assert_eq!(notes[0]["id"], id);
        assert_eq!(notes[0]["deleted"], false);
        assert_eq!(notes[0]["body"], "oat milk\neggs\nbread\nbutter\n");
    }

    #[test]
    fn note_commands_refuse_unknown_ids_and_bad_tags_plainly() {
        let world = World::new();
        world.init("a", "laptop");
        let (_, list, err) = note(&world, "a", &["list"], "");
        assert_eq!(
            (list.as_str(), err.as_str()),
            ("", "no notes yet: `khub note new --title …` writes one\n")
        );
        let (ok, _, err) = note(&world, "a", &["show", "abcd"], "");
        assert!(!ok);
        assert_eq!(
            err,
            "Error: no note on this device has an id starting with abcd (see `khub note list`)\n"
        );
        let (ok, _, err) = note(&world, "a", &["show", "xy"], "");
        assert!(!ok);
        assert!(err.starts_with("Error: \"xy\" is not a note id"), "{err}");
        let (ok, _, err) = note(&world, "a", &["new", "--tags", " spaced"], "text");
        assert!(!ok);
        assert!(
            err.starts_with("Error: tag \" spaced\" cannot be used"),
            "{err}"
        );
        let (_, list, _) = note(&world, "a", &["list", "--json"], "");
        assert_eq!(list, "", "nothing was saved");
    }
}
