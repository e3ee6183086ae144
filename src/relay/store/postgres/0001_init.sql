-- khub relay schema, version 1. Applied once, under the migration lock, in
-- one transaction. Every table is prefixed khub_ so the relay can share a
-- database with other things.

CREATE TABLE khub_channels (
    id      BYTEA PRIMARY KEY,
    head    BIGINT NOT NULL,   -- newest sequence number; never decreases
    bytes   BIGINT NOT NULL,   -- bytes of envelopes stored now (quota)
    created BIGINT NOT NULL
);

CREATE TABLE khub_devices (
    channel    BYTEA NOT NULL REFERENCES khub_channels (id),
    device     BYTEA NOT NULL,
    token_hash BYTEA NOT NULL,   -- SHA-256 of the access token; never the token
    revoked    BOOLEAN NOT NULL DEFAULT false,
    joined     BIGINT NOT NULL,
    ord        BIGSERIAL,        -- join order
    PRIMARY KEY (channel, device)
);

-- Per sender: the highest sender sequence number stored (kept after pruning,
-- so a pruned sender still cannot go back) and its oldest envelope refused for
-- quota, which holds back its later ones.
CREATE TABLE khub_senders (
    channel       BYTEA NOT NULL,
    sender        BYTEA NOT NULL,
    highest       BIGINT NOT NULL,
    quota_blocked BIGINT,
    PRIMARY KEY (channel, sender)
);

-- The envelope log, partitioned by the week it was stored in so retention
-- drops whole partitions. A partitioned table's unique keys must contain the
-- partition key, so (channel, sender, sender_seq) is unique by construction
-- instead: every append holds its channel's row lock (khub_append).
CREATE TABLE khub_envelopes (
    channel    BYTEA NOT NULL,
    seq        BIGINT NOT NULL,
    sender     BYTEA NOT NULL,
    sender_seq BIGINT NOT NULL,
    body       BYTEA NOT NULL,   -- the sealed envelope, opaque to the relay
    stored     BIGINT NOT NULL   -- Unix seconds
) PARTITION BY RANGE (stored);
CREATE TABLE khub_envelopes_default PARTITION OF khub_envelopes DEFAULT;
CREATE INDEX khub_envelopes_seq ON khub_envelopes (channel, seq);
CREATE INDEX khub_envelopes_sender ON khub_envelopes (channel, sender, sender_seq);

-- One append, in one round trip: locks the channel row (so each channel's
-- sequence is gapless and commits in order), dedupes a retried publish,
-- keeps each sender's order, applies the quota. Outcome: stored, duplicate,
-- conflict, out_of_order, over_quota, not_found.
CREATE FUNCTION khub_append(
    p_channel BYTEA, p_sender BYTEA, p_sender_seq BIGINT, p_body BYTEA,
    p_stored BIGINT, p_quota BIGINT,
    OUT outcome TEXT, OUT seq BIGINT, OUT used BIGINT, OUT highest BIGINT
) LANGUAGE plpgsql AS $$
DECLARE
    v_bytes BIGINT;
    v_highest BIGINT;
    v_blocked BIGINT;
    v_body BYTEA;
BEGIN
    SELECT c.bytes INTO v_bytes FROM khub_channels c WHERE c.id = p_channel FOR UPDATE;
    IF NOT FOUND THEN
        outcome := 'not_found';
        RETURN;
    END IF;
    SELECT s.highest, s.quota_blocked INTO v_highest, v_blocked
        FROM khub_senders s WHERE s.channel = p_channel AND s.sender = p_sender;
    v_highest := COALESCE(v_highest, 0);
    highest := v_highest;
    used := v_bytes;
    IF p_sender_seq <= v_highest THEN
        SELECT e.seq, e.body INTO seq, v_body FROM khub_envelopes e
            WHERE e.channel = p_channel AND e.sender = p_sender AND e.sender_seq = p_sender_seq;
        IF NOT FOUND THEN
            outcome := 'out_of_order';
        ELSIF v_body = p_body THEN
            outcome := 'duplicate';
        ELSE
            outcome := 'conflict';
        END IF;
        RETURN;
    END IF;
    IF v_blocked IS NOT NULL AND p_sender_seq > v_blocked THEN
        outcome := 'over_quota';
        RETURN;
    END IF;
    IF v_bytes + length(p_body) > p_quota THEN
        INSERT INTO khub_senders (channel, sender, highest, quota_blocked)
            VALUES (p_channel, p_sender, v_highest, p_sender_seq)
            ON CONFLICT (channel, sender) DO UPDATE
            SET quota_blocked = LEAST(COALESCE(khub_senders.quota_blocked, p_sender_seq), p_sender_seq);
        outcome := 'over_quota';
        RETURN;
    END IF;
    UPDATE khub_channels c SET head = c.head + 1, bytes = c.bytes + length(p_body)
        WHERE c.id = p_channel RETURNING c.head INTO seq;
    INSERT INTO khub_envelopes (channel, seq, sender, sender_seq, body, stored)
        VALUES (p_channel, seq, p_sender, p_sender_seq, p_body, p_stored);
    INSERT INTO khub_senders (channel, sender, highest, quota_blocked)
        VALUES (p_channel, p_sender, p_sender_seq, NULL)
        ON CONFLICT (channel, sender) DO UPDATE SET highest = p_sender_seq, quota_blocked = NULL;
    outcome := 'stored';
END;
$$;

-- Pairing slots, shared by every node: a code shown through node A is
-- claimed through node B. Messages live in their own table; a slot's
-- deletion takes them along.
CREATE TABLE khub_pairing_slots (
    nameplate  INTEGER PRIMARY KEY,
    channel    BYTEA NOT NULL,
    inviter    BYTEA NOT NULL,
    sid        BYTEA NOT NULL,
    claim_hash BYTEA,            -- SHA-256 of the joiner's claim token
    ended_by   SMALLINT,         -- 0 inviter, 1 joiner
    finished   BOOLEAN NOT NULL DEFAULT false,
    aborted    BOOLEAN NOT NULL DEFAULT false,
    expires    TIMESTAMPTZ NOT NULL
);
CREATE TABLE khub_pairing_messages (
    nameplate INTEGER NOT NULL REFERENCES khub_pairing_slots (nameplate) ON DELETE CASCADE,
    to_side   SMALLINT NOT NULL, -- 0 for the inviter, 1 for the joiner
    idx       INTEGER NOT NULL,
    body      BYTEA NOT NULL,
    PRIMARY KEY (nameplate, to_side, idx)
);
-- Nameplates of dead slots rest for one TTL before reuse.
CREATE TABLE khub_pairing_resting (
    nameplate INTEGER PRIMARY KEY,
    until     TIMESTAMPTZ NOT NULL
);

-- Per-address rate limits (pairing claims, channel creations), counted across
-- nodes in fixed windows.
CREATE TABLE khub_rate_windows (
    kind    TEXT NOT NULL,
    client  TEXT NOT NULL,
    started TIMESTAMPTZ NOT NULL,
    count   INTEGER NOT NULL,
    PRIMARY KEY (kind, client)
);
