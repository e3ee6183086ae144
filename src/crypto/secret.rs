//! Secret-bearing byte strings.
//!
//! Every key, tag input and code secret in khub lives in one of these types. They
//! share three properties, enforced here once instead of at each use:
//!
//! - the bytes are wiped when the value is dropped ([`zeroize`]);
//! - `Debug` prints the type name and `<redacted>`, never the bytes, so a stray
//!   `{:?}` in a log line cannot leak a key;
//! - equality is constant-time ([`subtle`]), so comparing a tag or token does not
//!   reveal how many leading bytes matched.
//!
//! There is deliberately no `Display`, no `serde` implementation and no `Clone`
//! on the named key types: copying a key out is always an explicit call to
//! [`SecretBytes::expose`].

use std::fmt;

use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// `N` secret bytes, wiped on drop, redacted in `Debug`, compared in constant time.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct SecretBytes<const N: usize>(Box<[u8; N]>);

impl<const N: usize> SecretBytes<N> {
    /// Wraps `bytes`. The caller's copy is wiped: the secret now lives only here.
    pub fn new(mut bytes: [u8; N]) -> Self {
        let boxed = Box::new(bytes);
        bytes.zeroize();
        Self(boxed)
    }

    /// Copies `N` bytes out of a slice, or `None` when the length differs.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let array: &[u8; N] = bytes.try_into().ok()?;
        Some(Self(Box::new(*array)))
    }

    /// The secret bytes. Every call site is a place where the secret leaves its
    /// wrapper: keep the borrow short and never log it.
    pub fn expose(&self) -> &[u8; N] {
        &self.0
    }

    /// An explicit copy; the key types themselves are not `Clone`.
    pub fn duplicate(&self) -> Self {
        Self(Box::new(*self.0))
    }
}

impl<const N: usize> ConstantTimeEq for SecretBytes<N> {
    fn ct_eq(&self, other: &Self) -> subtle::Choice {
        self.0[..].ct_eq(&other.0[..])
    }
}

impl<const N: usize> PartialEq for SecretBytes<N> {
    fn eq(&self, other: &Self) -> bool {
        self.ct_eq(other).into()
    }
}

impl<const N: usize> Eq for SecretBytes<N> {}

impl<const N: usize> fmt::Debug for SecretBytes<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes<{N}>(<redacted>)")
    }
}

/// Declares a named secret type over [`SecretBytes`], so that one kind of key
/// cannot be passed where another is expected.
macro_rules! secret_type {
    ($(#[$doc:meta])* $name:ident, $len:expr) => {
        $(#[$doc])*
        #[derive(PartialEq, Eq)]
        pub struct $name($crate::crypto::secret::SecretBytes<{ $len }>);

        impl $name {
            /// Length of the secret in bytes.
            pub const LEN: usize = $len;

            /// Wraps raw bytes (the caller's copy is wiped).
            pub fn from_bytes(bytes: [u8; $len]) -> Self {
                Self($crate::crypto::secret::SecretBytes::new(bytes))
            }

            /// Copies from a slice; `None` on a length mismatch.
            pub fn from_slice(bytes: &[u8]) -> Option<Self> {
                $crate::crypto::secret::SecretBytes::from_slice(bytes).map(Self)
            }

            /// The raw bytes; see [`SecretBytes::expose`](crate::crypto::secret::SecretBytes::expose).
            pub fn expose(&self) -> &[u8; $len] {
                self.0.expose()
            }

            /// An explicit copy (the type is not `Clone` on purpose).
            pub fn duplicate(&self) -> Self {
                Self(self.0.duplicate())
            }
        }

        // The only field is a `SecretBytes`, which wipes itself on drop.
        impl zeroize::ZeroizeOnDrop for $name {}

        impl subtle::ConstantTimeEq for $name {
            fn ct_eq(&self, other: &Self) -> subtle::Choice {
                self.0.ct_eq(&other.0)
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(concat!(stringify!($name), "(<redacted>)"))
            }
        }
    };
}

pub(crate) use secret_type;

/// Fills a fresh array from `rng`. Used for every random secret so that the
/// order in which randomness is drawn is easy to follow (the published vectors
/// depend on it).
pub(crate) fn random_array<const N: usize, R: rand::CryptoRng + ?Sized>(rng: &mut R) -> [u8; N] {
    let mut out = [0u8; N];
    rng.fill_bytes(&mut out);
    out
}
