//! Pairing codes: generation, the nameplate/secret split, and parsing what people type.

mod common;

use std::collections::HashSet;

use khub::crypto::os_rng;
use khub::pairing::code::MAX_NAMEPLATE;
use khub::pairing::{Code, CodeError, Nameplate};

#[test]
fn generated_codes_look_like_the_design_and_parse_back() {
    let code = Code::generate(Nameplate::new(42).unwrap(), &mut os_rng());
    let shown = code.display();
    let (nameplate, secret) = shown.split_once('-').unwrap();
    assert_eq!(nameplate, "42");
    assert_eq!(secret.len(), 9, "XXXX-XXXX: {}", shown.as_str());
    assert_eq!(&secret[4..5], "-");
    assert_eq!(Code::parse(&shown).unwrap(), code);
}

#[test]
fn secrets_are_random_and_use_the_whole_alphabet() {
    let mut rng = os_rng();
    let nameplate = Nameplate::new(7).unwrap();
    let mut secrets = HashSet::new();
    let mut symbols = HashSet::new();
    for _ in 0..2000 {
        let code = Code::generate(nameplate, &mut rng);
        let secret = *code.secret().expose();
        symbols.extend(secret);
        assert!(
            secrets.insert(secret),
            "a 40-bit secret repeated within 2000 draws"
        );
        // The nameplate is whatever the relay allocated, never derived from the secret.
        assert_eq!(code.nameplate(), nameplate);
    }
    assert_eq!(symbols.len(), 32, "every Crockford symbol appears");
}

#[test]
fn typing_variations_normalise_to_the_same_code() {
    let expected = Code::parse("42-7QK3-M9TZ").unwrap();
    for typed in [
        "42-7qk3-m9tz",
        "  42 7QK3 M9TZ \n",
        "42-7QK3M9TZ",
        "427QK3M9TZ",
        "42 - 7QK3 - M9TZ",
        "42\u{2013}7QK3\u{2013}M9TZ",
        "042-7QK3-M9TZ",
    ] {
        assert_eq!(Code::parse(typed).as_ref(), Ok(&expected), "{typed:?}");
    }
    // Look-alikes: O is 0, I and L are 1 — in the secret and the nameplate.
    assert_eq!(
        Code::parse("4O-OIL0-1234").unwrap(),
        Code::parse("40-0110-1234").unwrap()
    );
}

#[test]
fn malformed_codes_are_refused_with_a_message_a_person_can_act_on() {
    let cases: [(&str, CodeError, &str); 9] = [
        ("", CodeError::Empty, "type the code"),
        ("   ", CodeError::Empty, "type the code"),
        ("42-7QK3-M9T", CodeError::TooShort, "too short"),
        ("42", CodeError::TooShort, "too short"),
        ("42-7QK3-M9TZZ", CodeError::TooLong, "too long"),
        ("42-7QK3-M9TU", CodeError::InvalidCharacter('U'), "except U"),
        (
            "42-7QK3-M9T!",
            CodeError::InvalidCharacter('!'),
            "never appears",
        ),
        (
            "7QK3-M9TZ",
            CodeError::MissingNameplate,
            "start with the number",
        ),
        (
            "0-7QK3-M9TZ",
            CodeError::NameplateOutOfRange,
            "not one the relay hands out",
        ),
    ];
    for (typed, error, advice) in cases {
        let got = Code::parse(typed).unwrap_err();
        assert_eq!(got, error, "{typed:?}");
        assert!(got.to_string().contains(advice), "{typed:?}: {got}");
    }
    let too_big = format!("{}-7QK3-M9TZ", MAX_NAMEPLATE + 1);
    assert_eq!(
        Code::parse(&too_big).unwrap_err(),
        CodeError::NameplateOutOfRange
    );
    assert_eq!(
        Code::parse("99999999999999999999-7QK3-M9TZ").unwrap_err(),
        CodeError::NameplateOutOfRange
    );
    assert!(Nameplate::new(0).is_err());
}

#[test]
fn debug_output_never_shows_the_secret() {
    let code = Code::parse("42-7QK3-M9TZ").unwrap();
    let debug = format!("{code:?} {:?}", code.secret());
    assert!(
        !debug.contains("7QK3") && !debug.contains("M9TZ"),
        "{debug}"
    );
    assert_eq!(format!("{code:?}"), "Code(42-<redacted>)");
}
