//! The bare baseline: a warp + tokio-tungstenite broadcast that forwards each
//! frame to the other sockets of its room — no authentication, no storage, no
//! crypto, no ordering. It answers each frame with a one-byte ack so that the
//! same closed-loop load generator can drive it. It is the upper bound of what
//! our stack could do on this machine.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use warp::Filter;
use warp::ws::Message;

type Rooms = Arc<Mutex<HashMap<String, Vec<(u64, mpsc::UnboundedSender<Message>)>>>>;

/// Starts the baseline on an ephemeral port; returns its address.
pub async fn start() -> SocketAddr {
    let rooms: Rooms = Arc::default();
    let next_id = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let route =
        warp::path!("room" / String)
            .and(warp::ws())
            .map(move |room: String, ws: warp::ws::Ws| {
                let rooms = Arc::clone(&rooms);
                let id = next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                ws.on_upgrade(move |socket| serve(socket, room, id, rooms))
            });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    // Served like the relay: TCP_NODELAY on every socket (warp's own server sets
    // none, and its frames would then wait ~40 ms for delayed ACKs).
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let service =
                hyper_util::service::TowerToHyperService::new(warp::service(route.clone()));
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .with_upgrades(),
            );
        }
    });
    addr
}

async fn serve(socket: warp::ws::WebSocket, room: String, id: u64, rooms: Rooms) {
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
    rooms
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(room.clone())
        .or_default()
        .push((id, tx.clone()));
    let writer = tokio::spawn(async move {
        while let Some(message) = rx.recv().await {
            if sink.send(message).await.is_err() {
                break;
            }
        }
    });
    while let Some(Ok(message)) = stream.next().await {
        if !message.is_text() {
            continue;
        }
        {
            let rooms = rooms.lock().unwrap_or_else(|e| e.into_inner());
            for (other, peer) in rooms.get(&room).into_iter().flatten() {
                if *other != id {
                    let _ = peer.send(message.clone());
                }
            }
        }
        let _ = tx.send(Message::text("a"));
    }
    rooms
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(room)
        .or_default()
        .retain(|(other, _)| *other != id);
    writer.abort();
}
