//! Pairing codes: a public nameplate and a secret, e.g. `42-7QK3-M9TZ`.
//!
//! The **nameplate** (`42`) is a number the relay allocates to route the pairing;
//! it is public and never derived from the secret. The **secret** (`7QK3M9TZ`) is
//! 8 Crockford base32 symbols = 40 bits from the OS CSPRNG; it never leaves the
//! two devices and is the CPace password. Whoever types a code may write it in
//! lower case, with or without dashes or spaces, and confuse `O` with `0` or
//! `I`/`L` with `1`: [`Code::parse`] normalises all of that, and refuses anything
//! else with a message saying what to fix.

use std::fmt;
use std::str::FromStr;

use zeroize::Zeroizing;

use crate::crypto::secret::{random_array, secret_type};

/// Crockford's base32 alphabet: digits and letters without I, L, O and U.
const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
/// Symbols in a code secret.
pub const SECRET_SYMBOLS: usize = 8;
/// Bits of entropy in a code secret.
pub const SECRET_BITS: u32 = 5 * SECRET_SYMBOLS as u32;
// DESIGN.md invariant 2: the secret part carries at least 40 bits.
const _: () = assert!(SECRET_BITS >= 40);

/// Largest nameplate; the relay allocates the smallest free one.
pub const MAX_NAMEPLATE: u32 = 999_999;

secret_type!(
    /// The secret half of a code: 8 normalised Crockford symbols (ASCII), which
    /// are also CPace's password-related string (PRS).
    CodeSecret,
    SECRET_SYMBOLS
);

/// The public half of a code: routes the pairing at the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Nameplate(u32);

impl Nameplate {
    /// A nameplate in `1..=MAX_NAMEPLATE`.
    pub fn new(value: u32) -> Result<Self, CodeError> {
        if (1..=MAX_NAMEPLATE).contains(&value) {
            Ok(Self(value))
        } else {
            Err(CodeError::NameplateOutOfRange)
        }
    }

    /// The number.
    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for Nameplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A code that cannot be used, with what the person typing it should do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodeError {
    /// Nothing was typed.
    #[error("no code was entered: type the code shown on the other device, like 42-7QK3-M9TZ")]
    Empty,
    /// A character outside the code alphabet.
    #[error(
        "the code contains {0:?}, which never appears in a code: codes use digits and the letters A-Z except U"
    )]
    InvalidCharacter(char),
    /// Too few secret symbols after the number.
    #[error(
        "the code is too short: check that you typed all of it (a code looks like 42-7QK3-M9TZ)"
    )]
    TooShort,
    /// Too many secret symbols after the number.
    #[error("the code is too long: check for extra characters (a code looks like 42-7QK3-M9TZ)")]
    TooLong,
    /// The part before the secret is not a number.
    #[error(
        "the code must start with the number shown on the other device, like the 42 in 42-7QK3-M9TZ"
    )]
    MissingNameplate,
    /// The number is 0 or too large.
    #[error("the number at the start of the code is not one the relay hands out: check it")]
    NameplateOutOfRange,
}

/// A complete pairing code.
#[derive(PartialEq, Eq)]
pub struct Code {
    nameplate: Nameplate,
    secret: CodeSecret,
}

impl Code {
    /// A fresh code for `nameplate`, with a secret drawn from `rng`.
    pub fn generate<R: rand::CryptoRng + ?Sized>(nameplate: Nameplate, rng: &mut R) -> Self {
        // 5 random bytes = 40 bits; each symbol takes 5 of them.
        let mut bits = Zeroizing::new([0u8; 8]);
        bits[3..].copy_from_slice(&random_array::<5, R>(rng));
        let value = Zeroizing::new(u64::from_be_bytes(*bits));
        let mut symbols = [0u8; SECRET_SYMBOLS];
        for (i, symbol) in symbols.iter_mut().enumerate() {
            let shift = 5 * (SECRET_SYMBOLS - 1 - i);
            *symbol = ALPHABET[((*value >> shift) & 0x1f) as usize];
        }
        Self {
            nameplate,
            secret: CodeSecret::from_bytes(symbols),
        }
    }

    /// Parses what a person typed: case, spaces, dashes and the look-alikes
    /// `O`→`0`, `I`/`L`→`1` are normalised. With separators, the first group is
    /// the nameplate and the rest the secret, so a missing or extra symbol is
    /// caught here rather than failing later as a wrong code; without them, the
    /// last 8 symbols are the secret.
    pub fn parse(input: &str) -> Result<Self, CodeError> {
        let input = input.trim();
        if input.is_empty() {
            return Err(CodeError::Empty);
        }
        let (number, secret) = match input.find(is_separator) {
            Some(at) => (normalise_all(&input[..at])?, normalise_all(&input[at..])?),
            None => {
                let mut all = normalise_all(input)?;
                if all.len() < SECRET_SYMBOLS {
                    return Err(CodeError::TooShort);
                }
                let at = all.len() - SECRET_SYMBOLS;
                let secret = Zeroizing::new(all.split_off(at));
                (all, secret)
            }
        };
        if number.is_empty() || !number.iter().all(u8::is_ascii_digit) {
            return Err(CodeError::MissingNameplate);
        }
        match secret.len() {
            n if n < SECRET_SYMBOLS => return Err(CodeError::TooShort),
            n if n > SECRET_SYMBOLS => return Err(CodeError::TooLong),
            _ => {}
        }
        // Leading zeros are dropped; more than 6 digits is out of range.
        let digits = std::str::from_utf8(&number).expect("ASCII digits");
        let digits = digits.trim_start_matches('0');
        if digits.len() > 6 {
            return Err(CodeError::NameplateOutOfRange);
        }
        let nameplate = Nameplate::new(digits.parse().unwrap_or(0))?;
        Ok(Self {
            nameplate,
            secret: CodeSecret::from_slice(&secret).expect("exactly 8 symbols"),
        })
    }

    /// The public nameplate.
    pub fn nameplate(&self) -> Nameplate {
        self.nameplate
    }

    /// The secret (CPace's PRS).
    pub fn secret(&self) -> &CodeSecret {
        &self.secret
    }

    /// The code as shown to a person: `NAMEPLATE-XXXX-XXXX`. The result holds the
    /// secret: show it, never log it.
    pub fn display(&self) -> Zeroizing<String> {
        let s = self.secret.expose();
        let mut out = Zeroizing::new(String::with_capacity(20));
        out.push_str(&self.nameplate.to_string());
        out.push('-');
        out.extend(s[..4].iter().map(|&b| b as char));
        out.push('-');
        out.extend(s[4..].iter().map(|&b| b as char));
        out
    }
}

impl FromStr for Code {
    type Err = CodeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Debug for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Code({}-<redacted>)", self.nameplate)
    }
}

/// Characters people put between groups: whitespace, dashes, dots, slashes.
fn is_separator(ch: char) -> bool {
    ch.is_whitespace() || matches!(ch, '-' | '_' | '.' | '/' | '\u{2010}'..='\u{2015}')
}

/// Normalises every non-separator character; the result may hold the secret.
fn normalise_all(part: &str) -> Result<Zeroizing<Vec<u8>>, CodeError> {
    let mut out = Zeroizing::new(Vec::with_capacity(part.len()));
    for ch in part.chars().filter(|&ch| !is_separator(ch)) {
        out.push(normalise(ch).ok_or(CodeError::InvalidCharacter(ch))?);
    }
    Ok(out)
}

/// Maps one typed character to its canonical Crockford symbol.
fn normalise(ch: char) -> Option<u8> {
    let upper = ch.to_ascii_uppercase();
    let canonical = match upper {
        'O' => '0',
        'I' | 'L' => '1',
        other => other,
    };
    if canonical.is_ascii() && ALPHABET.contains(&(canonical as u8)) {
        Some(canonical as u8)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_alphabet_is_crockfords() {
        let mut sorted = *ALPHABET;
        sorted.sort();
        assert_eq!(&sorted, ALPHABET);
        for excluded in b"ILOU" {
            assert!(!ALPHABET.contains(excluded));
        }
    }
}
