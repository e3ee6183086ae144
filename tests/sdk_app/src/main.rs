//! An app built on khub's SDK alone: two devices pair through the relay at
//! the URL given as the only argument, one sends, the other receives, and the
//! app prints what happened. Exits non-zero if anything fails or takes too long.

use std::time::Duration;

use khub::client::{Device, Sent, join};
use khub::pairing::Code;

/// Longest any one step may take.
const STEP: Duration = Duration::from_secs(30);

async fn step<T>(what: &str, future: impl Future<Output = T>) -> Result<T, String> {
    tokio::time::timeout(STEP, future)
        .await
        .map_err(|_| format!("{what} took longer than {} s", STEP.as_secs()))
}

async fn run(relay: &str) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("khub-sdk-app-{}", std::process::id()));
    let e = |e: khub::client::ClientError| e.to_string();
    let laptop = step("creating", Device::create(&dir.join("laptop"), relay, "laptop"))
        .await?
        .map_err(e)?;
    let invitation = step("inviting", laptop.invite()).await?.map_err(e)?;
    let code = Code::parse(&invitation.code()).map_err(|e| e.to_string())?;
    let completing = tokio::spawn(invitation.complete(STEP));
    let (phone, joined) = step("joining", join(&dir.join("phone"), relay, "phone", &code, STEP))
        .await?
        .map_err(e)?;
    let paired = completing.await.map_err(|e| e.to_string())?.map_err(e)?;
    if paired.sas != joined.sas {
        return Err("the two devices show different authentication strings".into());
    }
    let (sending, receiving) = (laptop.connect(), phone.connect());
    match step("sending", sending.send(b"hello from an SDK-only app", STEP))
        .await?
        .map_err(e)?
    {
        Sent::Acked { .. } => {}
        Sent::Queued => return Err("the relay did not ack the message".into()),
    }
    let message = step("receiving", receiving.recv()).await?.map_err(e)?;
    if message.body != b"hello from an SDK-only app" || message.from != laptop.id() {
        return Err(format!("received the wrong message: {message:?}"));
    }
    println!(
        "paired {} and {} (SAS {}); {}: {}",
        laptop.name(),
        phone.name(),
        joined.sas,
        message.from_name,
        String::from_utf8_lossy(&message.body)
    );
    sending.close().await;
    receiving.close().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let Some(relay) = std::env::args().nth(1) else {
        eprintln!("usage: khub-sdk-app RELAY_URL");
        return std::process::ExitCode::FAILURE;
    };
    match run(&relay).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
