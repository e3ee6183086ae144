//! The client SDK against a relay behind a TLS-terminating proxy (the way
//! README says to deploy it): https:// for requests, wss:// for sessions.
//! The certificate is a test-only one for `localhost` under a test CA in
//! tests/data/tls.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use common::net::{STEP, TestRelay};
use khub::client::{ClientError, Device, Sent};
use khub::relay::config::RelayConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/tls")
        .join(name)
}

/// Listens on `bind`, terminates TLS with the `localhost` certificate, and
/// forwards each connection to `relay`.
async fn tls_proxy(bind: &str, relay: SocketAddr) -> SocketAddr {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(data("localhost.pem"))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(data("localhost.key")).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(bind).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                let Ok(mut upstream) = TcpStream::connect(relay).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_pair_and_sync_through_a_tls_proxy() {
    let relay = TestRelay::start(RelayConfig::default()).await;
    let proxy = tls_proxy("127.0.0.1:0", relay.addr).await;
    let url = format!("https://localhost:{}", proxy.port());
    let dir = common::tempdir("tls");

    // Without the test CA, the certificate is refused and nothing is created.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_khub"))
        .args(["init", "--relay", &url, "--name", "laptop", "--home"])
        .arg(dir.join("untrusting"))
        .env_remove("KHUB_CA_FILE")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines[0], format!("Error: cannot reach the relay at {url}"));
    assert!(lines[1].contains("certificate"), "{stderr}");
    assert!(
        lines[2].starts_with("  next: the relay's TLS certificate is not trusted")
            && lines.len() == 3,
        "{stderr}"
    );

    khub::client::trust_pem_file(&data("ca.pem")).unwrap();
    let laptop = Device::create(&dir.join("laptop"), &url, "laptop")
        .await
        .unwrap();
    assert_eq!(laptop.relay_url(), url);
    let phone = common::sdk_join(&laptop, &dir.join("phone"), &url, "phone").await;

    // Live sessions over wss://.
    let (sa, sb) = (laptop.connect(), phone.connect());
    assert!(matches!(
        sa.send(b"over TLS", STEP).await.unwrap(),
        Sent::Acked { .. }
    ));
    let message = tokio::time::timeout(STEP, sb.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(message.body, b"over TLS");
    phone.mark_read(message.seq).unwrap();
    // And the one-shot catch-up over https://.
    phone.queue(b"via sync").unwrap();
    phone.sync().await.unwrap();
    let message = tokio::time::timeout(STEP, sa.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (message.from_name.as_str(), message.body.as_slice()),
        ("phone", &b"via sync"[..])
    );

    // A certificate for another name is refused even with the CA trusted:
    // 127.0.0.2 is not among the certificate's names.
    let other = tls_proxy("127.0.0.2:0", relay.addr).await;
    let wrong_name = Device::create(&dir.join("wrong"), &format!("https://{other}"), "x")
        .await
        .unwrap_err();
    assert!(
        matches!(
            &wrong_name,
            ClientError::Unreachable { source, .. } if source.to_string().contains("certificate")
        ),
        "{wrong_name:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    relay.stop().await;
}
