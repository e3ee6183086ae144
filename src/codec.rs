//! A bounds-checked reader for khub's small binary formats (pairing messages,
//! sealed payloads, rekeys). Every read either returns exactly the bytes asked
//! for or an error naming the field, so decoders never index out of range and
//! never panic on hostile input.

/// A field was missing, cut short, or followed by stray bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub &'static str);

/// Reads fields front to back from a byte slice.
pub(crate) struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    /// The next `len` bytes, or `DecodeError(field)` if fewer remain.
    pub(crate) fn take(
        &mut self,
        len: usize,
        field: &'static str,
    ) -> Result<&'a [u8], DecodeError> {
        if self.rest.len() < len {
            return Err(DecodeError(field));
        }
        let (head, tail) = self.rest.split_at(len);
        self.rest = tail;
        Ok(head)
    }

    /// How many bytes are left.
    pub(crate) fn remaining(&self) -> usize {
        self.rest.len()
    }

    /// The next `N` bytes as an array.
    pub(crate) fn array<const N: usize>(
        &mut self,
        field: &'static str,
    ) -> Result<[u8; N], DecodeError> {
        let bytes = self.take(N, field)?;
        Ok(bytes.try_into().expect("take returned N bytes"))
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }

    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array(field)?))
    }

    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    pub(crate) fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(field)?))
    }

    pub(crate) fn u128(&mut self, field: &'static str) -> Result<u128, DecodeError> {
        Ok(u128::from_be_bytes(self.array(field)?))
    }

    /// A UTF-8 string of `max` bytes at most, after a one-byte length.
    pub(crate) fn short_str(
        &mut self,
        max: usize,
        field: &'static str,
    ) -> Result<&'a str, DecodeError> {
        let len = usize::from(self.u8(field)?);
        if len > max {
            return Err(DecodeError(field));
        }
        std::str::from_utf8(self.take(len, field)?).map_err(|_| DecodeError(field))
    }

    /// Succeeds only if every byte was consumed.
    pub(crate) fn finish(self, context: &'static str) -> Result<(), DecodeError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(DecodeError(context))
        }
    }
}

/// Appends a string after its one-byte length. Callers validate the length first.
pub(crate) fn put_short_str(out: &mut Vec<u8>, s: &str) {
    let len = u8::try_from(s.len()).expect("callers validate string lengths");
    out.push(len);
    out.extend_from_slice(s.as_bytes());
}
