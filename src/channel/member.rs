//! Device names: shown to people, so checked before they are sent or shown.
//! Names are private: they travel only inside MLS credentials, which the relay
//! never sees in the clear.

/// Longest device name, in UTF-8 bytes.
pub const MAX_NAME_LEN: usize = 64;

/// A device name that cannot be shown safely.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// Empty or only whitespace.
    #[error("a device name cannot be empty")]
    Empty,
    /// Longer than [`MAX_NAME_LEN`] bytes.
    #[error("the device name is {0} bytes long; use at most {MAX_NAME_LEN}")]
    TooLong(usize),
    /// Contains control characters (which could rewrite a terminal line).
    #[error("the device name contains control characters; use printable text")]
    ControlCharacter,
}

/// Checks a device name before it is sent or shown.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    if name.trim().is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong(name.len()));
    }
    if name.chars().any(char::is_control) {
        return Err(NameError::ControlCharacter);
    }
    Ok(())
}
