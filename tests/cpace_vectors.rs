//! CPace-ristretto255-SHA512 against the CFRG's own test vectors
//! (draft-irtf-cfrg-cpace-21, entry `G_Coffee25519`, copied to tests/data/).

use curve25519_dalek::scalar::Scalar;
use khub::crypto::cpace::{self, CpaceError, KeyConfirmation};
use serde_json::Value;

fn vectors() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/cpace-draft21-testvectors.json"
    ))
    .expect("vector file is in tests/data");
    serde_json::from_str(&text).expect("vector file is JSON")
}

fn bytes(v: &Value, key: &str) -> Vec<u8> {
    hex::decode(v[key].as_str().unwrap_or_else(|| panic!("{key} missing"))).expect("hex")
}

fn scalar(v: &Value, key: &str) -> Scalar {
    let b: [u8; 32] = bytes(v, key).try_into().expect("32 bytes");
    Scalar::from_canonical_bytes(b).expect("canonical scalar")
}

#[test]
fn every_value_of_the_ristretto255_entry_is_reproduced() {
    let all = vectors();
    let v = &all["G_Coffee25519"];
    let (prs, ci, sid) = (bytes(v, "PRS"), bytes(v, "CI"), bytes(v, "sid"));
    let (ada, adb) = (bytes(v, "ADa"), bytes(v, "ADb"));

    let g = cpace::calculate_generator(&prs, &ci, &sid);
    assert_eq!(g.compress().to_bytes().to_vec(), bytes(v, "g"), "generator");

    // The draft's scalars are already masked samples: masking leaves them unchanged.
    let (ya, yb) = (scalar(v, "ya"), scalar(v, "yb"));
    assert_eq!(cpace::scalar_from_sampled_bytes(ya.to_bytes()), ya);
    assert_eq!(cpace::scalar_from_sampled_bytes(yb.to_bytes()), yb);

    let ya_share = cpace::scalar_mult(&ya, &g);
    let yb_share = cpace::scalar_mult(&yb, &g);
    assert_eq!(ya_share.to_vec(), bytes(v, "Ya"), "Ya");
    assert_eq!(yb_share.to_vec(), bytes(v, "Yb"), "Yb");

    let k_a = cpace::scalar_mult_vfy(&ya, &yb_share).expect("valid share");
    let k_b = cpace::scalar_mult_vfy(&yb, &ya_share).expect("valid share");
    assert_eq!(k_a.to_vec(), bytes(v, "K"), "K at A");
    assert_eq!(k_b.to_vec(), bytes(v, "K"), "K at B");

    let ir = cpace::transcript_ir(&ya_share, &ada, &yb_share, &adb);
    let oc = cpace::transcript_oc(&ya_share, &ada, &yb_share, &adb);
    assert_eq!(
        cpace::derive_isk(&sid, &k_a, &ir).expose().to_vec(),
        bytes(v, "ISK_IR"),
        "ISK_IR"
    );
    assert_eq!(
        cpace::derive_isk(&sid, &k_a, &oc).expose().to_vec(),
        bytes(v, "ISK_SY"),
        "ISK_SY"
    );
    assert_eq!(
        cpace::sid_output(&ir).to_vec(),
        bytes(v, "sid_output_ir"),
        "sid_output_ir"
    );
    assert_eq!(
        cpace::sid_output(&oc).to_vec(),
        bytes(v, "sid_output_oc"),
        "sid_output_oc"
    );
}

#[test]
fn the_protocol_objects_reproduce_the_entry_from_scripted_randomness() {
    let all = vectors();
    let v = &all["G_Coffee25519"];
    let (prs, ci, sid) = (bytes(v, "PRS"), bytes(v, "CI"), bytes(v, "sid"));
    let (ada, adb) = (bytes(v, "ADa"), bytes(v, "ADb"));
    let inputs = cpace::Inputs {
        prs: &prs,
        ci: &ci,
        sid: &sid,
    };

    let mut rng_a = khub::vectors::ScriptedRng::new([bytes(v, "ya")]);
    let (initiator, ya_share) = cpace::Initiator::start(inputs, &mut rng_a);
    assert_eq!(ya_share.to_vec(), bytes(v, "Ya"));

    let mut rng_b = khub::vectors::ScriptedRng::new([bytes(v, "yb")]);
    let (isk_b, yb_share) =
        cpace::Responder::respond(inputs, &ya_share, &ada, &adb, &mut rng_b).expect("valid");
    assert_eq!(yb_share.to_vec(), bytes(v, "Yb"));
    assert_eq!(isk_b.expose().to_vec(), bytes(v, "ISK_IR"));

    let isk_a = initiator.finish(&ada, &yb_share, &adb).expect("valid");
    assert_eq!(isk_a, isk_b);

    // Key confirmation (draft §10.4): each side's tag verifies at the other, and
    // the two tags differ, so one cannot be reflected as the other.
    let confirm = KeyConfirmation::new(&sid, &isk_a);
    let ta = confirm.tag(&ya_share, &ada);
    let tb = confirm.tag(&yb_share, &adb);
    assert_ne!(ta, tb);
    assert!(KeyConfirmation::new(&sid, &isk_b).verify(&ya_share, &ada, &ta));
    assert!(KeyConfirmation::new(&sid, &isk_b).verify(&yb_share, &adb, &tb));
    assert!(!confirm.verify(&ya_share, &ada, &tb));
    assert!(!confirm.verify(&ya_share, &ada, &ta[..63]));
}

#[test]
fn scalar_mult_vfy_follows_the_point_vectors() {
    let all = vectors();
    let p = &all["G_Coffee25519_points"];
    let valid = &p["Valid"];
    let s = scalar(valid, "s");
    let x = bytes(valid, "X");
    let out = cpace::scalar_mult_vfy(&s, &x).expect("valid point");
    assert_eq!(out.to_vec(), bytes(valid, "G.scalar_mult_vfy(s,X)"));
    assert_eq!(out.to_vec(), bytes(valid, "G.scalar_mult(s,decode(X))"));

    // Invalid Y1 does not decode; Invalid Y2 is the identity's encoding.
    assert_eq!(
        cpace::scalar_mult_vfy(&s, &bytes(p, "Invalid Y1")),
        Err(CpaceError::InvalidPoint)
    );
    assert_eq!(
        cpace::scalar_mult_vfy(&s, &bytes(p, "Invalid Y2")),
        Err(CpaceError::IdentityPoint)
    );
    // Wrong lengths never decode.
    assert_eq!(
        cpace::scalar_mult_vfy(&s, &x[..31]),
        Err(CpaceError::InvalidPoint)
    );
    assert_eq!(
        cpace::scalar_mult_vfy(&s, &[x.clone(), vec![0]].concat()),
        Err(CpaceError::InvalidPoint)
    );
}

#[test]
fn both_parties_abort_on_invalid_shares_in_a_protocol_run() {
    let all = vectors();
    let v = &all["G_Coffee25519"];
    let p = &all["G_Coffee25519_points"];
    let (prs, ci, sid) = (bytes(v, "PRS"), bytes(v, "CI"), bytes(v, "sid"));
    let inputs = cpace::Inputs {
        prs: &prs,
        ci: &ci,
        sid: &sid,
    };
    for (bad, expected) in [
        (bytes(p, "Invalid Y1"), CpaceError::InvalidPoint),
        (bytes(p, "Invalid Y2"), CpaceError::IdentityPoint),
    ] {
        let mut rng = khub::crypto::os_rng();
        let responder = cpace::Responder::respond(inputs, &bad, b"ADa", b"ADb", &mut rng);
        assert_eq!(responder.err(), Some(expected), "responder");
        let (initiator, _) = cpace::Initiator::start(inputs, &mut rng);
        assert_eq!(
            initiator.finish(b"ADa", &bad, b"ADb").err(),
            Some(expected),
            "initiator"
        );
    }
}

#[test]
fn the_generator_string_matches_the_draft_layout_for_the_x25519_inputs() {
    // Draft B.1.1 lists the generator string for the same PRS, CI and sid with
    // DSI "CPace255"; ours differs only in DSI (and so in the padding length).
    let all = vectors();
    let v = &all["G_Coffee25519"];
    let gen_str = cpace::generator_string(&bytes(v, "PRS"), &bytes(v, "CI"), &bytes(v, "sid"));
    let mut expected = vec![17];
    expected.extend_from_slice(b"CPaceRistretto255");
    expected.push(8);
    expected.extend_from_slice(b"Password");
    expected.push(100);
    expected.extend_from_slice(&[0; 100]);
    expected.push(24);
    expected.extend_from_slice(&bytes(v, "CI"));
    expected.push(16);
    expected.extend_from_slice(&bytes(v, "sid"));
    assert_eq!(gen_str.as_slice(), &expected[..]);
}
