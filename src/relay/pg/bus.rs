//! Wake-ups across relay nodes over PostgreSQL's `LISTEN`/`NOTIFY`.
//!
//! Each node keeps its sessions' watch channels in a [`LocalNotifier`] and
//! tells the other nodes what happened on the `khub` notification channel:
//! an envelope stored up to a head, a device revoked, a pairing slot changed.
//! Notifications go out **outside** the append transaction, on a connection
//! of their own, batched: whatever happened while the previous `pg_notify`
//! was in flight goes out in the next one (a `NOTIFY` inside the append
//! transaction would take PostgreSQL's global commit lock on every append).
//!
//! A notification can be lost (the listening connection drops, a node
//! restarts). After every (re)connection the node therefore re-reads the
//! heads of the channels its sessions watch, has every session re-check its
//! device (a revocation may have been missed) and wakes every pairing poll.
//!
//! Payload (text, at most ~7,900 bytes): a first line `khub1 <node>` naming
//! the sending node (a node skips its own), then one line per event:
//! `s <channel> <head>`, `r <channel>`, `p <nameplate>`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{Notify, mpsc, watch};
use tokio_postgres::AsyncMessage;

use crate::ids::ChannelId;
use crate::relay::hub::{ChannelSignal, LocalNotifier, Notifier};
use crate::relay::store::postgres::{self, PgTarget};
use crate::relay::store::{Store, StoreError};

/// The notification channel.
const CHANNEL: &str = "khub";
/// Largest payload sent (PostgreSQL's limit is 8,000 bytes).
const MAX_PAYLOAD: usize = 7_900;
/// `application_name` of the bus's two connections (listening, notifying).
pub const APPLICATION_NAME: &str = "khub-relay-bus";
/// How often the listening connection is checked for life.
const HEARTBEAT: Duration = Duration::from_secs(15);
/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy)]
enum Event {
    Stored(ChannelId, u64),
    Revoked(ChannelId),
    Pairing(u32),
}

/// Events not yet sent, coalesced: the highest head per channel.
#[derive(Default)]
struct Batch {
    heads: BTreeMap<ChannelId, u64>,
    revoked: BTreeSet<ChannelId>,
    pairing: BTreeSet<u32>,
}

impl Batch {
    fn add(&mut self, event: Event) {
        match event {
            Event::Stored(channel, head) => {
                let known = self.heads.entry(channel).or_default();
                *known = (*known).max(head);
            }
            Event::Revoked(channel) => {
                self.revoked.insert(channel);
            }
            Event::Pairing(nameplate) => {
                self.pairing.insert(nameplate);
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.heads.is_empty() && self.revoked.is_empty() && self.pairing.is_empty()
    }

    /// The payloads carrying this batch, each within [`MAX_PAYLOAD`].
    fn payloads(&self, node: u64) -> Vec<String> {
        let first = format!("khub1 {node:016x}");
        let lines = self
            .heads
            .iter()
            .map(|(channel, head)| format!("s {channel} {head}"))
            .chain(self.revoked.iter().map(|channel| format!("r {channel}")))
            .chain(self.pairing.iter().map(|n| format!("p {n}")));
        let mut payloads = Vec::new();
        let mut current = first.clone();
        for line in lines {
            if current.len() + 1 + line.len() > MAX_PAYLOAD {
                payloads.push(std::mem::replace(&mut current, first.clone()));
            }
            current.push('\n');
            current.push_str(&line);
        }
        if current.len() > first.len() {
            payloads.push(current);
        }
        payloads
    }
}

/// The notification a revocation sends from inside its own transaction (so
/// it goes out if and only if the revocation commits): node 0, which every
/// node takes in.
pub(crate) fn revocation_payload(channel: ChannelId) -> (&'static str, String) {
    (CHANNEL, format!("khub1 {:016x}\nr {channel}", 0))
}

/// A [`Notifier`] shared by every node on one PostgreSQL database, and the
/// wake-ups of the shared pairing mailbox.
pub struct PgBus {
    node: u64,
    local: LocalNotifier,
    out: mpsc::UnboundedSender<Event>,
    pairing: Mutex<HashMap<u32, Weak<Notify>>>,
    /// Dropped with the bus: its tasks then stop.
    _alive: watch::Sender<()>,
}

impl PgBus {
    /// Connects and listens, then keeps listening (reconnecting as needed)
    /// until the bus is dropped. `store` is read to catch up after a
    /// reconnection.
    pub async fn start(target: PgTarget, store: Arc<dyn Store>) -> Result<Arc<Self>, StoreError> {
        let (out, outgoing) = mpsc::unbounded_channel();
        let (alive, stopped) = watch::channel(());
        let bus = Arc::new(Self {
            // Never 0: that id marks notifications sent from inside a
            // store transaction (see [`revocation_payload`]).
            node: rand::random::<u64>() | 1,
            local: LocalNotifier::default(),
            out,
            pairing: Mutex::new(HashMap::new()),
            _alive: alive,
        });
        let listening = Listener::connect(&target).await?;
        tokio::spawn(listen(
            Arc::downgrade(&bus),
            target.clone(),
            store,
            listening,
            stopped.clone(),
        ));
        tokio::spawn(send(bus.node, target, outgoing, stopped));
        Ok(bus)
    }

    /// What wakes pairing polls on `nameplate` (on this node).
    pub fn pairing_wake(&self, nameplate: u32) -> Arc<Notify> {
        let mut waiting = self.pairing.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(notify) = waiting.get(&nameplate).and_then(Weak::upgrade) {
            return notify;
        }
        waiting.retain(|_, w| w.strong_count() > 0);
        let notify = Arc::new(Notify::new());
        waiting.insert(nameplate, Arc::downgrade(&notify));
        notify
    }

    /// A pairing slot changed: wakes its polls here and on every other node.
    pub fn pairing_changed(&self, nameplate: u32) {
        self.wake_pairing(nameplate);
        let _ = self.out.send(Event::Pairing(nameplate));
    }

    fn wake_pairing(&self, nameplate: u32) {
        let waiting = self.pairing.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(notify) = waiting.get(&nameplate).and_then(Weak::upgrade) {
            notify.notify_waiters();
        }
    }

    fn wake_all_pairings(&self) {
        let waiting = self.pairing.lock().unwrap_or_else(|e| e.into_inner());
        for notify in waiting.values().filter_map(Weak::upgrade) {
            notify.notify_waiters();
        }
    }

    /// Applies a notification from another node.
    fn receive(&self, payload: &str) {
        let mut lines = payload.lines();
        let from = lines
            .next()
            .and_then(|l| l.strip_prefix("khub1 "))
            .and_then(|n| u64::from_str_radix(n, 16).ok());
        match from {
            Some(node) if node == self.node => return,
            Some(_) => {}
            None => {
                tracing::warn!("ignored a notification on channel khub that no khub node sent");
                return;
            }
        }
        for line in lines {
            let mut parts = line.split(' ');
            let parsed = match (parts.next(), parts.next(), parts.next()) {
                (Some("s"), Some(channel), Some(head)) => channel
                    .parse()
                    .ok()
                    .zip(head.parse().ok())
                    .map(|(c, h)| Event::Stored(c, h)),
                (Some("r"), Some(channel), None) => channel.parse().ok().map(Event::Revoked),
                (Some("p"), Some(n), None) => n.parse().ok().map(Event::Pairing),
                _ => None,
            };
            match parsed {
                Some(Event::Stored(channel, head)) => self.local.stored(channel, head),
                Some(Event::Revoked(channel)) => self.local.revoked(channel),
                Some(Event::Pairing(nameplate)) => self.wake_pairing(nameplate),
                None => tracing::warn!(line, "ignored a malformed line of a khub notification"),
            }
        }
    }

    /// After (re)listening: whatever was missed meanwhile is caught up.
    async fn catch_up(&self, store: &dyn Store) {
        for channel in self.local.watched() {
            match store.head(channel).await {
                Ok(head) => self.local.stored(channel, head),
                Err(e) => {
                    tracing::warn!(%channel, error = %e, "could not re-read a channel's head")
                }
            }
            // Sessions re-check their device: a revocation may have been missed.
            self.local.revoked(channel);
        }
        self.wake_all_pairings();
    }
}

impl Notifier for PgBus {
    fn stored(&self, channel: ChannelId, head: u64) {
        self.local.stored(channel, head);
        let _ = self.out.send(Event::Stored(channel, head));
    }

    fn revoked(&self, channel: ChannelId) {
        self.local.revoked(channel);
        let _ = self.out.send(Event::Revoked(channel));
    }

    fn subscribe(&self, channel: ChannelId) -> watch::Receiver<ChannelSignal> {
        self.local.subscribe(channel)
    }
}

/// A connection listening on [`CHANNEL`], with its notifications.
struct Listener {
    client: tokio_postgres::Client,
    notifications: mpsc::UnboundedReceiver<String>,
}

impl Listener {
    async fn connect(target: &PgTarget) -> Result<Self, StoreError> {
        let (client, notifications) = open(target).await?;
        client
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .await
            .map_err(|e| StoreError::Backend(format!("LISTEN failed: {e}")))?;
        Ok(Self {
            client,
            notifications,
        })
    }
}

/// Opens a connection whose driver runs on its own task and hands over the
/// notifications it receives.
async fn open(
    target: &PgTarget,
) -> Result<(tokio_postgres::Client, mpsc::UnboundedReceiver<String>), StoreError> {
    let mut config = target.config.clone();
    config.keepalives_idle(Duration::from_secs(30));
    config.application_name(APPLICATION_NAME);
    let (client, mut connection) =
        tokio::time::timeout(Duration::from_secs(10), config.connect(target.tls.clone()))
            .await
            .map_err(|_| StoreError::Backend(format!("{} did not answer", target.describe())))?
            .map_err(|e| match postgres::db(e) {
                StoreError::Backend(detail) => StoreError::Backend(format!(
                    "cannot connect to {}: {detail}",
                    target.describe()
                )),
                other => other,
            })?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    // Nobody takes them on the sending connection (it does
                    // not listen); the connection lives on regardless.
                    let _ = tx.send(n.payload().to_owned());
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "PostgreSQL notification connection lost");
                    break;
                }
            }
        }
    });
    Ok((client, rx))
}

/// Receives notifications until the bus is dropped, reconnecting after a
/// loss and catching up each time.
async fn listen(
    bus: Weak<PgBus>,
    target: PgTarget,
    store: Arc<dyn Store>,
    mut listening: Listener,
    mut stopped: watch::Receiver<()>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.tick().await;
        loop {
            tokio::select! {
                payload = listening.notifications.recv() => match payload {
                    Some(payload) => match bus.upgrade() {
                        Some(bus) => bus.receive(&payload),
                        None => return,
                    },
                    None => break,
                },
                _ = heartbeat.tick() => {
                    let alive = tokio::time::timeout(Duration::from_secs(10), listening.client.simple_query("SELECT 1")).await;
                    if !matches!(alive, Ok(Ok(_))) {
                        tracing::warn!("PostgreSQL notification connection stopped answering");
                        break;
                    }
                }
                _ = stopped.changed() => return,
            }
        }
        // Lost: reconnect, then catch up on whatever was missed meanwhile.
        listening = loop {
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stopped.changed() => return,
            }
            match Listener::connect(&target).await {
                Ok(l) => break l,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for other nodes' notifications; retrying");
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        };
        backoff = Duration::from_millis(100);
        tracing::info!("listening for other nodes' notifications again");
        match bus.upgrade() {
            Some(bus) => bus.catch_up(&*store).await,
            None => return,
        }
    }
}

/// Sends this node's events, batched, until the bus is dropped. A batch that
/// could not be sent is kept and sent after reconnecting.
async fn send(
    node: u64,
    target: PgTarget,
    mut outgoing: mpsc::UnboundedReceiver<Event>,
    mut stopped: watch::Receiver<()>,
) {
    let mut client: Option<tokio_postgres::Client> = None;
    let mut backoff = Duration::from_millis(100);
    let mut batch = Batch::default();
    loop {
        if batch.is_empty() {
            tokio::select! {
                event = outgoing.recv() => match event {
                    Some(event) => batch.add(event),
                    None => return,
                },
                _ = stopped.changed() => return,
            }
        }
        while let Ok(event) = outgoing.try_recv() {
            batch.add(event);
        }
        if client
            .as_ref()
            .is_none_or(tokio_postgres::Client::is_closed)
        {
            match open(&target).await {
                Ok((c, _)) => client = Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot notify other nodes; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stopped.changed() => return,
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            }
        }
        let Some(connected) = client.as_ref() else {
            continue;
        };
        let mut sent = true;
        for payload in batch.payloads(node) {
            let notified = tokio::time::timeout(
                Duration::from_secs(10),
                connected.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload]),
            )
            .await;
            if !matches!(notified, Ok(Ok(_))) {
                tracing::warn!("notifying other nodes failed; reconnecting");
                client = None;
                sent = false;
                break;
            }
        }
        if sent {
            batch = Batch::default();
            backoff = Duration::from_millis(100);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_batch_is_split_into_payloads_postgres_accepts() {
        let mut rng = crate::crypto::os_rng();
        let mut batch = Batch::default();
        for head in 0..500 {
            batch.add(Event::Stored(ChannelId::random(&mut rng), head));
        }
        batch.add(Event::Pairing(7));
        let payloads = batch.payloads(42);
        assert!(payloads.len() > 1);
        let bus_lines: usize = payloads.iter().map(|p| p.lines().count() - 1).sum();
        assert_eq!(bus_lines, 501);
        for payload in &payloads {
            assert!(payload.len() <= MAX_PAYLOAD);
            assert!(payload.starts_with("khub1 000000000000002a\n"));
        }
    }
}
