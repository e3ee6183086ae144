//! Lists with a most length, refused while they are parsed. A short JSON
//! item can be a much larger value (`{}` is a 56-byte ack, `""` a 24-byte
//! buffer): a list bounded only by the bytes of its body could make the side
//! that reads it hold many times those bytes.

use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{Deserializer, Error, SeqAccess, Visitor};

/// What the error for a list over its bound starts with.
pub const TOO_LONG: &str = "list longer than";

/// Deserialises a list of at most `max` items, refusing the first past it.
pub fn at_most<'de, D, T>(d: D, max: usize) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    d.deserialize_seq(AtMost(max, PhantomData))
}

struct AtMost<T>(usize, PhantomData<T>);

impl<'de, T: Deserialize<'de>> Visitor<'de> for AtMost<T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a list of at most {} items", self.0)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(self.0).min(1024));
        while let Some(item) = seq.next_element()? {
            if items.len() == self.0 {
                return Err(A::Error::custom(format!("{TOO_LONG} {} items", self.0)));
            }
            items.push(item);
        }
        Ok(items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct Three {
        #[serde(deserialize_with = "three")]
        items: Vec<u8>,
    }

    fn three<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        at_most(d, 3)
    }

    #[test]
    fn a_list_up_to_its_bound_is_read_and_one_past_it_is_refused() {
        let three: Three = serde_json::from_str(r#"{"items":[1,2,3]}"#).unwrap();
        assert_eq!(three.items, [1, 2, 3]);
        let four = serde_json::from_str::<Three>(r#"{"items":[1,2,3,4]}"#).unwrap_err();
        assert!(
            four.to_string().starts_with("list longer than 3 items"),
            "{four}"
        );
    }
}
