//! The relay's wire protocol, version 2: every frame, field, error code and close
//! code. Pure types and encode/decode; no I/O.
//!
//! All binary values (ids, tokens, envelopes, pairing messages) are unpadded
//! base64url strings. Ids are 16 bytes, tokens and token hashes 32 bytes.
//!
//! # Credentials
//!
//! A device authenticates with its channel id, device id and 32-byte relay access
//! token. The relay stores only SHA-256 of the token and compares in constant
//! time. Over HTTP the three travel in one header:
//!
//! ```text
//! Authorization: Bearer <channel>.<device>.<token>
//! ```
//!
//! Over the WebSocket they travel in the first frame (never in the URL, which
//! proxies log).
//!
//! # WebSocket session: `GET /ws`
//!
//! Text frames, one JSON object each, with a `type` field. The first frame must
//! be `hello`, within the handshake timeout; until the relay has accepted it,
//! it reads at most 16 KiB from the connection (a `hello` takes a few hundred
//! bytes), and a client that sends more is refused with `too_large`:
//!
//! ```json
//! {"type":"hello","v":2,"channel":"AAECAwQFBgcICQoLDA0ODw","device":"EBESExQVFhcYGRobHB0eHw",
//!  "token":"ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8","cursor":0}
//! ```
//!
//! `v` is the protocol version, 2 (MLS). A `hello` with another version is
//! refused with `unsupported_version`; to version 1 the relay says "this device
//! speaks protocol 1; update khub and pair it again".
//!
//! `cursor`: the relay delivers every envelope with a sequence number above
//! it (0 for all). A device asks from the last one it has, or one below that
//! so that the one at its cursor comes again: khub's SDK does, to tell a
//! relay restored from an older backup (SECURITY.md, "The relay went back";
//! the same for `/sync`'s `cursor`). The
//! relay answers `{"type":"ready","v":2,"head":17,"ping_secs":30,"retention_secs":7776000}`
//! (`head`: the channel's newest sequence number; `ping_secs`: how often the
//! relay pings a quiet session, so that a device hearing nothing for three
//! intervals treats the connection as dead and reconnects; `retention_secs`:
//! how long the relay keeps an envelope, so that devices publish a notes
//! snapshot before changes no snapshot covers expire — counted from when the
//! relay stored the envelope). `ping_secs` and `retention_secs` may be absent
//! (older relays): a device then assumes 30 s pings and does not know the
//! retention (its retention-driven notes snapshots stay off until it hears
//! one; `0` means the same). When the cursor is behind the head and nothing
//! after it up to the head is stored any more (retention deleted it),
//! `ready` also carries `"pruned_to"`, equal to the head: no delivery will
//! come up to there, so the device need not wait for one before it publishes
//! (SECURITY.md, "Sending", step 2). It is absent from older relays. A device
//! refuses a `pruned_to` not above the cursor it sent, or above the head, and
//! a delivery at or below it on that connection, as protocol errors; one
//! between the cursor and the head (which khub's relay does not send) says
//! only that less was deleted, and a device may ignore it. A device does not
//! move its cursor on it. The relay then
//! delivers every envelope still stored after the cursor, in order,
//! followed by new ones as they are stored:
//!
//! ```json
//! {"type":"deliver","seq":18,"envelope":"AgABAgMEBQYHCAkKCwwNDg8AAAAB..."}
//! ```
//!
//! An envelope is the 45-byte header of [`crate::crypto::envelope`] (version 2,
//! channel, epoch, sender, sender sequence number) followed by an MLS message;
//! the relay reads only the header. The device publishes envelopes it sealed
//! itself (the envelope header's channel and sender must be the session's):
//!
//! ```json
//! {"type":"publish","envelope":"AgABAgMEBQYHCAkKCwwNDg8AAAAB..."}
//! ```
//!
//! and gets, only after the envelope is durably stored,
//! `{"type":"ack","sender_seq":5,"seq":19,"duplicate":false}`. A publish of a
//! (sender, sender_seq) already stored with the same bytes is acked again with the
//! original `seq` and `"duplicate":true`; with different bytes it is refused with
//! `conflict`. The device also receives its own envelopes as `deliver` frames.
//!
//! **Read while you publish.** A relay that cannot write a device's
//! deliveries and acks because the device does not read them stops reading
//! that device's frames. A device that writes everything it has before it
//! reads again — an outbox larger than the two ends' socket buffers hold, its
//! own envelopes coming back as `deliver` among what it does not read — waits
//! on a full socket while the relay waits on its own, until the relay closes
//! the session with 4008 (below); the same happens again on every reconnect.
//! Take incoming frames between the frames you write (khub's SDK writes each
//! publish as the socket takes it, from the loop that reads).
//!
//! **Take in before you publish.** The relay stores a publish where it
//! arrives. A message sealed before commits the device has not taken in yet
//! (queued offline, or written into a connection that dropped) would be
//! stored behind them, where members may no longer hold its epoch's secrets:
//! publish once you have taken in up to `ready`'s `head` (or once 10 s
//! pass without a delivery: the envelopes up to that head were pruned; over
//! `POST /sync`, once an answer has no `more` or no envelopes), and not before
//! the envelope at your cursor, asked for again, is checked, nor while the
//! relay's `head` is below your cursor (SECURITY.md, "The relay went back");
//! and seal what was sealed in an epoch that ended again, under the same
//! sender number (SECURITY.md, "Sending", steps 2 and 3).
//!
//! **Frame limits.** No frame either side sends is longer than
//! [`MAX_FRAME_LEN`] (1,489,640 bytes: the largest envelope, 1,114,157 bytes,
//! as base64url in its JSON), and no HTTP answer longer than
//! [`MAX_ANSWER_LEN`] (16 MiB; a `/sync` page carries at most
//! [`SYNC_PAGE_BYTES`], 4 MiB, of envelopes, or one envelope if that is
//! longer). A device stops reading a longer frame or answer and treats it as
//! the relay's fault: khub's SDK ends the session (it would read the same
//! frame again on every reconnect) or fails the request. The relay takes no
//! envelope longer than 1,114,157 bytes, whatever its settings.
//!
//! Errors: `{"type":"error","code":"over_quota","message":"…","fatal":false}`. A
//! non-fatal error refuses one request and the session goes on; a fatal one is
//! followed by a close frame with one of the codes below.
//!
//! **Sequence numbers** (`head`, `seq`, `cursor`) are at most [`MAX_SEQ`],
//! 2^53 − 1: a device refuses a frame or `/sync` answer with a larger one as
//! the relay's fault, taking none of it in.
//!
//! **Frames a device does not know.** A device ignores a relay's frame whose
//! `type` is none of `ready`, `deliver`, `ack` and `error` (a later relay of
//! this version may send kinds of frames that need no answer; anything a
//! device must understand comes with a new version), and fields it does not
//! know in the frames it does, and reads an error `code` it does not know
//! as `unknown`. Before `ready`, khub's SDK passes over at most 16 such
//! frames (within the 10 s it waits for `ready`). A frame of a known type that does not decode is the relay's
//! fault: khub's SDK ends the session (4002's row below, from the other side).
//!
//! # Close codes
//!
//! | code | name | meaning | client should |
//! |---|---|---|---|
//! | 1000 | normal | the client closed | — |
//! | 1001 | going away | the relay is shutting down | reconnect with backoff |
//! | 1009 | too large | a frame exceeded the frame limit | fix the client |
//! | 1011 | internal | relay failure | reconnect with backoff |
//! | 4001 | unauthorized | unknown channel or device, or wrong token | stop; re-pair |
//! | 4002 | protocol | malformed frame, unknown type, wrong version, no hello | fix the client |
//! | 4003 | revoked | this device was removed from the channel | stop; the device is out |
//! | 4004 | idle | no frame or pong within the idle timeout | reconnect |
//! | 4008 | slow | the device did not read its deliveries in time | reconnect; it resumes from its cursor; read while you publish (above) |
//!
//! A connection over the per-address limit is closed at accept, before any
//! request; one that sends no request headers within the header timeout
//! (default 10 s) is closed too.
//!
//! # Error codes
//!
//! See [`ErrorCode`]: each has a stable snake_case name, an HTTP status, and
//! whether it ends a WebSocket session. A removed device presenting its own
//! (correct) token gets `revoked` (HTTP 403, close 4003); an unknown device or
//! a wrong token gets `unauthorized` (401, close 4001).
//!
//! # HTTP routes
//!
//! Bodies are JSON. Errors are `{"error":{"code":"…","message":"…"}}` with the
//! status of the code.
//!
//! | route | auth | body → answer |
//! |---|---|---|
//! | `POST /channels` | operator secret in `X-Khub-Operator` if the relay has one | [`CreateChannel`] → 201 [`ChannelCreated`] |
//! | `GET /channels/{channel}/devices` | device | → [`DeviceList`] |
//! | `POST /channels/{channel}/devices` | device | [`AdmitDevice`] → 201 [`DeviceList`] |
//! | `DELETE /channels/{channel}/devices/{device}` | device | → [`DeviceList`]; the removed device's token is revoked and its sessions closed with 4003 |
//! | `POST /sync` | device | [`SyncRequest`] → [`SyncResponse`] |
//! | `POST /pair` | device (the inviter) | [`OpenSlot`] → 201 [`SlotOpened`] |
//! | `POST /pair/{nameplate}/claim` | none (rate-limited per address) | → [`SlotClaimed`] |
//! | `POST /pair/{nameplate}/messages` | inviter's device credentials, or the joiner's `X-Khub-Claim` token | [`PairMessage`] → 202 |
//! | `GET /pair/{nameplate}/messages?after=N` | as above | waits up to 25 s → [`PairMessages`] |
//! | `DELETE /pair/{nameplate}` | as above | ends the slot → 204 |
//! | `GET /healthz` | none | → `{"status":"ok"}` |
//! | `GET /metrics` | none | Prometheus text format |
//!
//! The bodies, as JSON (`b64(n)`: unpadded base64url of `n` bytes; ids are
//! 16 bytes, tokens, token hashes and claims 32):
//!
//! | type | JSON |
//! |---|---|
//! | [`CreateChannel`] | `{"channel": b64(16), "device": b64(16), "token_hash": b64(32)}` |
//! | [`ChannelCreated`] | `{"channel": b64(16)}` |
//! | [`AdmitDevice`] | `{"device": b64(16), "token_hash": b64(32)}` |
//! | [`DeviceList`] | `{"devices": [b64(16), …]}` — the devices the relay lets in |
//! | [`SyncRequest`] | `{"cursor": u64, "publish": [b64(envelope), …], "limit": u32}` (`publish` and `limit` optional; `publish` holds at most [`MAX_PUBLISH_PER_SYNC`], 10,000, envelopes, more is refused with `too_large`; `limit` defaults to, and is capped at, the relay's batch size, 1,000). The body may be up to 16 times the relay's frame limit (23,834,240 bytes by default; larger: `too_large`, 413): publish a large outbox over several requests (khub's SDK puts about 1 MiB of base64 in each, or one envelope if that is larger; a whole request refused with 413 stored none of it, and the SDK sends the same envelopes again starting with a page of half the size, down to one envelope, and keeps the smaller page for the rest of the process, which suits a relay whose frame limit is below the default; and after a refusal that keeps an envelope, such as `internal` or `over_quota`, publishes no more in that sync, so that nothing is stored ahead of it) |
//! | [`SyncResponse`] | `{"acks": [SyncAck, …], "envelopes": [{"seq": u64, "envelope": b64}, …], "head": u64, "more": bool, "retention_secs": u64 (optional)}` |
//! | [`SyncAck`] | `{"seq": u64, "duplicate": bool}` when stored, or `{"duplicate": false, "error": {"code": …, "message": …}}`; `acks[i]` answers `publish[i]`, each envelope on its own, in order |
//! | [`OpenSlot`] | `{"sid": b64(16)}` |
//! | [`SlotOpened`] | `{"nameplate": u32, "expires_in": seconds}` |
//! | [`SlotClaimed`] | `{"sid": b64(16), "claim": b64(32), "expires_in": seconds}` |
//! | [`PairMessage`] | `{"message": b64}` (a pairing message, at most 64 KiB) |
//! | [`PairMessages`] | `{"messages": [b64, …], "next": index, "closed": bool}` — messages from the other side from `after` on; `closed`: the other side ended the slot |
//!
//! Over the WebSocket, an `error` that refuses a `publish` carries the
//! refused envelope's `"sender_seq"`. A refusal for the channel's quota
//! (`over_quota`) or the relay's storage budget (`storage_full`) is not
//! final: the relay refuses that envelope and every later one of the same
//! device until it is stored, and the device sends them again later, in
//! order. Nor is `internal`, `unavailable` or `timeout` (the relay could not
//! store it now; over the WebSocket an `internal` ends the session with 1011
//! and the device sends its outbox again on the next one, where an envelope
//! stored after all is acked as a duplicate). Any other refusal of a
//! `publish` is final for that envelope. After an `internal` refusal the
//! relay stores none of the same device's later envelopes until that one is
//! sent again (a `/sync` request answers the rest of its `publish` list with
//! the same error; a later one over the WebSocket is refused with `internal`
//! for up to 10 s): a device that keeps them and sends them again in order
//! loses nothing. A code
//! a client does not know (a newer relay's) refuses that one request and is
//! worth retrying later; it never ends a session by itself.
//! Keepalive is the WebSocket protocol's own: the relay sends control Pings
//! every `ping_secs`; a client answers with Pongs (libraries do) and need send
//! nothing else. The session URL is the relay URL with `http`→`ws` (`https`→
//! `wss`) and `/ws` appended to its path (`https://example.org/khub` →
//! `wss://example.org/khub/ws`); HTTP routes likewise hang below that path.
//!
//! Error codes (`{"error":{"code":…}}`, or `error` frames):
//!
//! | code | HTTP | ends a session (close) | client should |
//! |---|---|---|---|
//! | `malformed`, `unknown_type`, `unsupported_version`, `invalid_base64` | 400 | yes (4002) | fix the client |
//! | `bad_request`, `wrong_channel`, `invalid_envelope` | 400 | no | fix the client |
//! | `unauthorized` | 401 | yes (4001) | stop; the device is unknown or its token wrong |
//! | `revoked` | 403 | yes (4003) | stop; this device was removed |
//! | `forbidden` (operator secret), `forbidden_sender` | 403 | no | fix the request |
//! | `not_found` | 404 | no | check the nameplate or route |
//! | `timeout` | 408 | no | send the whole request faster |
//! | `conflict`, `out_of_order`, `exists`, `already_claimed`, `channel_full` | 409 | no | final for that request |
//! | `gone` | 410 | no | the pairing ended: make a new code |
//! | `too_large` | 413 | yes (1009) for frames | make it smaller (an envelope above the relay's envelope limit, or above the channel's whole quota, is never stored) |
//! | `rate_limited` | 429 | no | wait and retry |
//! | `internal` | 500 | yes (1011) | retry with backoff |
//! | any other | — | as `fatal` says | a newer relay's code: treat as a refusal of that request; retry later |
//! | `unavailable` | 503 | no | retry with backoff |
//! | `over_quota` | 507 | no | keep it queued; send again later |
//! | `storage_full` | 507 | no | the relay's storage budget is used up: keep it queued; send again later (also refuses `POST /channels`) |
//!
//! Examples:
//!
//! ```text
//! POST /channels
//! {"channel":"AAECAwQFBgcICQoLDA0ODw","device":"EBESExQVFhcYGRobHB0eHw","token_hash":"…43 chars…"}
//! → 201 {"channel":"AAECAwQFBgcICQoLDA0ODw"}
//!
//! POST /sync                      Authorization: Bearer <channel>.<device>.<token>
//! {"cursor":17,"publish":["AgABAgMEBQYHCAkKCwwNDg8AAAAB…"],"limit":100}
//! → 200 {"acks":[{"seq":18,"duplicate":false}],
//!        "envelopes":[{"seq":18,"envelope":"AgABAgMEBQYHCAkKCwwNDg8AAAAB…"}],"head":18,"more":false}
//!
//! POST /pair/42/claim
//! → 409 {"error":{"code":"already_claimed","message":"another device already entered this code: make a new code"}}
//! ```
//!
//! Pairing through the mailbox, in order:
//!
//! 1. inviter: `POST /pair {"sid":…}` → `{"nameplate":42,"expires_in":300}`; it
//!    makes the code for nameplate 42 and posts its Start message;
//! 2. joiner: `POST /pair/42/claim` → `{"sid":…,"claim":…}`, then polls and posts
//!    with `X-Khub-Claim: <claim>`: it reads Start, posts Response;
//! 3. inviter: reads Response, admits the joiner (`POST /channels/…/devices`),
//!    commits the MLS Add in the channel and waits until the relay has ordered
//!    it, posts Finish (or Abort), waits for the joiner's first message in the
//!    channel and ends the slot (`DELETE /pair/42`);
//! 4. joiner: reads Finish, then ends the slot (`DELETE /pair/42`). An Abort
//!    ends the slot for the side that sent it (no DELETE needed after it).
//!    `GET /pair/{n}/messages` takes `after` (index of the first message
//!    wanted) and `wait` (seconds to wait for one, at most 25; 0 for none).
//!
//! The mailbox carries the opaque pairing messages of
//! [`crate::pairing::message`]; the relay reads only their first (type) byte,
//! to count completed and failed pairings.

pub mod b64;
pub mod bounded;
pub mod errors;
pub mod frames;
pub mod http;

pub use errors::{CloseCode, ErrorCode, Refusal};
pub use frames::{ClientFrame, FrameError, MAX_FRAME_LEN, MAX_SEQ, PROTOCOL_VERSION, ServerFrame};
pub use http::*;
